package cli

import (
	"context"
	"fmt"

	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmSyncOptions are the inputs of `keymig hsm sync`.
type hsmSyncOptions struct {
	clusterOptions
}

// hsmSyncCommand is `keymig hsm sync`.
func hsmSyncCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "sync",
		Usage: "run an anti-entropy pass: copy token keys and users missing on an HSM from the others",
		Description: `After an HSM was down or replaced, some token keys and user changes may be
missing on it; ` + "`keymig hsm key list --verbose`" + ` shows them as partial
coverage. sync copies them as masked objects from the HSMs that hold them,
and deletes there the keys deleted while it was away. HSMs that are still
down are reported and left for the next pass. Like CloudHSM's own
replication, it needs no PIN.

Example:
  keymig hsm fault --cluster ./hsm1 --az us-east-1c --up
  keymig hsm sync --cluster ./hsm1`,
		Flags: clusterFlags(false),
		Action: func(c *cli.Context) error {
			co, err := e.clusterOptionsFrom(c, false)
			if err != nil {
				return err
			}
			return runHSMSync(c.Context, e, hsmSyncOptions{co})
		},
	}
}

// runHSMSync runs one anti-entropy pass and prints what it did. Problems
// (HSMs not reached, copies that failed) make it fail after printing them.
func runHSMSync(ctx context.Context, e *env, o hsmSyncOptions) error {
	stdout := e.stdout
	return withCluster(ctx, o.clusterOptions, func(cl *cluster.Cluster) error {
		rep, err := cl.Sync(ctx)
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("sync: %w", err))
		}
		if o.Output == outputJSON {
			if err := writeJSON(stdout, struct {
				Cluster string `json:"cluster"`
				cluster.SyncReport
				Problems []string `json:"problems"`
			}{o.Dir, rep, nonNil(rep.Problems)}); err != nil {
				return err
			}
		} else {
			fmt.Fprintf(stdout, "synced cluster %s: copied %s, deleted %s, copied %s\n",
				o.Dir, plural(rep.KeysCopied, "key"), plural(rep.KeysDeleted, "key"), plural(rep.UsersCopied, "user"))
			for _, p := range rep.Problems {
				fmt.Fprintf(stdout, "problem: %s\n", p)
			}
		}
		if len(rep.Problems) > 0 {
			return inCluster(o.Dir, fmt.Errorf("sync left %s (see above); bring the HSMs up (`keymig hsm fault --up`) and run sync again", plural(len(rep.Problems), "problem")))
		}
		return nil
	})
}
