package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/internal/clonediff"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/runner"
	"github.com/keymig/keymig/synckey"
	"github.com/urfave/cli/v2"
)

// synckeyOptions are the flags of keymig synckey.
type synckeyOptions struct {
	pairOptions
	Filter     []string
	DryRun     bool
	Prune      bool
	Yes        bool
	Every      time.Duration
	Jitter     string
	Journal    string
	Combined   string
	Workers    int
	KeepRuns   int
	NoProgress bool
	Output     outputFormat
}

func synckeyCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:      "synckey",
		Usage:     "keep a cloned cluster in step with its source (CloudHSM syncKey for a whole cluster)",
		UsageText: "keymig synckey --source DIR --target DIR [--filter attr.NAME=VALUE ...] [--dry-run] [--prune --yes] [--every 15m [--jitter 10%]] [--journal FILE] [--combined FILE] [--output json]",
		Description: `synckey compares two clones of one cluster (a backup of the source restored
into the target with keymig hsm restore) key by key, by handle, check value,
attributes, owner and shares, and copies every key missing on the target as
a masked object — non-extractable keys included, since clones share the
masking key. It prints one line per key that is not the same, rclone check
style:
  =  the same on both clusters
  +  on the source only: copied
  -  on the target only: kept, unless --prune --yes
  *  on both but different: never overwritten; the line says which
     attributes or shares differ and on which side
  !  cannot be synchronised, and why: not yet synchronised across the
     source cluster, an owner or share's user missing on the target, a
     login that may not export or insert it, its id taken, target full
--combined FILE writes every key's line, = included (replaced each run).

Each sync is one run of a journal, DIR/synckey-SOURCE-CLUSTER-ID.journal in
the target cluster directory unless --journal says otherwise. A sync that
was killed or stopped is resumed by the next one, which then diffs afresh.
The journal's lock refuses a second sync of the same pair while one runs.

The target login must be a crypto officer or the owner of the keys it
inserts (and the source login a crypto officer or the owner, to export
them); a crypto officer on both sides syncs every user's keys. PINs come
from KEYMIG_SOURCE_PIN and KEYMIG_TARGET_PIN, --source-pin-file and
--target-pin-file, or prompts (read once, also with --every).

--every D repeats the sync every D (± --jitter) until SIGTERM or Ctrl-C:
between runs it stops at once; during a run it lets the keys in flight
finish and stops (the next sync resumes the rest). A run that cannot reach
a cluster fails with the reason and the next tick tries again. kill -USR1
PID starts the next sync at once instead of at the next tick.

Exit status: 0 every syncable key is in place (the last run, with --every),
1 a key or the run failed, 2 (--dry-run) keys to copy or delete,
130 interrupted during a run (run again to resume).

Examples:
  keymig synckey --source us-east-1 --target eu-west-1 --dry-run
  keymig synckey --source us-east-1 --target eu-west-1
  keymig synckey --source us-east-1 --target eu-west-1 --every 15m --jitter 10%`,
		Flags: append(pairFlags(true),
			&cli.StringSliceFlag{Name: "filter", Usage: "compare and copy only the keys that match (repeatable, ANDed): key-reference=0x..., attr.label=L, attr.id=HEX, attr.class=C, attr.NAME=true|false"},
			&cli.BoolFlag{Name: "dry-run", Usage: "report what would be copied or deleted; change nothing"},
			&cli.BoolFlag{Name: "prune", Usage: "delete the keys only on the target (lists them unless --yes)"},
			&cli.BoolFlag{Name: "yes", Usage: "with --prune: really delete"},
			&cli.DurationFlag{Name: "every", Usage: "repeat the sync every `DURATION` (e.g. 15m) until stopped"},
			&cli.StringFlag{Name: "jitter", Value: "10%", Usage: "with --every: move each start by up to ±`PCT` of the period"},
			&cli.StringFlag{Name: "journal", Usage: "the journal `FILE` (default: synckey-SOURCE-CLUSTER-ID.journal in the target directory)"},
			&cli.StringFlag{Name: "combined", Usage: "write one line per key, = included, to `FILE`"},
			&cli.IntFlag{Name: "workers", Value: 16, Usage: "keys copied at once"},
			&cli.IntFlag{Name: "keep-runs", Value: 100, Usage: "after each sync, keep the newest `N` finished runs in the journal and delete older ones (0 keeps only unfinished runs)"},
			&cli.BoolFlag{Name: "no-progress", Usage: "no progress bar or progress log lines"},
			outputFlag(),
		),
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			return runSynckey(c.Context, e, synckeyOptions{
				pairOptions: pairOptionsFrom(c), Filter: c.StringSlice("filter"), DryRun: c.Bool("dry-run"),
				Prune: c.Bool("prune"), Yes: c.Bool("yes"), Every: c.Duration("every"), Jitter: c.String("jitter"),
				Journal: c.String("journal"), Combined: c.String("combined"), Workers: c.Int("workers"),
				KeepRuns: c.Int("keep-runs"), NoProgress: c.Bool("no-progress"), Output: out,
			})
		},
	}
}

// synckeyJournalPath is the default journal of a pair: in the target
// directory, named after the source cluster, so that each source synced
// into a target has its own journal and lock.
func synckeyJournalPath(sourceDir, targetDir string) (string, error) {
	info, err := cluster.ReadInfo(sourceDir)
	if err != nil {
		return "", fmt.Errorf("source cluster %s: %w", sourceDir, err)
	}
	if strings.ContainsAny(info.ID, `/\`) {
		return "", fmt.Errorf("source cluster %s: cluster.json has no usable cluster id; pass --journal FILE", sourceDir)
	}
	return filepath.Join(targetDir, "synckey-"+info.ID+".journal"), nil
}

func runSynckey(ctx context.Context, e *env, o synckeyOptions) error {
	stdout, stderr := e.stdout, e.stderr
	defer runner.ProcsForStorage()()
	if o.SourceDir == "" || o.TargetDir == "" {
		return errors.New("both --source DIR and --target DIR are needed")
	}
	if a, b := absPath(o.SourceDir), absPath(o.TargetDir); a == b {
		return fmt.Errorf("--source and --target are the same cluster directory %s: name a clone as the target", o.SourceDir)
	}
	if o.Yes && !o.Prune {
		return errors.New("--yes confirms --prune; without --prune nothing is ever deleted")
	}
	if o.DryRun && o.Every > 0 {
		return errors.New("--dry-run and --every together would report the same diff forever; use one of them")
	}
	if o.Every < 0 {
		return fmt.Errorf("--every %s: want a positive period such as 15m", o.Every)
	}
	if o.KeepRuns < 0 {
		return fmt.Errorf("--keep-runs %d: want 0 or more", o.KeepRuns)
	}
	jitter, err := synckey.ParseJitter(o.Jitter)
	if err != nil {
		return fmt.Errorf("--%w", err)
	}
	filter, err := hsm.ParseFilter(o.Filter)
	if err != nil {
		return err
	}
	srcCreds, err := loadPIN(e, envSourcePIN, o.SourcePINFile, "the source cluster "+o.SourceDir)
	if err != nil {
		return err
	}
	dstCreds, err := loadPIN(e, envTargetPIN, o.TargetPINFile, "the target cluster "+o.TargetDir)
	if err != nil {
		return err
	}
	opts := synckey.Options{Filter: filter, Prune: o.Prune, Yes: o.Yes, Workers: o.Workers, Log: e.log}
	if o.DryRun {
		return synckeyDryRun(ctx, o, opts, srcCreds, dstCreds, stdout)
	}

	if o.Journal == "" {
		if o.Journal, err = synckeyJournalPath(o.SourceDir, o.TargetDir); err != nil {
			return err
		}
	}
	// The journal is locked before either cluster is opened, and for as
	// long as --every runs, so a second sync of the pair is refused at once
	// with the holder's name rather than queued behind the cluster locks.
	j, err := journal.Open(o.Journal, journal.Options{Command: "synckey", BatchSize: max(1, o.Workers)})
	if err != nil {
		return err
	}
	defer j.Close()
	if j.TookOver != nil {
		e.log.Warn("the previous sync of this journal died without closing it; resuming", "journal", o.Journal, "was", j.TookOver.String())
	}

	once := func(ctx context.Context) error {
		if !o.NoProgress {
			opts.Progress = runner.NewProgress(stderr, isTerminal(stderr), e.log, "keys", 5*time.Second)
		}
		pr, err := openPairWith(ctx, o.pairOptions, srcCreds, dstCreds)
		if err != nil {
			return err
		}
		defer pr.close(ctx)
		sp, err := synckeyPair(pr)
		if err != nil {
			return err
		}
		s := synckey.New(sp, j, opts)
		res, err := s.Sync(ctx)
		if perr := printSynckey(stdout, o, res, err); perr != nil && err == nil {
			err = perr
		}
		if err != nil {
			return err
		}
		// A scheduled sync adds a run each time: keep the journal bounded.
		if n, err := j.Prune(synckey.RunKind, o.KeepRuns); err != nil {
			e.log.Warn("could not delete old runs from the journal; it keeps growing", "journal", o.Journal, "err", err)
		} else if n > 0 {
			e.log.Debug("deleted old finished runs from the journal", "journal", o.Journal, "runs", n, "kept", o.KeepRuns)
		}
		return synckeyStatus(res, o.Journal)
	}
	if o.Every == 0 {
		return once(ctx)
	}
	e.log.Info("scheduled sync", "source", o.SourceDir, "target", o.TargetDir, "every", o.Every, "jitter", fmt.Sprintf("%.0f%%", 100*jitter), "journal", o.Journal)
	wake, stopWake := wakeOnSIGUSR1()
	defer stopWake()
	return synckey.Repeat(ctx, synckey.Schedule{Every: o.Every, Jitter: jitter, Wake: wake}, e.log, once)
}

// wakeOnSIGUSR1 turns SIGUSR1 into a wake-up of a scheduled sync: "sync
// now" without waiting for the next tick. A signal during a run makes the
// next wait end at once.
func wakeOnSIGUSR1() (<-chan struct{}, func()) {
	wake := make(chan struct{}, 1)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
	go func() {
		for range sig {
			select {
			case wake <- struct{}{}:
			default:
			}
		}
	}()
	return wake, func() { signal.Stop(sig); close(sig) }
}

// synckeyPair is the two clusters of a sync, each checked to move masked
// objects: only clones do, and a backend without them cannot be one.
func synckeyPair(pr *pair) (synckey.Pair, error) {
	src, err := capable[synckey.Clone](pr.src.dir, pr.src.session, "export masked objects, so it cannot be synced as a clone (use plan and migrate)")
	if err != nil {
		return synckey.Pair{}, err
	}
	dst, err := capable[synckey.Clone](pr.dst.dir, pr.dst.session, "insert masked objects, so it cannot be synced as a clone (use plan and migrate)")
	if err != nil {
		return synckey.Pair{}, err
	}
	return synckey.Pair{Source: src, Target: dst, SourceDir: pr.src.dir, TargetDir: pr.dst.dir}, nil
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return filepath.Clean(p)
}

// synckeyStatus maps a finished sync to the command's error: nil when
// every syncable key is in place.
func synckeyStatus(res synckey.Result, journalPath string) error {
	s := res.Summary
	switch {
	case s.Status == journal.RunInterrupted:
		return errInterrupted
	case s.Failed > 0:
		return fmt.Errorf("%d key(s) failed to sync; see above or keymig journal show --journal %s --state failed; fix the cause and sync again (the next sync retries them)", s.Failed, journalPath)
	case s.Status != journal.RunDone:
		return fmt.Errorf("sync %s ended %s; see keymig journal show --journal %s", s.Run, s.Status, journalPath)
	}
	return nil
}

func synckeyDryRun(ctx context.Context, o synckeyOptions, opts synckey.Options, srcCreds, dstCreds hsm.Credentials, stdout io.Writer) error {
	pr, err := openPairWith(ctx, o.pairOptions, srcCreds, dstCreds)
	if err != nil {
		return err
	}
	defer pr.close(ctx)
	opts.Yes = false
	sp, err := synckeyPair(pr)
	if err != nil {
		return err
	}
	s := synckey.New(sp, nil, opts)
	d, _, _, err := s.Diff(ctx)
	if err != nil {
		return err
	}
	rows := d.Rows
	for i := range rows {
		if rows[i].Mark == clonediff.MarkSource {
			rows[i].Detail = "on the source only: would copy"
		}
	}
	res := synckey.Result{Rows: rows, Summary: synckey.Summary{Run: "dry run", Status: "dry-run", Counts: d.Counts()}}
	if err := printSynckey(stdout, o, res, nil); err != nil {
		return err
	}
	if len(d.Copy) > 0 || o.Prune && len(d.Prune) > 0 {
		return errChangesPending
	}
	return nil
}

// printSynckey prints a sync's rows (all but =) and its summary, or JSON,
// and writes the --combined file.
func printSynckey(w io.Writer, o synckeyOptions, res synckey.Result, runErr error) error {
	if o.Combined != "" && res.Rows != nil {
		var b strings.Builder
		for _, r := range res.Rows {
			fmt.Fprintf(&b, "%s %s %q %s\n", r.Mark, r.Ref, r.Label, r.Detail)
		}
		if err := writeFileAtomic(o.Combined, []byte(b.String()), 0o600, true); err != nil {
			return err
		}
	}
	if o.Output == outputJSON {
		out := struct {
			synckey.Result
			Error string `json:"error,omitempty"`
		}{res, errString(runErr)}
		out.Rows = nonNil(out.Rows)
		return writeJSON(w, out)
	}
	if o.DryRun {
		fmt.Fprintln(w, "dry run: nothing is written to either cluster or a journal")
	}
	if r := res.Resumed; r != nil {
		fmt.Fprintf(w, "resumed %s, which had not finished: %d copied, %d deleted, %d failed (%s)\n", r.Run, r.Copied, r.Deleted, r.Failed, r.Status)
	}
	t := newTable(w)
	var targetOnly int
	for _, r := range res.Rows {
		if r.Mark == clonediff.MarkTarget {
			targetOnly++
		}
		if r.Mark != clonediff.MarkSame {
			t.row(r.Mark, r.Ref.String(), fmt.Sprintf("%q", r.Label), r.Detail)
		}
	}
	t.flush()
	s := res.Summary
	if s.Counts != nil {
		c := s.Counts
		if o.DryRun {
			fmt.Fprintf(w, "%d same, %d to copy, %d only on the target, %d differ, %d cannot sync (%d keys)\n",
				c["="], c["+"], c["-"], c["*"], c["!"], len(res.Rows))
		} else {
			fmt.Fprintf(w, "%s: %s; %d same, %d copied, %d failed, %d only on the target, %d deleted, %d differ, %d cannot sync (%d keys); journal %s\n",
				s.Run, s.Status, c["="], s.Copied, s.Failed, c["-"]-s.Deleted, s.Deleted, c["*"], c["!"], len(res.Rows), res.Journal)
		}
	}
	if o.Prune && !o.Yes && targetOnly > 0 {
		fmt.Fprintf(w, "--prune: %d key(s) above are only on the target; run again with --prune --yes to delete them\n", targetOnly)
	}
	if len(s.Runner.Failures) > 0 {
		fmt.Fprintln(w, "failed keys:")
		fmt.Fprint(w, runner.FormatFailures(s.Runner.Failures, 20))
	}
	return nil
}
