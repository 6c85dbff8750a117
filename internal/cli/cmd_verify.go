package cli

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/migrate"
	"github.com/keymig/keymig/plan"
	"github.com/urfave/cli/v2"
)

// verifyOptions are the flags of keymig verify.
type verifyOptions struct {
	pairOptions
	Plan     string
	Combined string
	Force    bool
	Output   outputFormat
}

func verifyCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:      "verify",
		Usage:     "compare a plan with the clusters now, key by key",
		UsageText: "keymig verify --plan plan.json [--combined FILE]",
		Description: `verify checks that every planned key is on the target exactly once, with the
source key's check value, on at least two HSMs. It prints one line per key
that is not in order, rclone check style:
  =  on both clusters with the same check value
  +  on the source only (not migrated yet)
  -  on the target only (the source key is gone)
  *  differs (another check value, or its id holds another key)
  !  an error (a duplicate, too few HSMs, or blocked in the plan)
A rotated master key is in order when its new master is on the target with
its label, id and attributes, and its rotated data-key file holds every
record of the planned file, under the new master (keymig datakeys verify
then compares each data key inside the HSMs).
--combined FILE writes every key's line, = included.

Exit status: 0 when every planned key is in place, 1 otherwise.`,
		Flags: append(pairFlags(false),
			&cli.StringFlag{Name: "plan", Required: true, Usage: "the plan `FILE`"},
			&cli.StringFlag{Name: "combined", Usage: "write one line per key to `FILE`"},
			&cli.BoolFlag{Name: "force", Usage: "replace an existing --combined file"},
			outputFlag(),
		),
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			return runVerify(c.Context, e, verifyOptions{
				pairOptions: pairOptionsFrom(c), Plan: c.String("plan"), Combined: c.String("combined"),
				Force: c.Bool("force"), Output: out,
			})
		},
	}
}

func runVerify(ctx context.Context, e *env, o verifyOptions) error {
	stdout := e.stdout
	p, err := plan.Read(o.Plan)
	if err != nil {
		return err
	}
	pr, src, dst, err := openPlannedPair(ctx, e, o.pairOptions, p, o.Plan)
	if err != nil {
		return err
	}
	defer pr.close(ctx)
	need := min(2, len(dst.Info.HSMs))
	rows := migrate.Verify(p, src.Keys, dst.Keys, dst.User.Name, need)
	for i := range rows {
		if it := p.Items[i]; it.Action == plan.Rotate && rows[i].Mark == migrate.MarkSame {
			check := migrate.CheckRotated
			if it.Rotation.Table {
				check = func(it plan.Item, target hsm.KeyInfo) error { return checkRotatedTable(ctx, it, target) }
			}
			if err := check(it, keyByRef(dst.Keys, rows[i].Target)); err != nil {
				rows[i].Mark, rows[i].Detail = migrate.MarkError, err.Error()
			}
		}
	}
	counts := map[string]int{}
	bad, blocked := 0, 0
	var shown []migrate.Row
	for i, r := range rows {
		counts[r.Mark]++
		if r.Mark != migrate.MarkSame {
			shown = append(shown, r)
			if p.Items[i].Action == plan.Blocked {
				blocked++
			} else {
				bad++
			}
		}
	}
	if o.Combined != "" {
		var b strings.Builder
		for _, r := range rows {
			fmt.Fprintf(&b, "%s %s %q %s\n", r.Mark, r.Ref, r.Label, r.Detail)
		}
		if err := writeFileAtomic(o.Combined, []byte(b.String()), 0o600, o.Force); err != nil {
			return err
		}
	}
	if o.Output == outputJSON {
		if err := writeJSON(stdout, struct {
			Counts map[string]int `json:"counts"`
			Keys   []migrate.Row  `json:"keys"`
		}{counts, rows}); err != nil {
			return err
		}
	} else {
		printRows(stdout, shown)
		fmt.Fprintf(stdout, "%d same, %d on source only, %d on target only, %d differ, %d errors, %d blocked in the plan (%d keys)\n",
			counts["="], counts["+"], counts["-"], counts["*"], counts["!"]-blocked, blocked, len(rows))
	}
	if bad > 0 {
		return fmt.Errorf("%d planned key(s) are not in place on the target; run keymig migrate --plan %s to finish, or look at the lines above", bad, o.Plan)
	}
	return nil
}

// keyByRef finds ref among keys (the zero KeyInfo if it is not there).
func keyByRef(keys []hsm.KeyInfo, ref hsm.KeyRef) hsm.KeyInfo {
	for _, k := range keys {
		if k.Ref == ref {
			return k
		}
	}
	return hsm.KeyInfo{}
}

// checkRotatedTable checks the data-key table of a rotate item whose new
// master is target: no row of it is left under the old master, and every
// other row is under the new one. (keymig datakeys verify goes further
// and unwraps each row inside the HSMs.)
func checkRotatedTable(ctx context.Context, it plan.Item, target hsm.KeyInfo) error {
	st, _, err := openTableView(ctx, it.Rotation.In, tableOptions{})
	if err != nil {
		return err
	}
	defer st.Close()
	census, err := st.Census(ctx)
	if err != nil {
		return err
	}
	var old, other int64
	for _, c := range census {
		switch c.KCV {
		case target.KCV.String():
		case it.KCV.String():
			old += c.Rows
		default:
			other += c.Rows
		}
	}
	// Rows migrate set aside under --datakeys-on-error skip stay under the
	// old master; they are listed in the rejects file.
	var setAside int64
	if b, err := os.ReadFile(migrate.RejectsPath(it.Rotation)); err == nil {
		setAside = int64(bytes.Count(b, []byte("\n")))
	}
	switch {
	case old > setAside:
		return fmt.Errorf("the new master %s is made, but %d row(s) of %s are still under the old master: run keymig migrate again to finish re-encrypting them", target.Ref, old-setAside, st)
	case other > 0:
		return fmt.Errorf("%d row(s) of %s are under neither the old master nor the new one %s", other, st, target.Ref)
	}
	return nil
}
