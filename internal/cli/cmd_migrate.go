package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/migrate"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/runner"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// migrateOptions are the flags of keymig migrate.
type migrateOptions struct {
	pairOptions
	Plan        string
	Journal     string
	Workers     int
	DryRun      bool
	MaxKeys     int
	MaxDuration time.Duration
	OnError     rotate.OnError // of rotations
	NoProgress  bool
	Output      outputFormat
}

func migrateCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:      "migrate",
		Usage:     "apply a plan: move the planned keys, resumably",
		UsageText: "keymig migrate --plan plan.json [--journal FILE] [--workers 64] [--dry-run] [--max-keys N] [--max-duration D]",
		Description: `migrate moves every transfer and sync key of a plan to the target, recording
each step in a journal (plan.json.journal by default). If it is stopped —
Ctrl-C, a crash, a kill — run the same command again: it resumes where it
stopped and never makes a key twice. A finished run is a no-op.

A rotate key (a master key that cannot leave its HSM, planned with
plan --datakeys LABEL=FILE) gets a new key with its label, id and attributes
on the target, and every data key in FILE is re-encrypted under it inside
the HSMs into FILE.rotated, resumably, in the same journal. The old master
is never changed.

It refuses a plan whose content does not match its digest, or whose clusters
changed since planning, and says how to re-plan. --dry-run reports what would
happen and writes nothing anywhere.

The clusters are the ones named in the plan (override with --source and
--target if their directories moved). PINs come from KEYMIG_SOURCE_PIN and
KEYMIG_TARGET_PIN, --source-pin-file and --target-pin-file, or prompts.

Exit status: 0 all done, 1 a key failed, 2 (--dry-run) work to do,
130 interrupted (run again to resume).

Example:
  keymig migrate --plan plan.json --workers 64`,
		Flags: append(pairFlags(false),
			&cli.StringFlag{Name: "plan", Required: true, Usage: "the plan `FILE` written by keymig plan"},
			&cli.StringFlag{Name: "journal", Usage: "the journal `FILE` (default: the plan file + .journal)"},
			&cli.IntFlag{Name: "workers", Value: 64, Usage: "keys moved at once"},
			&cli.BoolFlag{Name: "dry-run", Usage: "report what would happen; change nothing"},
			&cli.IntFlag{Name: "max-keys", Usage: "stop after starting `N` keys (resume later)"},
			&cli.DurationFlag{Name: "max-duration", Usage: "stop starting keys after this long (resume later)"},
			&cli.StringFlag{Name: "datakeys-on-error", Value: "stop", Usage: "for rotate keys: a data key that does not unwrap under its old master fails the key (stop) or is set aside in FILE.rotated.rejects (skip)"},
			&cli.BoolFlag{Name: "no-progress", Usage: "no progress bar or progress log lines"},
			outputFlag(),
		),
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			onErr, err := rotate.ParseOnError(c.String("datakeys-on-error"))
			if err != nil {
				return fmt.Errorf("--datakeys-on-error %q: want stop or skip", c.String("datakeys-on-error"))
			}
			return runMigrate(c.Context, e, migrateOptions{OnError: onErr,
				pairOptions: pairOptionsFrom(c), Plan: c.String("plan"), Journal: c.String("journal"),
				Workers: c.Int("workers"), DryRun: c.Bool("dry-run"), MaxKeys: c.Int("max-keys"),
				MaxDuration: c.Duration("max-duration"), NoProgress: c.Bool("no-progress"), Output: out,
			})
		},
	}
}

// resolvePair fills the cluster directories from the plan unless given.
func resolvePair(o pairOptions, p *plan.Plan) pairOptions {
	if o.SourceDir == "" {
		o.SourceDir = p.Source.Dir
	}
	if o.TargetDir == "" {
		o.TargetDir = p.Target.Dir
	}
	return o
}

// openPlannedPair opens the plan's clusters (or the ones given), checks
// that they and the users are the planned ones, and lists each once.
func openPlannedPair(ctx context.Context, e *env, o pairOptions, p *plan.Plan, planPath string) (_ *pair, src, dst hsm.Inventory, err error) {
	pr, err := openPair(ctx, e, resolvePair(o, p))
	if err != nil {
		return nil, src, dst, err
	}
	defer func() {
		if err != nil {
			pr.close(ctx)
		}
	}()
	if err = checkPairMatchesPlan(ctx, pr, p, planPath); err != nil {
		return nil, src, dst, err
	}
	if src, err = pr.src.inventory(ctx); err != nil {
		return nil, src, dst, err
	}
	if dst, err = pr.dst.inventory(ctx); err != nil {
		return nil, src, dst, err
	}
	return pr, src, dst, nil
}

// checkPairMatchesPlan makes sure the clusters and users are the planned ones.
func checkPairMatchesPlan(ctx context.Context, pr *pair, p *plan.Plan, planPath string) error {
	for _, s := range []struct {
		side side
		want plan.Cluster
		name string
	}{{pr.src, p.Source, "source"}, {pr.dst, p.Target, "target"}} {
		info, err := s.side.session.Info(ctx)
		if err != nil {
			return inCluster(s.side.dir, err)
		}
		if info.ID != s.want.ID {
			return fmt.Errorf("%s cluster %s is %s, but plan %s was made for %s: point --%s at the planned cluster or re-plan", s.name, s.side.dir, info.ID, planPath, s.want.ID, s.name)
		}
		if u := s.side.session.User().Name; u != s.want.User {
			return fmt.Errorf("logged in to the %s cluster as %s, but plan %s was made as %s: log in as %s (key ownership depends on it) or re-plan", s.name, u, planPath, s.want.User, s.want.User)
		}
	}
	return nil
}

func runMigrate(ctx context.Context, e *env, o migrateOptions) error {
	stdout, stderr := e.stdout, e.stderr
	p, err := plan.Read(o.Plan)
	if err != nil {
		return err
	}
	if o.Journal == "" {
		o.Journal = journal.DefaultPath(o.Plan)
	}
	if o.DryRun {
		return migrateDryRun(ctx, e, o, p, stdout)
	}
	defer runner.ProcsForStorage()()
	j, err := journal.Open(o.Journal, journal.Options{Command: "migrate", BatchSize: max(1, o.Workers)})
	if err != nil {
		return err
	}
	defer j.Close()
	if j.TookOver != nil {
		e.log.Warn("the previous run of this journal died without closing it; resuming", "journal", o.Journal, "was", j.TookOver.String())
	}
	if err := checkJournalPlan(j, p, o.Journal); err != nil {
		return err
	}
	// A finished run prints its summary without touching the clusters.
	if r, info, err := j.Run(p.Digest); err == nil && info.Status == journal.RunDone {
		if remaining, err := migrate.Seed(r, p); err == nil && remaining == 0 {
			fmt.Fprintf(stdout, "this plan's migration finished at %s; nothing to do (journal %s)\n", info.Updated.Format(time.RFC3339), o.Journal)
			return printMigrateReport(stdout, o.Output, info, o.Journal)
		}
	}

	pr, src, dst, err := openPlannedPair(ctx, e, o.pairOptions, p, o.Plan)
	if err != nil {
		return err
	}
	defer pr.close(ctx)
	if err := p.CheckFresh(src.Keys, dst.Keys); err != nil {
		return fmt.Errorf("plan %s: %w", o.Plan, err)
	}

	r, _, resumed, err := j.Begin(p.Digest, migrate.RunKind, map[string]string{"plan": o.Plan, "source": p.Source.ID, "target": p.Target.ID})
	if err != nil {
		return err
	}
	var progress runner.Progress
	if !o.NoProgress {
		progress = runner.NewProgress(stderr, isTerminal(stderr), e.log, "keys", 5*time.Second)
	}
	opts := migrate.Options{
		Workers: o.Workers, MaxKeys: o.MaxKeys, MaxDuration: o.MaxDuration, Progress: progress, Log: e.log,
	}
	if p.Counts()[plan.Rotate] > 0 {
		lanes := &rotationLanes{pair: pr, n: rotationLanesFor(p)}
		defer lanes.close(ctx)
		opts.Rotation = &migrate.Rotation{Lanes: lanes.open, Workers: 64, OnError: o.OnError, OpenTable: openPlannedTable,
			SkipAdvice: "run migrate with --datakeys-on-error skip to set such records aside"}
		if !o.NoProgress {
			opts.Rotation.Progress = func(plan.Item) runner.Progress {
				// Log lines, not a second bar under the keys' bar.
				return runner.NewProgress(stderr, false, e.log, "data keys", 5*time.Second)
			}
		}
	}
	m := migrate.New(p, pr.src.session, pr.dst.session, opts)
	rep, err := m.Run(ctx, r)
	rep.Resumed = resumed
	if err != nil {
		return err
	}
	_, info, err := j.Run(p.Digest)
	if err != nil {
		return err
	}
	if err := printMigrateReport(stdout, o.Output, info, o.Journal); err != nil {
		return err
	}
	switch {
	case rep.Summary.Interrupted:
		return errInterrupted
	case rep.Summary.Failed > 0 || info.Status == journal.RunFailed:
		return fmt.Errorf("%d key(s) failed; see above or keymig journal show --journal %s, fix the cause and run migrate again to retry them", max(rep.Summary.Failed, 1), o.Journal)
	}
	return nil
}

// A migration's rotations use up to maxRotationLanes sessions on each
// cluster, one per recordsPerLane data keys of the largest rotation: each
// lane spreads the work over the HSMs but costs an RSA key pair on the
// target to set up, worth it only for enough data keys.
const (
	maxRotationLanes = 8
	recordsPerLane   = 2000
)

// rotationLanesFor is how many lanes the rotations of p get.
func rotationLanesFor(p *plan.Plan) int {
	var most int64
	for _, it := range p.Items {
		if it.Action == plan.Rotate && it.Rotation != nil {
			most = max(most, it.Rotation.Records)
		}
	}
	return int(min(maxRotationLanes, max(1, most/recordsPerLane)))
}

// rotationLanes opens the sessions of a migration's rotations when the
// first rotate item needs them, and closes them at the end.
type rotationLanes struct {
	pair     *pair
	n        int // sessions on each cluster
	src, dst []hsm.Session
}

func (l *rotationLanes) open(ctx context.Context) (src, dst rotate.Side, err error) {
	if l.src, err = l.pair.src.moreSessions(ctx, l.n); err != nil {
		return src, dst, err
	}
	if l.dst, err = l.pair.dst.moreSessions(ctx, l.n); err != nil {
		return src, dst, err
	}
	srcLanes, err := rotationLanesOf(l.pair.src.dir, l.src)
	if err != nil {
		return src, dst, err
	}
	dstLanes, err := rotationLanesOf(l.pair.dst.dir, l.dst)
	if err != nil {
		return src, dst, err
	}
	return rotate.Side{Name: l.pair.src.dir, Sessions: srcLanes}, rotate.Side{Name: l.pair.dst.dir, Sessions: dstLanes}, nil
}

func (l *rotationLanes) close(ctx context.Context) {
	logoutAll(ctx, l.src)
	logoutAll(ctx, l.dst)
}

// checkJournalPlan refuses a journal that holds a run of another plan:
// one journal per plan keeps resumes unambiguous.
func checkJournalPlan(j *journal.Journal, p *plan.Plan, path string) error {
	runs, err := j.Runs()
	if err != nil {
		return err
	}
	for _, r := range runs {
		if r.Kind == migrate.RunKind && r.ID != p.Digest {
			return fmt.Errorf("journal %s belongs to another plan (%s, run %s), not to this one (%s): give this plan its own --journal", path, r.ID, r.Status, p.Digest)
		}
	}
	return nil
}

func printMigrateReport(w io.Writer, out outputFormat, info journal.RunInfo, journalPath string) error {
	var rep migrate.Report
	if len(info.Summary) > 0 {
		if err := json.Unmarshal(info.Summary, &rep); err != nil {
			return fmt.Errorf("journal %s: run summary: %w", journalPath, err)
		}
	}
	if out == outputJSON {
		return writeJSON(w, struct {
			Status  string         `json:"status"`
			Journal string         `json:"journal"`
			Report  migrate.Report `json:"report"`
		}{info.Status, journalPath, rep})
	}
	s := rep.Summary
	fmt.Fprintf(w, "status: %s\n", info.Status)
	t := newTable(w)
	t.row("moved now", fmt.Sprint(s.Done))
	t.row("done before", fmt.Sprint(max(0, s.Already-rep.Skipped-rep.Blocked)))
	t.row("skipped", fmt.Sprint(rep.Skipped))
	t.row("blocked", fmt.Sprint(rep.Blocked))
	t.row("failed", fmt.Sprint(s.Failed))
	if s.Pending > 0 {
		t.row("not started", fmt.Sprint(s.Pending))
	}
	if rep.DataKeys > 0 || rep.Rejected > 0 {
		t.row("data keys", fmt.Sprintf("%d re-encrypted under new masters", rep.DataKeys))
	}
	if rep.Rejected > 0 {
		t.row("set aside", fmt.Sprintf("%d data keys that did not unwrap (see FILE.rotated.rejects)", rep.Rejected))
	}
	if rep.Adopted > 0 {
		t.row("adopted", fmt.Sprintf("%d (found on the target after an interrupted attempt)", rep.Adopted))
	}
	if s.Retries > 0 {
		t.row("retries", fmt.Sprint(s.Retries))
	}
	if s.Elapsed > 0 {
		t.row("time", fmt.Sprintf("%s (%.0f keys/s)", s.Elapsed.Round(time.Millisecond), s.Rate()))
	}
	t.flush()
	if s.Stopped != "" && !s.Interrupted {
		fmt.Fprintf(w, "stopped early: %s; run the same command again to go on\n", s.Stopped)
	}
	if len(s.Failures) > 0 {
		fmt.Fprintln(w, "failed keys:")
		fmt.Fprint(w, runner.FormatFailures(s.Failures, 20))
	}
	return nil
}

func migrateDryRun(ctx context.Context, e *env, o migrateOptions, p *plan.Plan, stdout io.Writer) error {
	states := map[string]string{}
	if j, err := journal.Open(o.Journal, journal.Options{ReadOnly: true}); err == nil {
		if r, _, err := j.Run(p.Digest); err == nil {
			r.Items(func(it journal.Item) error { states[it.Key] = it.State; return nil })
		}
		j.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	pr, src, dst, err := openPlannedPair(ctx, e, o.pairOptions, p, o.Plan)
	if err != nil {
		return err
	}
	defer pr.close(ctx)
	stale := p.CheckFresh(src.Keys, dst.Keys)
	rows := migrate.DryRun(p, src.Keys, dst.Keys, dst.User.Name, states)
	work := 0
	for _, r := range rows {
		if r.Mark == migrate.MarkSource {
			work++
		}
	}
	if o.Output == outputJSON {
		if err := writeJSON(stdout, struct {
			Stale string        `json:"stale,omitempty"`
			Rows  []migrate.Row `json:"keys"`
			Work  int           `json:"would-move"`
		}{errString(stale), rows, work}); err != nil {
			return err
		}
	} else {
		fmt.Fprintln(stdout, "dry run: nothing is written to either cluster or the journal")
		if stale != nil {
			fmt.Fprintf(stdout, "warning: migrate would refuse this plan now: %v\n", stale)
		}
		printRows(stdout, rows)
		fmt.Fprintf(stdout, "%d key(s) would move\n", work)
	}
	if stale != nil {
		return fmt.Errorf("plan %s: %w", o.Plan, stale)
	}
	if work > 0 {
		return errChangesPending
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// printRows prints rclone-check style rows: mark, handle, label, detail.
func printRows(w io.Writer, rows []migrate.Row) {
	t := newTable(w)
	for _, r := range rows {
		t.row(r.Mark, r.Ref.String(), fmt.Sprintf("%q", r.Label), r.Detail)
	}
	t.flush()
}

// isTerminal reports whether w is a terminal (for progress bars).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// openPlannedTable opens a data-key table by the address its plan
// recorded, making its output table or columns if they are missing.
func openPlannedTable(ctx context.Context, address string) (rotate.Table, func(), error) {
	st, err := openTable(ctx, address, tableOptions{}, rotateTable)
	if err != nil {
		return nil, nil, err
	}
	return st, st.Close, nil
}
