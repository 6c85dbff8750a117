// Package runner is keymig's resumable executor. It drives the items of a
// journal run through a caller's steps with a bounded pool of workers,
// commits every transition to the journal, retries what a retry can cure,
// shows progress, and stops cleanly on a signal.
//
// The caller's Process function owns the steps of one item. It receives the
// item as last committed and a Commit function to record intermediate
// states (for example "unwrapping" just before a non-idempotent HSM call, so
// that a resumed run knows to look before it acts again). It returns the
// item's final record, or an error.
//
// # Retries
//
// The runner never retries an HSM's answer: the backend does that, in one
// place (package hsm/cluster retries throttled calls and waits for HSMs to
// come back), and what it returns is final. The runner retries an item
// only when Process says a condition of the job itself may be cured by
// time, by returning an error marked with Later (for example, a new key not
// yet on enough HSMs of the target): the item is then driven again from its
// last committed state after a full-jitter backoff, sleep = random(0,
// min(Cap, Base·2^attempt)), up to MaxAttempts in this run. Any other error
// fails the item at once. A failed item keeps its state and error in the
// journal and is tried again by the next run of the same job.
//
// # Stopping
//
// When ctx is cancelled (SIGINT, SIGTERM) no new item starts; items in
// flight finish their current step under a grace period so that their
// outcome is committed, and Run returns with Summary.Interrupted set.
package runner

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/journal"
	"github.com/sourcegraph/conc/pool"
)

// Item states the runner itself understands. Callers add their own
// intermediate states between Pending and Done.
const (
	StatePending = "pending"
	StateDone    = "done"
	StateSkipped = "skipped"
	StateFailed  = "failed"
)

// Commit durably records an intermediate state of the item being processed.
type Commit func(journal.Item) error

// Config is a job for Run.
type Config struct {
	// Run is the journal run whose items are processed.
	Run *journal.Run
	// Workers bounds the items processed at once; default 16.
	Workers int
	// Process drives one item to its final state; an error marked with
	// Later is retried, any other fails the item.
	Process func(ctx context.Context, it journal.Item, commit Commit) (journal.Item, error)
	// Backoff is the retry policy; zero values take the defaults.
	Backoff Backoff
	// Final lists the states that need no more work; default done and skipped.
	Final []string
	// MaxItems stops the run after this many items were started (0: all).
	MaxItems int
	// MaxDuration stops starting new items after this long (0: no limit).
	MaxDuration time.Duration
	// Grace is how long items in flight get to finish after a stop; default 30s.
	Grace time.Duration
	// Progress receives counts as items finish; may be nil.
	Progress Progress
}

// Backoff is a full-jitter exponential backoff policy.
type Backoff struct {
	Base        time.Duration // default 50ms
	Cap         time.Duration // default 5s
	MaxAttempts int           // tries per item per run; default 5
}

func (b Backoff) withDefaults() Backoff {
	if b.Base <= 0 {
		b.Base = 50 * time.Millisecond
	}
	if b.Cap <= 0 {
		b.Cap = 5 * time.Second
	}
	if b.MaxAttempts <= 0 {
		b.MaxAttempts = 5
	}
	return b
}

// Delay is the sleep before retry n (n ≥ 0): random(0, min(Cap, Base·2^n)).
func (b Backoff) Delay(n int) time.Duration {
	b = b.withDefaults()
	ceiling := b.Cap
	if n < 30 {
		if d := b.Base << n; d > 0 && d < ceiling {
			ceiling = d
		}
	}
	return rand.N(ceiling + 1)
}

// Summary is what a run did.
type Summary struct {
	Total       int            `json:"total"`
	Done        int            `json:"done"`    // reached a final state in this run
	Already     int            `json:"already"` // were final before this run
	Failed      int            `json:"failed"`
	Pending     int            `json:"pending"` // not started (stopped early)
	Retries     int            `json:"retries"`
	Failures    []Failure      `json:"failures,omitempty"`
	States      map[string]int `json:"states"`
	Elapsed     time.Duration  `json:"elapsed-ns"`
	Interrupted bool           `json:"interrupted"`
	Stopped     string         `json:"stopped,omitempty"` // why the run stopped before the end
}

// Failure is one item that failed, with its error.
type Failure struct {
	Key   string `json:"key"`
	Error string `json:"error"`
}

// Rate is items finished per second in this run.
func (s Summary) Rate() float64 {
	if s.Elapsed <= 0 {
		return 0
	}
	return float64(s.Done) / s.Elapsed.Seconds()
}

// Progress is told how a run advances.
type Progress interface {
	// Start is called once with the number of items and how many are
	// already final.
	Start(total, already int)
	// Finished is called as each item ends, ok or not.
	Finished(ok bool)
	// Stop is called once at the end.
	Stop()
}

// Run processes every item of cfg.Run that is not in a final state.
func Run(ctx context.Context, cfg Config) (Summary, error) {
	if cfg.Run == nil || cfg.Process == nil {
		return Summary{}, errors.New("runner: Config needs a Run and a Process")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 16
	}
	if cfg.Grace <= 0 {
		cfg.Grace = 30 * time.Second
	}
	final := map[string]bool{StateDone: true, StateSkipped: true}
	if len(cfg.Final) > 0 {
		final = map[string]bool{}
		for _, s := range cfg.Final {
			final[s] = true
		}
	}
	backoff := cfg.Backoff.withDefaults()

	var todo []journal.Item
	var sum Summary
	if err := cfg.Run.Items(func(it journal.Item) error {
		sum.Total++
		if final[it.State] {
			sum.Already++
		} else {
			todo = append(todo, it)
		}
		return nil
	}); err != nil {
		return sum, err
	}
	progress := cfg.Progress
	if progress == nil {
		progress = nopProgress{}
	}
	progress.Start(sum.Total, sum.Already)
	defer progress.Stop()

	start := time.Now()
	// Items in flight finish under work, which outlives ctx by Grace so
	// that a signal never abandons an HSM call whose outcome must be
	// committed.
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	stopGrace := context.AfterFunc(ctx, func() { time.AfterFunc(cfg.Grace, cancelWork) })
	defer stopGrace()

	var (
		mu       sync.Mutex
		done     atomic.Int64
		retries  atomic.Int64
		started  int
		failures []Failure
		fatal    error
	)
	var deadline <-chan time.Time
	if cfg.MaxDuration > 0 {
		timer := time.NewTimer(cfg.MaxDuration)
		defer timer.Stop()
		deadline = timer.C
	}

	p := pool.New().WithMaxGoroutines(cfg.Workers)
dispatch:
	for _, it := range todo {
		if err := failpoint.Wait(ctx, failpoint.RunnerBeforeItem); err != nil {
			fatal = err
			break
		}
		select {
		case <-ctx.Done():
			sum.Interrupted = true
			sum.Stopped = "interrupted"
			break dispatch
		case <-deadline:
			sum.Stopped = fmt.Sprintf("the time limit of %s was reached", cfg.MaxDuration)
			break dispatch
		default:
		}
		mu.Lock()
		stop := fatal != nil
		mu.Unlock()
		if stop {
			break
		}
		if cfg.MaxItems > 0 && started >= cfg.MaxItems {
			sum.Stopped = fmt.Sprintf("the limit of %d items was reached", cfg.MaxItems)
			break
		}
		started++
		p.Go(func() {
			n, err := drive(work, ctx, cfg, backoff, it)
			retries.Add(int64(n))
			if err != nil {
				var fe *fatalError
				if errors.As(err, &fe) {
					mu.Lock()
					if fatal == nil {
						fatal = fe.err
					}
					mu.Unlock()
					return
				}
				mu.Lock()
				failures = append(failures, Failure{Key: it.Key, Error: err.Error()})
				mu.Unlock()
				progress.Finished(false)
				return
			}
			done.Add(1)
			progress.Finished(true)
		})
	}
	p.Wait()

	sum.Done = int(done.Load())
	sum.Retries = int(retries.Load())
	sum.Failed = len(failures)
	sort.Slice(failures, func(a, b int) bool { return failures[a].Key < failures[b].Key })
	sum.Failures = failures
	sum.Elapsed = time.Since(start)
	if ctx.Err() != nil {
		sum.Interrupted = true
		sum.Stopped = "interrupted"
	}
	states, err := cfg.Run.Counts()
	if err != nil && fatal == nil {
		fatal = err
	}
	sum.States = states
	sum.Pending = sum.Total - sum.Already - sum.Done - sum.Failed
	return sum, fatal
}

// Later marks err as a condition of the job that time may cure, so that
// the runner drives the item again after a backoff. It is the only error
// the runner retries.
func Later(err error) error {
	if err == nil {
		return nil
	}
	return &laterError{err}
}

// IsLater reports whether err, or an error it wraps, was marked by Later.
func IsLater(err error) bool {
	var l *laterError
	return errors.As(err, &l)
}

type laterError struct{ err error }

func (e *laterError) Error() string { return e.err.Error() }
func (e *laterError) Unwrap() error { return e.err }

// fatalError marks an error that stops the whole run: the journal could
// not record a transition, so going on would lose track of work.
type fatalError struct{ err error }

func (e *fatalError) Error() string { return e.err.Error() }

// drive runs Process on one item, retrying per the backoff, and commits its
// final record. It returns the retries it made. A failed item keeps the
// state it last committed in the journal only while it is retried; when it
// gives up it is marked failed, and Process must treat any state other than
// pending as "a previous attempt may have acted".
func drive(work, stop context.Context, cfg Config, b Backoff, it journal.Item) (int, error) {
	commit := func(next journal.Item) error {
		next.Key = it.Key
		if err := cfg.Run.Put(next); err != nil {
			return &fatalError{fmt.Errorf("journal %s: recording item %s: %w", cfg.Run.Journal().Path(), it.Key, err)}
		}
		it = next
		return nil
	}
	retries := 0
	for n := 0; ; n++ {
		if it.Started.IsZero() {
			it.Started = time.Now().UTC()
		}
		it.Attempts++
		out, err := cfg.Process(work, it, commit)
		var fe *fatalError
		if errors.As(err, &fe) {
			return retries, err
		}
		if err == nil {
			out.Key, out.Attempts, out.Started = it.Key, it.Attempts, it.Started
			out.LastError = ""
			if err := commit(out); err != nil {
				return retries, err
			}
			return retries, nil
		}
		// Keep whatever state Process committed; record the error.
		failed := it
		failed.LastError = err.Error()
		retry := IsLater(err) && n+1 < b.MaxAttempts && stop.Err() == nil
		if !retry {
			failed.State = StateFailed
			if cerr := commit(failed); cerr != nil {
				return retries, cerr
			}
			return retries, err
		}
		if cerr := commit(failed); cerr != nil {
			return retries, cerr
		}
		retries++
		select {
		case <-time.After(b.Delay(n)):
		case <-stop.Done():
		}
	}
}

// FormatFailures renders failures one per line, at most limit of them.
func FormatFailures(fs []Failure, limit int) string {
	var b strings.Builder
	for i, f := range fs {
		if i == limit {
			fmt.Fprintf(&b, "  ... and %d more (keymig journal show lists them all)\n", len(fs)-limit)
			break
		}
		fmt.Fprintf(&b, "  %s: %s\n", f.Key, f.Error)
	}
	return b.String()
}

type nopProgress struct{}

func (nopProgress) Start(int, int) {}
func (nopProgress) Finished(bool)  {}
func (nopProgress) Stop()          {}
