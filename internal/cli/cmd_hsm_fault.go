package cli

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmFaultOptions are the inputs of `keymig hsm fault`.
type hsmFaultOptions struct {
	Dir    string
	HSM    string // an HSM id or "all"
	AZ     string // or every HSM in this availability zone
	Output outputFormat

	Down, Up, Clear bool
	Throttle        *float64       // nil: unchanged
	Latency         *time.Duration // nil: unchanged
	FailNext        *int           // nil: unchanged
}

// changes reports whether o asks for any change (otherwise fault lists).
func (o hsmFaultOptions) changes() bool {
	return o.Down || o.Up || o.Clear || o.Throttle != nil || o.Latency != nil || o.FailNext != nil
}

// hsmFaultCommand is `keymig hsm fault`.
func hsmFaultCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "fault",
		Usage: "inject faults into HSMs for tests and demos: down, throttling, latency",
		Description: `Faults are recorded in DIR/faults.json, so the next keymig process that opens
the cluster sees them; this command needs no PIN and does not open the HSMs.
Through a client directory (keymig hsm client-config) the faults are set on
the daemons themselves, at once and for every client.
Select HSMs with --hsm ID (or --hsm all) or --az ZONE (an availability-zone
outage). Without a change flag it lists the faults in effect.

A real HSM is a network round trip away: --latency 1ms shows how throughput
comes from running many operations at once.

Examples:
  keymig hsm fault --cluster ./hsm1 --az us-east-1c --down
  keymig hsm fault --cluster ./hsm1 --hsm all --throttle 0.2 --latency 1ms
  keymig hsm fault --cluster ./hsm1 --az us-east-1c --up
  keymig hsm fault --cluster ./hsm1 --hsm all --clear`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "cluster", Aliases: []string{"c"}, Required: true, Usage: "the cluster `DIR`ectory"},
			&cli.StringFlag{Name: "hsm", Usage: "the HSM `ID`, or all"},
			&cli.StringFlag{Name: "az", Usage: "every HSM in this availability `ZONE`"},
			&cli.BoolFlag{Name: "down", Usage: "mark the HSM down: every call fails as unavailable"},
			&cli.BoolFlag{Name: "up", Usage: "bring the HSM back up (other faults stay)"},
			&cli.Float64Flag{Name: "throttle", Usage: "answer this `FRACTION` (0 to 1) of calls with \"throttled\""},
			&cli.DurationFlag{Name: "latency", Usage: "add this `DURATION` to every call"},
			&cli.IntFlag{Name: "fail-next", Usage: "fail the next `N` calls as unavailable"},
			&cli.BoolFlag{Name: "clear", Usage: "remove every fault of the HSM"},
			outputFlag(),
		},
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			o := hsmFaultOptions{Dir: c.String("cluster"), HSM: c.String("hsm"), AZ: c.String("az"), Output: out,
				Down: c.Bool("down"), Up: c.Bool("up"), Clear: c.Bool("clear")}
			if c.IsSet("throttle") {
				v := c.Float64("throttle")
				o.Throttle = &v
			}
			if c.IsSet("latency") {
				v := c.Duration("latency")
				o.Latency = &v
			}
			if c.IsSet("fail-next") {
				v := c.Int("fail-next")
				o.FailNext = &v
			}
			return runHSMFault(c.Context, e, o)
		},
	}
}

// runHSMFault changes the faults of the selected HSMs, then lists them.
func runHSMFault(ctx context.Context, e *env, o hsmFaultOptions) error {
	stdout := e.stdout
	if o.Down && o.Up {
		return errors.New("--down and --up contradict each other")
	}
	if o.Clear && (o.Down || o.Throttle != nil || o.Latency != nil || o.FailNext != nil) {
		return errors.New("--clear removes every fault; give it alone (with --hsm or --az)")
	}
	if o.Throttle != nil && (*o.Throttle < 0 || *o.Throttle > 1) {
		return fmt.Errorf("--throttle %g: want a fraction between 0 and 1", *o.Throttle)
	}
	hsms, err := clusterHSMs(o.Dir)
	if err != nil {
		return err
	}
	store, err := faultStoreFor(o.Dir)
	if err != nil {
		return err
	}
	defer store.close()
	if o.changes() {
		ids, err := selectFaultHSMs(o, hsms)
		if err != nil {
			return err
		}
		current, err := store.faults(ctx, hsms)
		if err != nil {
			return inCluster(o.Dir, err)
		}
		for _, id := range ids {
			f := current[id]
			switch {
			case o.Clear:
				f = hsm.Fault{}
			case o.Down:
				f.Down = true
			case o.Up:
				f.Down = false
			}
			if o.Throttle != nil {
				f.Throttle = *o.Throttle
			}
			if o.Latency != nil {
				f.Latency = *o.Latency
			}
			if o.FailNext != nil {
				f.FailNext = *o.FailNext
			}
			if err := store.setFault(ctx, id, f); err != nil {
				return inCluster(o.Dir, fmt.Errorf("fault HSM %s: %w", id, err))
			}
		}
	}
	faults, err := store.faults(ctx, hsms)
	if err != nil {
		return inCluster(o.Dir, err)
	}
	if o.Output == outputJSON {
		type row struct {
			hsm.HSMInfo
			Fault faultReport `json:"fault"`
		}
		rows := make([]row, 0, len(hsms))
		for _, h := range hsms {
			rows = append(rows, row{HSMInfo: hsm.HSMInfo{ID: h.ID, AZ: h.AZ}, Fault: newFaultReport(faults[h.ID])})
		}
		return writeJSON(stdout, struct {
			Cluster string `json:"cluster"`
			HSMs    []row  `json:"hsms"`
		}{o.Dir, rows})
	}
	t := newTable(stdout, "HSM", "AZ", "FAULT")
	for _, h := range hsms {
		t.row(h.ID, h.AZ, faults[h.ID].String())
	}
	return t.flush()
}

// selectFaultHSMs resolves --hsm or --az to HSM ids.
func selectFaultHSMs(o hsmFaultOptions, hsms []hsm.HSMInfo) ([]string, error) {
	switch {
	case o.HSM != "" && o.AZ != "":
		return nil, errors.New("give --hsm or --az, not both")
	case o.HSM == cluster.AllHSMs:
		ids := make([]string, len(hsms))
		for i, h := range hsms {
			ids[i] = h.ID
		}
		return ids, nil
	case o.HSM != "":
		for _, h := range hsms {
			if h.ID == o.HSM {
				return []string{h.ID}, nil
			}
		}
		return nil, fmt.Errorf("cluster %s has no HSM %q; its HSMs are %s (see `keymig hsm status`)", o.Dir, o.HSM, hsmIDs(hsms))
	case o.AZ != "":
		var ids []string
		for _, h := range hsms {
			if h.AZ == o.AZ {
				ids = append(ids, h.ID)
			}
		}
		if len(ids) == 0 {
			return nil, fmt.Errorf("cluster %s has no HSM in availability zone %q; its HSMs are %s", o.Dir, o.AZ, hsmIDs(hsms))
		}
		return ids, nil
	}
	return nil, errors.New("select the HSMs with --hsm ID, --hsm all or --az ZONE")
}

// hsmIDs lists HSMs as "id (az)" for messages.
func hsmIDs(hsms []hsm.HSMInfo) string {
	s := ""
	for i, h := range hsms {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%s (%s)", h.ID, h.AZ)
	}
	return s
}

// clusterHSMs reads the HSMs and their zones from DIR/cluster.json without
// opening the cluster (no lock, no HSM files), so that faults can be set
// while another process uses the cluster, or while an HSM's file is broken.
func clusterHSMs(dir string) ([]hsm.HSMInfo, error) {
	info, err := cluster.ReadInfo(dir)
	if err != nil {
		return nil, inCluster(dir, err)
	}
	sort.SliceStable(info.HSMs, func(i, j int) bool { return info.HSMs[i].AZ < info.HSMs[j].AZ })
	return info.HSMs, nil
}
