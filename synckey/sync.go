package synckey

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/clonediff"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/runner"
)

// RunKind is the journal run kind of a sync.
const RunKind = "synckey"

// StateInserting is committed just before the masked object is inserted
// into the target: a later attempt knows a previous one may have acted.
const StateInserting = "inserting"

// StateDeleting is committed just before a pruned key is deleted.
const StateDeleting = "deleting"

// Item operations, recorded in each journal item's data.
const (
	OpCopy   = "copy"
	OpDelete = "delete"
)

// Options tune a sync.
type Options struct {
	// Filter selects the keys to compare and copy; the zero Filter selects all.
	Filter hsm.Filter
	// Prune lists the keys only on the target as to be deleted; with Yes
	// they are deleted.
	Prune bool
	// Yes confirms Prune: the keys only on the target are deleted.
	Yes bool
	// Workers bounds the keys copied at once; default 16.
	Workers int
	// CoverageWait bounds the wait for a copied key to reach enough HSMs of
	// the target; default 30s, after which the item is retried.
	CoverageWait time.Duration
	// Backoff is the runner's item retry policy.
	Backoff runner.Backoff
	// Progress shows the copy as it goes; may be nil.
	Progress runner.Progress
	// Log receives what happens; default: discarded.
	Log *slog.Logger
	// Now gives the time for run ids; default time.Now.
	Now func() time.Time
}

// Clone is one side of a sync: a session that moves masked objects, which
// only the HSMs of a cluster and of its clones can read. Pruning also
// needs the target to delete keys (hsm.KeyDeleter), found by assertion.
type Clone interface {
	hsm.Session
	hsm.Masker
}

// Pair is the two logged-in clusters of a sync and their directories (or
// other names), used in messages.
type Pair struct {
	Source, Target       Clone
	SourceDir, TargetDir string
}

// Meta describes a sync run in the journal. It holds no secret.
type Meta struct {
	Source    string `json:"source-cluster-id"`
	Target    string `json:"target-cluster-id"`
	SourceDir string `json:"source-dir"`
	TargetDir string `json:"target-dir"`
	Filter    string `json:"filter"`
	Prune     bool   `json:"prune,omitempty"`
}

// Summary is what one sync run did; it is the run's summary in the journal.
type Summary struct {
	Run      string         `json:"run"`
	Status   string         `json:"status"`
	Counts   map[string]int `json:"counts"` // rows of each mark before copying
	Copied   int            `json:"copied"`
	Deleted  int            `json:"deleted"`
	Failed   int            `json:"failed"`
	Error    string         `json:"error,omitempty"` // why the run failed as a whole
	Runner   runner.Summary `json:"runner"`
	Resumed  bool           `json:"resumed"`
	Started  time.Time      `json:"started"`
	Duration time.Duration  `json:"duration-ns"`
}

// Clean reports whether the run finished and every key it tried is in
// place: the state in which a scheduled sync exits 0.
func (s Summary) Clean() bool { return s.Status == journal.RunDone }

// String is the one-line summary logged and kept as the run's event.
func (s Summary) String() string {
	c := s.Counts
	line := fmt.Sprintf("%s: %s; %d same, %d copied, %d deleted, %d failed, %d only on the target, %d differ, %d cannot sync",
		s.Run, s.Status, c[clonediff.MarkSame], s.Copied, s.Deleted, s.Failed, c[clonediff.MarkTarget]-s.Deleted, c[clonediff.MarkDiffer], c[clonediff.MarkError])
	if s.Error != "" {
		line += ": " + s.Error
	}
	return line
}

// Result is a sync's outcome: the run resumed first (if one was left
// unfinished), the new run, and the diff with each row's outcome.
type Result struct {
	Journal string          `json:"journal"`
	Resumed *Summary        `json:"resumed,omitempty"`
	Summary Summary         `json:"summary"`
	Rows    []clonediff.Row `json:"keys"`
}

// itemData is what a journal item remembers of its key, so that a resumed
// run needs no diff to know what it was copying.
type itemData struct {
	Op    string    `json:"op"`
	Label string    `json:"label"`
	Class hsm.Class `json:"class"`
	Owner string    `json:"owner"`
	KCV   hsm.Bytes `json:"kcv"`
}

// Syncer runs syncs of one pair into one journal.
type Syncer struct {
	pair Pair
	j    *journal.Journal
	opts Options
	log  *slog.Logger
	need int
}

// New prepares syncs of p recorded in j. The caller owns both sessions and
// the journal.
func New(p Pair, j *journal.Journal, opts Options) *Syncer {
	if opts.Workers <= 0 {
		opts.Workers = 16
	}
	if opts.CoverageWait <= 0 {
		opts.CoverageWait = 30 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Syncer{pair: p, j: j, opts: opts, log: log}
}

// Diff compares the two clusters now and changes nothing.
func (s *Syncer) Diff(ctx context.Context) (*clonediff.Diff, hsm.Inventory, hsm.Inventory, error) {
	src, err := hsm.TakeInventory(ctx, s.pair.Source, s.pair.SourceDir)
	if err != nil {
		return nil, src, hsm.Inventory{}, err
	}
	dst, err := hsm.TakeInventory(ctx, s.pair.Target, s.pair.TargetDir)
	if err != nil {
		return nil, src, dst, err
	}
	if err := clonediff.CheckClones(src.Info, dst.Info, s.pair.SourceDir, s.pair.TargetDir); err != nil {
		return nil, src, dst, err
	}
	return clonediff.Compare(src, dst, s.opts.Filter, s.opts.Prune), src, dst, nil
}

// Sync resumes the pair's unfinished run, if any, then diffs the clusters
// and copies every + key (and deletes every - key if pruning) as a new run.
// A run that fails as a whole (a cluster unreachable) is recorded as failed
// with its error, which Sync also returns; keys that fail are recorded in
// the run and returned in the result, not as an error.
func (s *Syncer) Sync(ctx context.Context) (Result, error) {
	res := Result{Journal: s.j.Path()}
	srcInfo, err := s.pair.Source.Info(ctx)
	if err != nil {
		return res, fmt.Errorf("source cluster %s: %w", s.pair.SourceDir, err)
	}
	dstInfo, err := s.pair.Target.Info(ctx)
	if err != nil {
		return res, fmt.Errorf("target cluster %s: %w", s.pair.TargetDir, err)
	}
	if err := clonediff.CheckClones(srcInfo, dstInfo, s.pair.SourceDir, s.pair.TargetDir); err != nil {
		return res, err
	}
	meta := Meta{Source: srcInfo.ID, Target: dstInfo.ID, SourceDir: s.pair.SourceDir, TargetDir: s.pair.TargetDir, Filter: s.opts.Filter.String(), Prune: s.opts.Prune && s.opts.Yes}
	unfinished, err := s.checkJournal(meta)
	if err != nil {
		return res, err
	}
	if unfinished != "" {
		sum, err := s.resume(ctx, unfinished, dstInfo)
		res.Resumed = &sum
		if err != nil || sum.Status == journal.RunInterrupted {
			res.Summary = sum
			return res, err
		}
	}
	sum, rows, err := s.fresh(ctx, meta, dstInfo)
	res.Summary, res.Rows = sum, rows
	return res, err
}

// checkJournal refuses a journal that holds syncs of another pair, and
// returns the id of the newest unfinished (running or interrupted) run.
func (s *Syncer) checkJournal(meta Meta) (string, error) {
	runs, err := s.j.Runs()
	if err != nil {
		return "", err
	}
	unfinished := ""
	for _, r := range runs {
		if r.Kind != RunKind {
			return "", fmt.Errorf("journal %s holds a %s run (%s), not syncs: give synckey a journal of its own", s.j.Path(), r.Kind, r.ID)
		}
		var m Meta
		if err := json.Unmarshal(r.Meta, &m); err != nil {
			return "", fmt.Errorf("journal %s: run %s: %w", s.j.Path(), r.ID, journal.ErrFormat)
		}
		if m.Source != meta.Source || m.Target != meta.Target {
			return "", fmt.Errorf("journal %s records syncs from %s to %s, not from %s (%s) to %s (%s): give this pair a journal of its own",
				s.j.Path(), m.Source, m.Target, meta.Source, s.pair.SourceDir, meta.Target, s.pair.TargetDir)
		}
		switch r.Status {
		case journal.RunRunning, journal.RunInterrupted:
			unfinished = r.ID
		default:
			unfinished = "" // a later finished run supersedes an older unfinished one
		}
	}
	return unfinished, nil
}

// resume drives the items of an unfinished run to the end, with no new diff.
func (s *Syncer) resume(ctx context.Context, id string, dstInfo hsm.ClusterInfo) (Summary, error) {
	r, info, err := s.j.Run(id)
	if err != nil {
		return Summary{}, err
	}
	sum := Summary{Run: id, Resumed: true, Started: s.opts.Now().UTC()}
	if len(info.Summary) > 0 && string(info.Summary) != "null" {
		var prev Summary
		if json.Unmarshal(info.Summary, &prev) == nil {
			sum.Counts = prev.Counts
		}
	}
	if sum.Counts == nil {
		sum.Counts = map[string]int{}
	}
	if _, _, _, err := s.j.Begin(id, RunKind, nil); err != nil { // marks it running again
		return sum, err
	}
	s.log.Info("resuming a sync that did not finish", "run", id, "journal", s.j.Path())
	r.Event("resume", "resumed: the run did not finish")
	return s.execute(ctx, r, sum, dstInfo)
}

// fresh diffs the clusters and runs the + (and pruned -) keys as a new run.
func (s *Syncer) fresh(ctx context.Context, meta Meta, dstInfo hsm.ClusterInfo) (Summary, []clonediff.Row, error) {
	now := s.opts.Now().UTC()
	id := "sync-" + now.Format("20060102T150405.000000000Z")
	sum := Summary{Run: id, Started: now, Counts: map[string]int{}}
	r, _, existed, err := s.j.Begin(id, RunKind, meta)
	if err != nil {
		return sum, nil, err
	}
	if existed {
		return sum, nil, fmt.Errorf("journal %s already has a run %s: the clock went back; wait a moment and sync again", s.j.Path(), id)
	}
	fail := func(err error) (Summary, []clonediff.Row, error) {
		sum.Status, sum.Error, sum.Duration = journal.RunFailed, err.Error(), time.Since(now)
		if ctx.Err() != nil {
			sum.Status = journal.RunInterrupted
		}
		s.record(r, sum)
		return sum, nil, err
	}
	d, _, dst, err := s.Diff(ctx)
	if err != nil {
		return fail(err)
	}
	sum.Counts = d.Counts()
	items := make([]journal.Item, 0, len(d.Copy)+len(d.Prune))
	for _, k := range d.Copy {
		items = append(items, newItem(OpCopy, k))
	}
	if s.opts.Prune && s.opts.Yes {
		for _, k := range d.Prune {
			items = append(items, newItem(OpDelete, k))
		}
	}
	if _, err := r.AddItems(items); err != nil {
		return fail(fmt.Errorf("journal %s: %w", s.j.Path(), err))
	}
	sum, err = s.execute(ctx, r, sum, dst.Info)
	return sum, s.outcome(d.Rows, r), err
}

func newItem(op string, k hsm.KeyInfo) journal.Item {
	data, _ := json.Marshal(itemData{Op: op, Label: k.Label, Class: k.Class, Owner: k.Owner, KCV: k.KCV})
	return journal.Item{Key: k.Ref.String(), State: runner.StatePending, Data: data}
}

// execute runs the items of r that are not done and records the summary.
func (s *Syncer) execute(ctx context.Context, r *journal.Run, sum Summary, dstInfo hsm.ClusterInfo) (Summary, error) {
	start := time.Now()
	finish := func(status string, err error) (Summary, error) {
		sum.Status, sum.Duration = status, time.Since(start)
		if err != nil {
			sum.Error = err.Error()
		}
		s.countDone(r, &sum)
		s.record(r, sum)
		return sum, err
	}
	pending := 0
	r.Items(func(it journal.Item) error {
		if it.State != runner.StateDone {
			pending++
		}
		return nil
	})
	if pending > 0 {
		if err := targetReachable(dstInfo, s.pair.TargetDir); err != nil {
			return finish(journal.RunFailed, err)
		}
	}
	s.need = min(2, max(1, len(dstInfo.HSMs)))
	rs, err := runner.Run(ctx, runner.Config{
		Run:      r,
		Workers:  s.opts.Workers,
		Process:  s.process,
		Backoff:  s.opts.Backoff,
		Progress: s.opts.Progress,
	})
	sum.Runner = rs
	sum.Failed = rs.Failed
	switch {
	case err != nil:
		return finish(journal.RunFailed, err)
	case rs.Interrupted || rs.Pending > 0:
		return finish(journal.RunInterrupted, nil)
	case rs.Failed > 0:
		return finish(journal.RunFailed, nil)
	}
	return finish(journal.RunDone, nil)
}

// targetReachable fails a run up front when fewer HSMs of the target
// answer than a copied key must reach: a copy then would sit on one HSM,
// unusable under the key availability quorum, until the others return.
func targetReachable(info hsm.ClusterInfo, dir string) error {
	need := min(2, max(1, len(info.HSMs)))
	var down []string
	active := 0
	for _, h := range info.HSMs {
		if h.State == "active" {
			active++
		} else {
			down = append(down, h.ID)
		}
	}
	if active >= need {
		return nil
	}
	return hsm.Errorf(hsm.CodeUnavailable, "synckey", 0,
		"target cluster %s (%s, %s): %d of %d HSMs answer (%v down), and a copied key must reach %d; nothing was copied — the next sync tries again once the HSMs are back",
		dir, info.ID, info.Region, active, len(info.HSMs), down, need)
}

// countDone fills Copied and Deleted from the run's items.
func (s *Syncer) countDone(r *journal.Run, sum *Summary) {
	sum.Copied, sum.Deleted = 0, 0
	r.Items(func(it journal.Item) error {
		if it.State != runner.StateDone {
			return nil
		}
		var d itemData
		json.Unmarshal(it.Data, &d)
		if d.Op == OpDelete {
			sum.Deleted++
		} else {
			sum.Copied++
		}
		return nil
	})
}

// record keeps the summary in the journal, as the run's summary and as an
// event, and logs it.
func (s *Syncer) record(r *journal.Run, sum Summary) {
	if err := r.Finish(sum.Status, sum); err != nil {
		s.log.Error("recording the sync's summary", "journal", s.j.Path(), "err", err)
	}
	r.Event("summary", "%s", sum.String())
	attrs := []any{"run", sum.Run, "status", sum.Status, "same", sum.Counts[clonediff.MarkSame], "copied", sum.Copied,
		"deleted", sum.Deleted, "failed", sum.Failed, "target-only", sum.Counts[clonediff.MarkTarget] - sum.Deleted,
		"differ", sum.Counts[clonediff.MarkDiffer], "cannot-sync", sum.Counts[clonediff.MarkError], "duration", sum.Duration.Round(time.Millisecond)}
	switch {
	case sum.Error != "":
		s.log.Error("sync run failed", append(attrs, "err", sum.Error)...)
	case sum.Status == journal.RunDone:
		s.log.Info("sync run finished", attrs...)
	default:
		s.log.Warn("sync run did not finish", attrs...)
	}
}

// outcome rewrites the + and - rows with what the run did to each key.
func (s *Syncer) outcome(rows []clonediff.Row, r *journal.Run) []clonediff.Row {
	items := map[string]journal.Item{}
	r.Items(func(it journal.Item) error { items[it.Key] = it; return nil })
	for i := range rows {
		it, ok := items[rows[i].Ref.String()]
		if !ok {
			continue
		}
		switch {
		case it.State == runner.StateDone && rows[i].Mark == clonediff.MarkSource:
			rows[i].Detail = "copied"
		case it.State == runner.StateDone:
			rows[i].Detail = "deleted from the target (pruned)"
		case it.LastError != "":
			rows[i].Detail = "failed: " + it.LastError
		default:
			rows[i].Detail = "not done yet: the next sync resumes it"
		}
	}
	return rows
}

// process drives one item. Any state but pending means a previous attempt
// may have acted; both steps are safe to repeat (the insert is idempotent
// for the same key under the same handle, a delete of a gone key is done).
func (s *Syncer) process(ctx context.Context, it journal.Item, commit runner.Commit) (journal.Item, error) {
	ref, err := hsm.ParseKeyRef(it.Key)
	if err != nil {
		return it, fmt.Errorf("journal %s: item %q is not a key handle: %w", s.j.Path(), it.Key, err)
	}
	var d itemData
	if err := json.Unmarshal(it.Data, &d); err != nil {
		return it, fmt.Errorf("journal %s: item %s: %w", s.j.Path(), it.Key, journal.ErrFormat)
	}
	name := fmt.Sprintf("key %s (label %q)", ref, d.Label)
	if d.Op == OpDelete {
		return s.prune(ctx, it, commit, ref, d, name)
	}
	blob, err := s.pair.Source.ExportMasked(ctx, ref)
	if err != nil {
		return it, s.explain(err, name, "masked export from the source "+s.pair.SourceDir, d)
	}
	defer clear(blob)
	if it.State == runner.StatePending {
		it.State = StateInserting
		if err := commit(it); err != nil {
			return it, err
		}
	}
	if err := failpoint.Hit(failpoint.SynckeyAfterInserting); err != nil {
		return it, err
	}
	if _, err := s.pair.Target.InsertMasked(ctx, blob); err != nil {
		return it, s.explain(err, name, "masked insert into the target "+s.pair.TargetDir, d)
	}
	if err := failpoint.Hit(failpoint.SynckeyAfterInsert); err != nil {
		return it, err
	}
	if err := s.verify(ctx, ref, d, name); err != nil {
		return it, err
	}
	it.State = runner.StateDone
	it.Result = ref.String()
	return it, nil
}

// verify reads the copy back: the same check value, on enough HSMs.
func (s *Syncer) verify(ctx context.Context, ref hsm.KeyRef, d itemData, name string) error {
	deadline := time.Now().Add(s.opts.CoverageWait)
	delay := 5 * time.Millisecond
	for {
		k, err := s.pair.Target.GetKey(ctx, ref)
		if err != nil {
			return fmt.Errorf("%s: reading the copy back from the target %s: %w", name, s.pair.TargetDir, err)
		}
		if !slices.Equal(k.KCV, d.KCV) {
			return fmt.Errorf("%s: the target %s holds check value %s under this handle, the source had %s; it is left as is: look at both keys", name, s.pair.TargetDir, k.KCV, d.KCV)
		}
		if k.Coverage.Count() >= s.need || len(k.Coverage.HSMs) == 0 && s.need <= 1 {
			return nil
		}
		if time.Now().After(deadline) {
			return runner.Later(hsm.Errorf(hsm.CodeQuorum, "synckey", ref, "%s is on %d HSM(s) of the target %s, not yet %d (%s); it will be checked again",
				name, k.Coverage.Count(), s.pair.TargetDir, s.need, k.Coverage))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 500*time.Millisecond)
	}
}

// prune deletes a key only on the target, if it is still the key the diff saw.
func (s *Syncer) prune(ctx context.Context, it journal.Item, commit runner.Commit, ref hsm.KeyRef, d itemData, name string) (journal.Item, error) {
	del, err := hsm.As[hsm.KeyDeleter](s.pair.Target, "delete keys")
	if err != nil {
		return it, fmt.Errorf("%s: the target %s: %w", name, s.pair.TargetDir, err)
	}
	k, err := s.pair.Target.GetKey(ctx, ref)
	if errors.Is(err, hsm.ErrNotFound) {
		it.State = runner.StateDone
		return it, nil
	}
	if err != nil {
		return it, fmt.Errorf("%s: looking at it on the target %s before deleting it: %w", name, s.pair.TargetDir, err)
	}
	if !slices.Equal(k.KCV, d.KCV) {
		return it, fmt.Errorf("%s changed on the target %s since the diff (check value %s, was %s); not deleted", name, s.pair.TargetDir, k.KCV, d.KCV)
	}
	if it.State == runner.StatePending {
		it.State = StateDeleting
		if err := commit(it); err != nil {
			return it, err
		}
	}
	if err := failpoint.Hit(failpoint.SynckeyAfterDeleting); err != nil {
		return it, err
	}
	if err := del.DeleteKey(ctx, ref); err != nil && !errors.Is(err, hsm.ErrNotFound) {
		if hsm.CodeOf(err) == hsm.CodePermission {
			return it, fmt.Errorf("%s: delete from the target %s: %w — only its owner %s may delete it (a crypto officer may not): prune logged in to the target as %s", name, s.pair.TargetDir, err, d.Owner, d.Owner)
		}
		return it, s.explain(err, name, "delete from the target "+s.pair.TargetDir, d)
	}
	it.State = runner.StateDone
	return it, nil
}

// explain restates an HSM error with what to do about it.
func (s *Syncer) explain(err error, name, step string, d itemData) error {
	wrapped := fmt.Errorf("%s: %s: %w", name, step, err)
	switch hsm.CodeOf(err) {
	case hsm.CodePermission:
		return fmt.Errorf("%w — log in as a crypto officer or as the key's owner %s (KEYMIG_SOURCE_PIN, KEYMIG_TARGET_PIN)", wrapped, d.Owner)
	case hsm.CodeExists:
		return fmt.Errorf("%w — the target's handle or id holds another key; keymig never overwrites a key", wrapped)
	case hsm.CodeIntegrity:
		return fmt.Errorf("%w — the clusters do not share a masking key: are they clones?", wrapped)
	}
	return wrapped
}
