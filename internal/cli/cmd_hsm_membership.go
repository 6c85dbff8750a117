package cli

import (
	"context"
	"errors"
	"fmt"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmMembershipOptions are the inputs of `keymig hsm add-hsm` and `remove-hsm`.
type hsmMembershipOptions struct {
	clusterOptions
	AZ  string // add-hsm: the new HSM's zone; empty = the least used zone
	HSM string // remove-hsm: the HSM id
}

// hsmAddHSMCommand is `keymig hsm add-hsm`.
func hsmAddHSMCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "add-hsm",
		Usage: "add an HSM to the cluster, filled from a fresh backup, then synced",
		Description: `As in CloudHSM, a membership change takes a backup first; the new HSM is
filled from it, then brought up to date by an anti-entropy pass. Cluster
membership is not an HSM login: it needs no PIN.

Example:
  keymig hsm add-hsm --cluster ./hsm1 --az us-east-1b`,
		Flags: append(clusterFlags(false), &cli.StringFlag{Name: "az", Usage: "the new HSM's availability `ZONE`", DefaultText: "the zone with the fewest HSMs"}),
		Action: func(c *cli.Context) error {
			co, err := e.clusterOptionsFrom(c, false)
			if err != nil {
				return err
			}
			return runHSMAddHSM(c.Context, e, hsmMembershipOptions{clusterOptions: co, AZ: c.String("az")})
		},
	}
}

// runHSMAddHSM adds one HSM and prints it.
func runHSMAddHSM(ctx context.Context, e *env, o hsmMembershipOptions) error {
	stdout := e.stdout
	return withCluster(ctx, o.clusterOptions, func(cl *cluster.Cluster) error {
		h, err := cl.AddHSM(ctx, o.AZ)
		if err != nil {
			return inCluster(o.Dir, err)
		}
		info := cl.Info()
		if o.Output == outputJSON {
			return writeJSON(stdout, struct {
				Cluster string        `json:"cluster"`
				Added   hsm.HSMInfo   `json:"added"`
				HSMs    []hsm.HSMInfo `json:"hsms"`
				Policy  hsm.Policy    `json:"policy"`
			}{o.Dir, h, nonNil(info.HSMs), info.Policy})
		}
		_, err = fmt.Fprintf(stdout, "added HSM %s in %s to cluster %s; it now has %d HSMs\n", h.ID, h.AZ, o.Dir, len(info.HSMs))
		return err
	})
}

// hsmRemoveHSMCommand is `keymig hsm remove-hsm`.
func hsmRemoveHSMCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "remove-hsm",
		Usage: "remove an HSM from the cluster (after a backup) and delete its file",
		Description: `The last HSM of a cluster cannot be removed. Cluster membership is not an
HSM login: it needs no PIN.

Example:
  keymig hsm status --cluster ./hsm1
  keymig hsm remove-hsm --cluster ./hsm1 --hsm hsm-3f2a9c`,
		Flags: append(clusterFlags(false), &cli.StringFlag{Name: "hsm", Required: true, Usage: "the HSM `ID` (see keymig hsm status)"}),
		Action: func(c *cli.Context) error {
			co, err := e.clusterOptionsFrom(c, false)
			if err != nil {
				return err
			}
			return runHSMRemoveHSM(c.Context, e, hsmMembershipOptions{clusterOptions: co, HSM: c.String("hsm")})
		},
	}
}

// runHSMRemoveHSM removes one HSM.
func runHSMRemoveHSM(ctx context.Context, e *env, o hsmMembershipOptions) error {
	stdout := e.stdout
	if o.HSM == "" {
		return errors.New("--hsm ID is required (see `keymig hsm status`)")
	}
	return withCluster(ctx, o.clusterOptions, func(cl *cluster.Cluster) error {
		if err := cl.RemoveHSM(ctx, o.HSM); err != nil {
			return inCluster(o.Dir, err)
		}
		info := cl.Info()
		if o.Output == outputJSON {
			return writeJSON(stdout, struct {
				Cluster string        `json:"cluster"`
				Removed string        `json:"removed"`
				HSMs    []hsm.HSMInfo `json:"hsms"`
			}{o.Dir, o.HSM, nonNil(info.HSMs)})
		}
		_, err := fmt.Fprintf(stdout, "removed HSM %s from cluster %s; it now has %d HSMs\n", o.HSM, o.Dir, len(info.HSMs))
		return err
	})
}
