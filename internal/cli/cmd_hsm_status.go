package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
	"github.com/urfave/cli/v2"
)

// hsmStatusOptions are the inputs of `keymig hsm status`.
type hsmStatusOptions struct {
	clusterOptions
}

// hsmStatusCommand is `keymig hsm status`.
func hsmStatusCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show a cluster's HSMs, their state and injected faults, its policy and key count",
		Description: `status needs no login: it reads the cluster directory.

Example:
  keymig hsm status --cluster ./hsm1
  keymig hsm status --cluster ./hsm1 --output json`,
		Flags: clusterFlags(false),
		Action: func(c *cli.Context) error {
			o, err := e.clusterOptionsFrom(c, false)
			if err != nil {
				return err
			}
			return runHSMStatus(c.Context, e, hsmStatusOptions{o})
		},
	}
}

// hsmStatus is what status reports.
type hsmStatus struct {
	Dir     string                 `json:"dir"`
	Cluster hsm.ClusterInfo        `json:"cluster"`
	Faults  map[string]faultReport `json:"faults"`
}

// faultReport is one HSM's injected fault as status and fault print it.
type faultReport struct {
	Down     bool    `json:"down"`
	Throttle float64 `json:"throttle"`
	Latency  string  `json:"latency"`
	FailNext int     `json:"fail-next"`
}

// newFaultReport converts a cluster fault for printing.
func newFaultReport(f hsm.Fault) faultReport {
	return faultReport{Down: f.Down, Throttle: f.Throttle, Latency: f.Latency.String(), FailNext: f.FailNext}
}

// runHSMStatus prints the cluster's description.
func runHSMStatus(ctx context.Context, e *env, o hsmStatusOptions) error {
	stdout := e.stdout
	cl, err := openCluster(ctx, o.clusterOptions)
	if err != nil {
		return err
	}
	info := cl.Info()
	if err := cl.Close(); err != nil {
		return inCluster(o.Dir, err)
	}
	store, err := faultStoreFor(o.Dir) // through a client directory: the daemons' faults
	if err != nil {
		return err
	}
	defer store.close()
	faults, err := store.faults(ctx, info.HSMs)
	if err != nil {
		return inCluster(o.Dir, err)
	}
	if o.Output == outputJSON {
		st := hsmStatus{Dir: o.Dir, Cluster: info, Faults: map[string]faultReport{}}
		for id, f := range faults {
			st.Faults[id] = newFaultReport(f)
		}
		return writeJSON(stdout, st)
	}
	check := "enabled (a token key is usable once on 2 HSMs)"
	if !info.Policy.KeyAvailabilityCheck {
		check = "disabled"
	}
	t := newTable(stdout)
	t.row("cluster:", info.ID)
	t.row("directory:", o.Dir)
	t.row("region:", info.Region)
	t.row("lineage:", info.Lineage)
	t.row("created:", info.Created.UTC().Format(time.RFC3339))
	t.row("fips:", fmt.Sprint(info.Policy.FIPS))
	t.row("key availability check:", check)
	t.row("token keys:", fmt.Sprintf("%d of %d", info.Keys, info.Policy.KeyCapacity))
	if info.Policy.MaxConcurrentOps > 0 {
		t.row("concurrent operations per HSM:", fmt.Sprint(info.Policy.MaxConcurrentOps))
	}
	kdf := info.Policy.KDFIterations
	if kdf == 0 {
		kdf = node.DefaultKDFIterations
	}
	t.row("password hashing:", fmt.Sprintf("PBKDF2-SHA256, %d iterations", kdf))
	if err := t.flush(); err != nil {
		return err
	}
	fmt.Fprintln(stdout)
	t = newTable(stdout, "HSM", "AZ", "STATE", "FAULT")
	for _, h := range info.HSMs {
		fault := "none"
		if f, ok := faults[h.ID]; ok {
			fault = f.String()
		}
		t.row(h.ID, h.AZ, h.State, fault)
	}
	return t.flush()
}
