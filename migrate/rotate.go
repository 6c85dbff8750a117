package migrate

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/runner"
)

// Rotation is what the rotate items of a plan need: sessions (lanes) on
// each cluster to re-encrypt data keys with, and how to show progress.
type Rotation struct {
	// Lanes opens the sessions of the re-encryption on each cluster. It is
	// called once, by the first rotate item that runs, so a run with no
	// rotation left logs in no more than it must; the caller closes them.
	Lanes func(ctx context.Context) (src, dst rotate.Side, err error)
	// Workers is the number of data keys in flight; default 64.
	Workers int
	// Progress makes the progress reporter of one rotation; may be nil.
	Progress func(pi plan.Item) runner.Progress
	// OnError is what a rotation does with a data key that fails (one that
	// does not unwrap under the old master): rotate.Stop (default) fails
	// the item, rotate.Skip sets it aside in RejectsPath and goes on.
	OnError rotate.OnError
	// OpenTable opens the data-key table of a rotate item planned with a
	// table's address (plan.DataKeys.Table); close releases it. Nil when
	// the plan has no table.
	OpenTable func(ctx context.Context, address string) (t rotate.Table, close func(), err error)
	// SkipAdvice tells a user how to ask for bad data keys to be set
	// aside (the CLI names its flag); default "let migrate set such
	// records aside".
	SkipAdvice string

	once     sync.Once
	src, dst rotate.Side
	err      error
}

func (ro *Rotation) lanes(ctx context.Context) (src, dst rotate.Side, err error) {
	ro.once.Do(func() { ro.src, ro.dst, ro.err = ro.Lanes(ctx) })
	return ro.src, ro.dst, ro.err
}

// rotateItem makes the new master of a rotate item on the target (once,
// like any key: acting is committed first and a retry looks for it) and
// re-encrypts the item's data keys under it, a resumable rotation in the
// same journal. The old master is never changed.
func (m *Migration) rotateItem(ctx context.Context, pi plan.Item, it journal.Item, commit runner.Commit) (journal.Item, error) {
	dk := pi.Rotation
	if dk == nil {
		return it, fmt.Errorf("key %s (label %q): planned for rotation without a data-key file: re-plan with its data-key file", pi.Ref, pi.Label)
	}
	ro := m.opts.Rotation
	if ro == nil {
		return it, fmt.Errorf("key %s (label %q): no sessions were opened for re-encrypting its data keys", pi.Ref, pi.Label)
	}
	master, err := m.findNewMaster(ctx, pi)
	if err != nil {
		return it, err
	}
	if master == nil {
		if master, err = m.makeNewMaster(ctx, pi, it, commit); err != nil {
			return it, err
		}
	} else if it.State != runner.StatePending || pi.TargetRef != 0 {
		m.adopted.Add(1)
		m.log.Info("taking up the new master found on the target", "key", pi.Ref, "label", pi.Label, "target", master.Ref)
	}
	if err := m.share(ctx, pi, master.Ref); err != nil {
		return it, err
	}
	if err := m.waitCoverage(ctx, pi, *master); err != nil {
		return it, err
	}

	src, dst, err := ro.lanes(ctx)
	if err != nil {
		return it, fmt.Errorf("key %s (label %q): opening sessions to re-encrypt its data keys: %w", pi.Ref, pi.Label, err)
	}
	if dk.Table {
		return m.rotateTable(ctx, pi, it, *master, src, dst)
	}
	m.log.Info("re-encrypting data keys under the new master", "key", pi.Ref, "label", pi.Label, "new-master", master.Ref, "records", dk.Records, "in", dk.In, "out", dk.Out)
	cfg := rotate.Config{
		Source: src, Target: &dst,
		From: hsm.Filter{Ref: pi.Ref}, To: hsm.Filter{Ref: master.Ref},
		In: dk.In, Out: dk.Out, Rejects: RejectsPath(dk), OnError: ro.OnError, Workers: ro.Workers,
		WantSHA256: dk.SHA256, Log: m.log,
	}
	if ro.Progress != nil {
		cfg.Progress = ro.Progress(pi)
	}
	rep, err := rotate.Run(ctx, m.run.Journal(), cfg)
	var rec *rotate.RecordError
	switch {
	case errors.As(err, &rec):
		advice := ro.SkipAdvice
		if advice == "" {
			advice = "let migrate set such records aside"
		}
		return it, fmt.Errorf("key %s (label %q): data-key file %s; fix the record and re-plan, or %s in %s",
			pi.Ref, pi.Label, rec.Problem(), advice, RejectsPath(dk))
	case errors.Is(err, rotate.ErrInputChanged):
		return it, fmt.Errorf("key %s (label %q): %w", pi.Ref, pi.Label, err)
	case err != nil:
		return it, fmt.Errorf("key %s (label %q): re-encrypting its data keys: %w", pi.Ref, pi.Label, err)
	case rep.Summary.Interrupted:
		if err := context.Cause(ctx); err != nil {
			return it, err
		}
		return it, fmt.Errorf("key %s (label %q): the re-encryption of %s was interrupted; it resumes on the next run", pi.Ref, pi.Label, dk.In)
	case !rep.Finished:
		return it, fmt.Errorf("key %s (label %q): the re-encryption of %s did not finish (%d batch(es) failed); it resumes on the next run", pi.Ref, pi.Label, dk.In, max(1, rep.Summary.Failed))
	}
	if err := failpoint.Hit(failpoint.MigrateBeforeDone); err != nil {
		return it, err
	}
	m.dataKeys.Add(rep.Rotated)
	m.dataKeysRejected.Add(rep.Rejected)
	it.State = runner.StateDone
	it.Result = fmt.Sprintf("%s; %d data keys re-encrypted into %s", master.Ref, rep.Rotated, dk.Out)
	if rep.Rejected > 0 {
		it.Result += fmt.Sprintf(", %d set aside in %s", rep.Rejected, RejectsPath(dk))
		m.log.Warn("data keys that did not unwrap under the old master were set aside", "key", pi.Ref, "label", pi.Label, "rejected", rep.Rejected, "rejects", RejectsPath(dk))
	}
	return it, nil
}

// findNewMaster looks on the target for the new master of a rotate item:
// its label, id, class and type, owned by the target user, another check
// value. More than one is an error a person must look at.
func (m *Migration) findNewMaster(ctx context.Context, pi plan.Item) (*hsm.KeyInfo, error) {
	hits, err := m.targetKeys(ctx, pi, "its new master", func(k hsm.KeyInfo, me string) bool { return pi.IsNewMaster(k, me) })
	if err != nil || len(hits) <= 1 {
		return first(hits), err
	}
	where := pi.Rotation.Out + " (or its .partial)"
	if pi.Rotation.Table {
		where = "the master-KCV column of " + pi.Rotation.In
	}
	return nil, fmt.Errorf("key %s (label %q): the target holds %d candidate new masters (%s); the data keys rotated so far name their master's check value in %s: keep that key, delete the others, then run migrate again",
		pi.Ref, pi.Label, len(hits), refs(hits), where)
}

// makeNewMaster generates the new master: the old key's label, id and
// attributes, new key material.
func (m *Migration) makeNewMaster(ctx context.Context, pi plan.Item, it journal.Item, commit runner.Commit) (*hsm.KeyInfo, error) {
	it.State = StateActing
	if err := commit(it); err != nil {
		return nil, err
	}
	if err := failpoint.Hit(failpoint.MigrateAfterActing); err != nil {
		return nil, err
	}
	k, err := m.dst.GenerateKey(ctx, hsm.KeySpec{Type: pi.Type, Bits: pi.Bits, Template: template(pi)})
	if errors.Is(err, hsm.ErrExists) && it.Attempts > 1 {
		// As in move: an earlier attempt's answer may have been lost.
		return nil, runner.Later(fmt.Errorf("key %s (label %q): the target already holds a key with its id, probably the new master from an earlier attempt; looking for it again (%w)", pi.Ref, pi.Label, err))
	}
	if err != nil {
		return nil, laterIfQuorum(fmt.Errorf("key %s (label %q): making the new master on the target: %w", pi.Ref, pi.Label, err))
	}
	m.log.Info("made the new master on the target", "key", pi.Ref, "label", pi.Label, "new-master", k.Ref, "kcv", k.KCV.String())
	return &k, failpoint.Hit(failpoint.MigrateAfterTargetUnwrap)
}

// rotateTable re-encrypts the rows of a rotate item's data-key table
// under its new master: rotate.RunTable, in the migration's journal, so a
// killed run resumes the table where it stopped.
func (m *Migration) rotateTable(ctx context.Context, pi plan.Item, it journal.Item, master hsm.KeyInfo, src, dst rotate.Side) (journal.Item, error) {
	ro, dk := m.opts.Rotation, pi.Rotation
	if ro.OpenTable == nil {
		return it, fmt.Errorf("key %s (label %q): its data keys are in a table, and this migration cannot open one", pi.Ref, pi.Label)
	}
	tb, closeTable, err := ro.OpenTable(ctx, dk.In)
	if err != nil {
		return it, fmt.Errorf("key %s (label %q): %w", pi.Ref, pi.Label, err)
	}
	defer closeTable()
	m.log.Info("re-encrypting the data keys of a table under the new master", "key", pi.Ref, "label", pi.Label, "new-master", master.Ref, "rows", dk.Records, "table", tb.String())
	cfg := rotate.TableConfig{
		Source: src, Target: &dst, From: hsm.Filter{Ref: pi.Ref}, To: hsm.Filter{Ref: master.Ref},
		Table: tb, OnError: ro.OnError, Workers: ro.Workers, Log: m.log,
	}
	if ro.Progress != nil {
		cfg.Progress = ro.Progress(pi)
	}
	rep, err := rotate.RunTable(ctx, m.run.Journal(), cfg)
	if len(rep.Rejects) > 0 {
		if werr := rotate.WriteTableRejects(RejectsPath(dk), rep.Rejects); werr != nil && err == nil {
			err = werr
		}
	}
	var re *rotate.RowError
	switch {
	case errors.As(err, &re):
		advice := ro.SkipAdvice
		if advice == "" {
			advice = "let migrate set such rows aside"
		}
		return it, fmt.Errorf("key %s (label %q): %v; fix the row, or %s (their keys go to %s)", pi.Ref, pi.Label, err, advice, RejectsPath(dk))
	case err != nil && ctx.Err() != nil:
		return it, context.Cause(ctx)
	case err != nil:
		return it, fmt.Errorf("key %s (label %q): re-encrypting its data keys: %w", pi.Ref, pi.Label, err)
	}
	if err := failpoint.Hit(failpoint.MigrateBeforeDone); err != nil {
		return it, err
	}
	m.dataKeys.Add(rep.Rotated)
	m.dataKeysRejected.Add(rep.Rejected)
	it.State = runner.StateDone
	it.Result = fmt.Sprintf("%s; %d rows re-encrypted in %s (%d already)", master.Ref, rep.Rotated, tb, rep.Already)
	if rep.Rejected > 0 {
		it.Result += fmt.Sprintf(", %d set aside in %s", rep.Rejected, RejectsPath(dk))
		m.log.Warn("rows that did not unwrap under the old master were set aside", "key", pi.Ref, "label", pi.Label, "rejected", rep.Rejected, "rejects", RejectsPath(dk))
	}
	return it, nil
}
