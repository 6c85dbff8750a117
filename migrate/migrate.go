package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/runner"
)

// Item states in the journal, beyond the runner's pending, done and failed.
const (
	StateActing  = "acting"  // committed just before the non-idempotent target call
	StateBlocked = "blocked" // planned as blocked; final
)

// RunKind is the journal run kind of a migration.
const RunKind = "migrate"

// Options tune a migration run.
type Options struct {
	Workers     int
	MaxKeys     int
	MaxDuration time.Duration
	Progress    runner.Progress
	Log         *slog.Logger
	// CoverageWait bounds the wait for a new key to reach enough HSMs of
	// the target; default 30s, after which the item is retried later.
	CoverageWait time.Duration
	// Backoff is the runner's item retry policy.
	Backoff runner.Backoff
	// Rotation serves the plan's rotate items; nil if it has none.
	Rotation *Rotation
}

// Report is what a run did, for the summary and the journal.
type Report struct {
	Plan      string         `json:"plan-digest"`
	Transport string         `json:"transport"`
	Resumed   bool           `json:"resumed"`
	Finished  bool           `json:"finished"` // nothing was left to do
	Summary   runner.Summary `json:"summary"`
	Skipped   int            `json:"skipped"`
	Blocked   int            `json:"blocked"`
	Adopted   int            `json:"adopted"` // keys found on the target after a crash and taken as done
	DataKeys  int64          `json:"data-keys-rotated,omitempty"`
	Rejected  int64          `json:"data-keys-rejected,omitempty"`
}

// Migration is one plan being applied.
type Migration struct {
	plan     *plan.Plan
	src      hsm.Session
	dst      hsm.Session
	items    map[string]plan.Item
	opts     Options
	log      *slog.Logger
	tr       *transport
	need     int // HSMs a new key must reach
	adopted  atomic.Int64
	dataKeys atomic.Int64 // data keys re-encrypted by rotate items
	// dataKeysRejected counts data keys rotate items set aside.
	dataKeysRejected atomic.Int64
	run              *journal.Run
}

// New prepares the migration of p between src and dst.
func New(p *plan.Plan, src, dst hsm.Session, opts Options) *Migration {
	m := &Migration{plan: p, src: src, dst: dst, opts: opts, items: make(map[string]plan.Item, len(p.Items))}
	for _, it := range p.Items {
		m.items[it.Key()] = it
	}
	m.log = opts.Log
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if m.opts.CoverageWait <= 0 {
		m.opts.CoverageWait = 30 * time.Second
	}
	return m
}

// Seed records every plan item in the run, leaving items already there
// untouched, and reports whether any work remains.
func Seed(r *journal.Run, p *plan.Plan) (remaining int, err error) {
	items := make([]journal.Item, 0, len(p.Items))
	for _, it := range p.Items {
		st := runner.StatePending
		switch it.Action {
		case plan.Skip:
			st = runner.StateSkipped
		case plan.Blocked:
			st = StateBlocked
		}
		items = append(items, journal.Item{Key: it.Key(), State: st})
	}
	if _, err := r.AddItems(items); err != nil {
		return 0, err
	}
	counts, err := r.Counts()
	if err != nil {
		return 0, err
	}
	for st, n := range counts {
		if !isFinal(st) {
			remaining += n
		}
	}
	return remaining, nil
}

func isFinal(state string) bool {
	return state == runner.StateDone || state == runner.StateSkipped || state == StateBlocked
}

// Run executes the migration as run r of the journal. The clusters must
// have been checked against the plan (plan.CheckFresh) by the caller.
func (m *Migration) Run(ctx context.Context, r *journal.Run) (Report, error) {
	rep := Report{Plan: m.plan.Digest, Transport: string(m.plan.Transport.Method)}
	m.run = r
	remaining, err := Seed(r, m.plan)
	if err != nil {
		return rep, err
	}
	if remaining == 0 {
		rep.Finished = true
		return m.finish(r, rep)
	}
	info, err := m.dst.Info(ctx)
	if err != nil {
		return rep, fmt.Errorf("target cluster: %w", err)
	}
	m.need = min(2, max(1, len(info.HSMs)))
	if m.needsTransport(r) {
		tr, err := setupTransport(ctx, m.src, m.dst, m.plan)
		if err != nil {
			return rep, err
		}
		m.tr = tr
		defer tr.close(context.WithoutCancel(ctx), m.log)
	}
	sum, err := runner.Run(ctx, runner.Config{
		Run:         r,
		Workers:     m.opts.Workers,
		Process:     m.process,
		Backoff:     m.opts.Backoff,
		Final:       []string{runner.StateDone, runner.StateSkipped, StateBlocked},
		MaxItems:    m.opts.MaxKeys,
		MaxDuration: m.opts.MaxDuration,
		Progress:    m.opts.Progress,
	})
	rep.Summary = sum
	rep.Adopted = int(m.adopted.Load())
	rep.DataKeys, rep.Rejected = m.dataKeys.Load(), m.dataKeysRejected.Load()
	if err != nil {
		return rep, err
	}
	return m.finish(r, rep)
}

func (m *Migration) finish(r *journal.Run, rep Report) (Report, error) {
	counts, err := r.Counts()
	if err != nil {
		return rep, err
	}
	rep.Skipped, rep.Blocked = counts[runner.StateSkipped], counts[StateBlocked]
	if rep.Finished {
		rep.Summary.Total = len(m.plan.Items)
		rep.Summary.Already = rep.Summary.Total
		rep.Summary.States = counts
	}
	status := journal.RunDone
	switch {
	case rep.Summary.Interrupted:
		status = journal.RunInterrupted
	case rep.Summary.Failed > 0 || counts[runner.StateFailed] > 0:
		status = journal.RunFailed
	case rep.Summary.Pending > 0:
		status = journal.RunInterrupted // stopped by --max-keys or --max-duration
	}
	return rep, r.Finish(status, rep)
}

// needsTransport reports whether any unfinished item wraps keys.
func (m *Migration) needsTransport(r *journal.Run) bool {
	need := false
	r.Items(func(it journal.Item) error {
		if !isFinal(it.State) {
			switch m.items[it.Key].Method {
			case plan.MethodRSAAES, plan.MethodRSAOAEP, plan.MethodSessionKEK:
				need = true
				return errStop
			}
		}
		return nil
	})
	return need
}

var errStop = errors.New("stop")

// process drives one item; see the package doc for the exactly-once rule.
func (m *Migration) process(ctx context.Context, it journal.Item, commit runner.Commit) (journal.Item, error) {
	pi, ok := m.items[it.Key]
	if !ok {
		return it, fmt.Errorf("journal item %s is not in the plan: the journal belongs to another plan", it.Key)
	}
	if pi.Action == plan.Rotate {
		return m.rotateItem(ctx, pi, it, commit)
	}
	var target hsm.KeyInfo
	if it.State != runner.StatePending {
		found, err := m.lookOnTarget(ctx, pi)
		if err != nil {
			return it, err
		}
		if found != nil {
			m.adopted.Add(1)
			m.log.Info("adopting key found on the target after an interrupted attempt", "key", pi.Ref, "label", pi.Label, "target", found.Ref)
			target = *found
		}
	}
	if target.Ref == 0 {
		var err error
		target, err = m.move(ctx, pi, it, commit)
		if err != nil {
			return it, err
		}
	}
	if !slices.Equal(target.KCV, pi.KCV) {
		// A key with the wrong check value must not stay on the target.
		derr := deleteKey(context.WithoutCancel(ctx), m.dst, target.Ref)
		msg := fmt.Sprintf("key %s (label %q): the target key %s has check value %s, the source key %s; the target key was deleted",
			pi.Ref, pi.Label, target.Ref, target.KCV, pi.KCV)
		if derr != nil {
			msg = fmt.Sprintf("key %s (label %q): the target key %s has check value %s, the source key %s, and deleting it failed (%v): delete it by hand",
				pi.Ref, pi.Label, target.Ref, target.KCV, pi.KCV, derr)
		}
		return it, errors.New(msg)
	}
	if pi.Method != plan.MethodMasked {
		if err := m.share(ctx, pi, target.Ref); err != nil {
			return it, err
		}
	}
	if err := m.waitCoverage(ctx, pi, target); err != nil {
		return it, err
	}
	if err := failpoint.Hit(failpoint.MigrateBeforeDone); err != nil {
		return it, err
	}
	it.State = runner.StateDone
	it.Result = target.Ref.String()
	return it, nil
}

// move makes the key on the target: the one non-idempotent step. The
// acting state is committed before the target call, so a crash after it
// makes the next attempt look first.
func (m *Migration) move(ctx context.Context, pi plan.Item, it journal.Item, commit runner.Commit) (hsm.KeyInfo, error) {
	act := func() error {
		if err := failpoint.Hit(failpoint.MigrateAfterSourceExport); err != nil {
			return err
		}
		it.State = StateActing
		if err := commit(it); err != nil {
			return err
		}
		return failpoint.Hit(failpoint.MigrateAfterActing)
	}
	tmpl := template(pi)
	switch pi.Method {
	case plan.MethodMasked:
		src, err := hsm.As[hsm.Masker](m.src, "export masked objects")
		if err != nil {
			return hsm.KeyInfo{}, fmt.Errorf("key %s (label %q): the source: %w", pi.Ref, pi.Label, err)
		}
		dst, err := hsm.As[hsm.Masker](m.dst, "insert masked objects")
		if err != nil {
			return hsm.KeyInfo{}, fmt.Errorf("key %s (label %q): the target: %w", pi.Ref, pi.Label, err)
		}
		blob, err := src.ExportMasked(ctx, pi.Ref)
		if err != nil {
			return hsm.KeyInfo{}, fmt.Errorf("key %s (label %q): masked export from the source: %w", pi.Ref, pi.Label, err)
		}
		if err := act(); err != nil {
			return hsm.KeyInfo{}, err
		}
		k, err := dst.InsertMasked(ctx, blob)
		if err != nil {
			return k, laterIfQuorum(fmt.Errorf("key %s (label %q): masked insert into the target: %w", pi.Ref, pi.Label, err))
		}
		return k, failpoint.Hit(failpoint.MigrateAfterTargetUnwrap)
	case plan.MethodPublic:
		pem, err := m.src.ExportPublicKey(ctx, pi.Ref)
		if err != nil {
			return hsm.KeyInfo{}, fmt.Errorf("key %s (label %q): exporting the public key: %w", pi.Ref, pi.Label, err)
		}
		if err := act(); err != nil {
			return hsm.KeyInfo{}, err
		}
		k, err := m.dst.ImportPublicKey(ctx, pem, tmpl)
		if err != nil {
			return k, laterIfQuorum(fmt.Errorf("key %s (label %q): importing the public key into the target: %w", pi.Ref, pi.Label, err))
		}
		return k, failpoint.Hit(failpoint.MigrateAfterTargetUnwrap)
	}
	if m.tr == nil {
		return hsm.KeyInfo{}, fmt.Errorf("key %s: no transport key for method %s", pi.Ref, pi.Method)
	}
	wreq, ureq := m.tr.requests(pi)
	blob, err := m.src.WrapKey(ctx, wreq)
	if err != nil {
		return hsm.KeyInfo{}, fmt.Errorf("key %s (label %q): wrap on the source: %w", pi.Ref, pi.Label, err)
	}
	if err := act(); err != nil {
		return hsm.KeyInfo{}, err
	}
	ureq.Blob = blob
	ureq.Class, ureq.Type, ureq.Template = pi.Class, pi.Type, tmpl
	k, err := m.dst.UnwrapKey(ctx, ureq)
	clear(blob)
	if errors.Is(err, hsm.ErrExists) && it.Attempts > 1 {
		// An earlier attempt's unwrap may have succeeded with its answer
		// lost, on an HSM that did not answer the look just made: look
		// again later rather than fail a key that is probably there.
		return k, runner.Later(fmt.Errorf("key %s (label %q): the target already holds a key with its id, probably from an earlier attempt; looking for it again (%w)", pi.Ref, pi.Label, err))
	}
	if err != nil {
		return k, laterIfQuorum(fmt.Errorf("key %s (label %q): unwrap on the target: %w", pi.Ref, pi.Label, err))
	}
	return k, failpoint.Hit(failpoint.MigrateAfterTargetUnwrap)
}

// laterIfQuorum marks a refusal by the target's key availability quorum
// as a condition time cures: the target makes no key it cannot put on 2
// HSMs and leaves nothing behind, so the step is simply tried again once
// the missing HSM is back.
func laterIfQuorum(err error) error {
	if hsm.CodeOf(err) == hsm.CodeQuorum {
		return runner.Later(err)
	}
	return err
}

// share shares the target key made for pi with the users the plan lists.
// The plan lists none for a target that cannot share (it says so).
func (m *Migration) share(ctx context.Context, pi plan.Item, ref hsm.KeyRef) error {
	if len(pi.Shares) == 0 {
		return nil
	}
	s, err := hsm.As[hsm.Sharer](m.dst, "share keys")
	if err != nil {
		return fmt.Errorf("key %s (label %q): the plan shares it with %s, but the target %w; re-plan", pi.Ref, pi.Label, strings.Join(pi.Shares, ", "), err)
	}
	for _, u := range pi.Shares {
		if err := s.ShareKey(ctx, ref, u); err != nil {
			return fmt.Errorf("key %s (label %q): sharing target key %s with %s: %w", pi.Ref, pi.Label, ref, u, err)
		}
	}
	return nil
}

// deleteKey deletes ref from s if s can delete keys.
func deleteKey(ctx context.Context, s hsm.Session, ref hsm.KeyRef) error {
	d, err := hsm.As[hsm.KeyDeleter](s, "delete keys")
	if err != nil {
		return err
	}
	return d.DeleteKey(ctx, ref)
}

// template carries the source key's label, id and attributes to the
// target, except those the HSM sets itself (local, always-sensitive,
// never-extractable) and trusted, which only a crypto officer may set.
func template(pi plan.Item) hsm.Template {
	t := hsm.Template{Label: pi.Label, ID: pi.ID, Attrs: map[hsm.Attr]bool{}}
	for _, a := range hsm.AllAttrs {
		switch a {
		case hsm.AttrLocal, hsm.AttrAlwaysSensitive, hsm.AttrNeverExtractable, hsm.AttrTrusted:
			continue
		}
		v, _ := pi.Attrs.Get(a)
		t.Attrs[a] = v
	}
	return t
}

// lookOnTarget finds the key a previous attempt may have made: the planned
// identity, owned by the target user (or, for a masked copy, the same
// handle). More than one is an error a person must look at.
func (m *Migration) lookOnTarget(ctx context.Context, pi plan.Item) (*hsm.KeyInfo, error) {
	if pi.Method == plan.MethodMasked {
		k, err := m.dst.GetKey(ctx, pi.Ref)
		if errors.Is(err, hsm.ErrNotFound) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("key %s (label %q): looking for an earlier copy on the target: %w", pi.Ref, pi.Label, err)
		}
		return &k, nil
	}
	hits, err := m.targetKeys(ctx, pi, "an earlier copy", func(k hsm.KeyInfo, me string) bool {
		return k.Owner == me && k.Type == pi.Type && plan.Identity(k.ID, k.Label, k.Class, k.Type, k.KCV) == pi.Identity()
	})
	if err != nil || len(hits) <= 1 {
		return first(hits), err
	}
	return nil, fmt.Errorf("key %s (label %q): the target holds %d copies (%s); delete all but one, then run migrate again",
		pi.Ref, pi.Label, len(hits), refs(hits))
}

// targetKeys lists the target keys with pi's id (or, without one, its
// label) and class that match, as the target user sees them; what names
// the search in an error.
func (m *Migration) targetKeys(ctx context.Context, pi plan.Item, what string, match func(k hsm.KeyInfo, me string) bool) ([]hsm.KeyInfo, error) {
	f := hsm.Filter{Class: pi.Class}
	if len(pi.ID) > 0 {
		f.ID = pi.ID
	} else {
		label := pi.Label
		f.Label = &label
	}
	keys, err := m.dst.ListKeys(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("key %s (label %q): looking for %s on the target: %w", pi.Ref, pi.Label, what, err)
	}
	me := m.dst.User().Name
	var hits []hsm.KeyInfo
	for _, k := range keys {
		if match(k, me) {
			hits = append(hits, k)
		}
	}
	return hits, nil
}

// first is the first key of ks, or nil.
func first(ks []hsm.KeyInfo) *hsm.KeyInfo {
	if len(ks) == 0 {
		return nil
	}
	return &ks[0]
}

// enoughCoverage reports whether cov is on the HSMs a new key must reach.
func (m *Migration) enoughCoverage(cov hsm.Coverage) bool {
	return cov.Count() >= m.need || len(cov.HSMs) == 0 && m.need <= 1
}

// waitCoverage waits until the target key k is on enough HSMs. The
// coverage the cluster answered with when it made (or listed) the key is
// enough when it already suffices; otherwise the key is looked up until it
// does, which also makes the cluster copy it where it is missing.
func (m *Migration) waitCoverage(ctx context.Context, pi plan.Item, k hsm.KeyInfo) error {
	if m.enoughCoverage(k.Coverage) {
		return nil
	}
	ref := k.Ref
	deadline := time.Now().Add(m.opts.CoverageWait)
	delay := 5 * time.Millisecond
	for {
		k, err := m.dst.GetKey(ctx, ref)
		if err != nil {
			return fmt.Errorf("key %s (label %q): checking coverage of target key %s: %w", pi.Ref, pi.Label, ref, err)
		}
		if m.enoughCoverage(k.Coverage) {
			return nil
		}
		if time.Now().After(deadline) {
			return runner.Later(hsm.Errorf(hsm.CodeQuorum, "migrate", ref, "key %s (label %q) is on %d HSM(s) of the target, not yet %d (%s); it will be checked again",
				pi.Ref, pi.Label, k.Coverage.Count(), m.need, k.Coverage))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 500*time.Millisecond)
	}
}
