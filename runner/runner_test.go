package runner

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/journal"
)

var errTransient = errors.New("transient")

func newRun(t *testing.T, n int) *journal.Run {
	t.Helper()
	j, err := journal.Open(filepath.Join(t.TempDir(), "j"), journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if errs := j.Check(); len(errs) > 0 {
			t.Errorf("journal check: %v", errs)
		}
		j.Close()
	})
	r, _, _, err := j.Begin("run", "test", nil)
	if err != nil {
		t.Fatal(err)
	}
	items := make([]journal.Item, n)
	for i := range items {
		items[i] = journal.Item{Key: fmt.Sprintf("item-%04d", i), State: StatePending}
	}
	if _, err := r.AddItems(items); err != nil {
		t.Fatal(err)
	}
	return r
}

func fastBackoff() Backoff {
	return Backoff{Base: time.Microsecond, Cap: time.Millisecond, MaxAttempts: 4}
}

func TestRunOutcomes(t *testing.T) {
	tests := []struct {
		name        string
		process     func(calls int, it journal.Item) error // calls = attempts so far for this item
		wantDone    int
		wantFailed  int
		wantRetries bool
	}{
		{"all succeed", func(int, journal.Item) error { return nil }, 50, 0, false},
		{"later then success", func(calls int, _ journal.Item) error {
			if calls < 3 {
				return Later(errTransient)
			}
			return nil
		}, 50, 0, true},
		{"later forever gives up", func(int, journal.Item) error { return Later(errTransient) }, 0, 50, true},
		{"an HSM's retryable answer is not retried here", func(int, journal.Item) error {
			return fmt.Errorf("wrap: %w", hsm.Errorf(hsm.CodeThrottled, "wrap", 0, "busy"))
		}, 0, 50, false},
		{"permanent fails without retry", func(int, journal.Item) error { return errors.New("kcv mismatch") }, 0, 50, false},
		{"some fail", func(_ int, it journal.Item) error {
			if it.Key[len(it.Key)-1] == '7' {
				return errors.New("bad key")
			}
			return nil
		}, 45, 5, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRun(t, 50)
			var mu sync.Mutex
			calls := map[string]int{}
			sum, err := Run(context.Background(), Config{
				Run: r, Workers: 8, Backoff: fastBackoff(),
				Process: func(ctx context.Context, it journal.Item, commit Commit) (journal.Item, error) {
					mu.Lock()
					calls[it.Key]++
					c := calls[it.Key]
					mu.Unlock()
					if err := tt.process(c, it); err != nil {
						return it, err
					}
					it.State, it.Result = StateDone, "ok"
					return it, nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			if sum.Done != tt.wantDone || sum.Failed != tt.wantFailed {
				t.Fatalf("done %d failed %d, want %d %d (%+v)", sum.Done, sum.Failed, tt.wantDone, tt.wantFailed, sum)
			}
			if (sum.Retries > 0) != tt.wantRetries {
				t.Fatalf("retries = %d, want any: %v", sum.Retries, tt.wantRetries)
			}
			if sum.States[StateDone] != tt.wantDone || sum.States[StateFailed] != tt.wantFailed {
				t.Fatalf("journal states %v", sum.States)
			}
		})
	}
}

// A second run of the same journal does only what is left, and a failed
// item is tried again.
func TestResumeAfterFailureAndStop(t *testing.T) {
	r := newRun(t, 100)
	var fail atomic.Bool
	fail.Store(true)
	process := func(ctx context.Context, it journal.Item, commit Commit) (journal.Item, error) {
		if it.Key == "item-0042" && fail.Load() {
			return it, errors.New("target refused")
		}
		it.State = StateDone
		return it, nil
	}
	sum, err := Run(context.Background(), Config{Run: r, Workers: 4, Process: process, MaxItems: 60})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Done+sum.Failed != 60 || sum.Pending != 40 || sum.Stopped == "" {
		t.Fatalf("first run %+v", sum)
	}
	fail.Store(false)
	sum, err = Run(context.Background(), Config{Run: r, Workers: 4, Process: process})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Already != 59 || sum.Done != 41 || sum.Failed != 0 {
		t.Fatalf("second run %+v", sum)
	}
	sum, _ = Run(context.Background(), Config{Run: r, Process: func(context.Context, journal.Item, Commit) (journal.Item, error) {
		t.Fatal("a finished run processed an item")
		return journal.Item{}, nil
	}})
	if sum.Already != 100 || sum.Done != 0 {
		t.Fatalf("third run %+v", sum)
	}
}

// Cancelling the context stops dispatch but lets items in flight commit.
func TestInterruptCommitsInFlight(t *testing.T) {
	r := newRun(t, 200)
	ctx, cancel := context.WithCancel(context.Background())
	var started atomic.Int64
	sum, err := Run(ctx, Config{Run: r, Workers: 4, Process: func(wctx context.Context, it journal.Item, commit Commit) (journal.Item, error) {
		if started.Add(1) == 10 {
			cancel()
		}
		it.State = "unwrapping"
		if err := commit(it); err != nil {
			return it, err
		}
		time.Sleep(time.Millisecond) // an HSM call in flight when the stop comes; not a wait
		if wctx.Err() != nil {
			return it, wctx.Err()
		}
		it.State = StateDone
		return it, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !sum.Interrupted {
		t.Fatal("not marked interrupted")
	}
	if sum.States["unwrapping"] != 0 {
		t.Fatalf("items left mid-step after a clean stop: %v", sum.States)
	}
	if sum.Done == 0 || sum.Done >= 200 {
		t.Fatalf("done = %d", sum.Done)
	}
}

func TestBackoffDelayIsBounded(t *testing.T) {
	b := Backoff{Base: 10 * time.Millisecond, Cap: 80 * time.Millisecond}
	for n := 0; n < 40; n++ {
		ceiling := min(80*time.Millisecond, 10*time.Millisecond<<min(n, 20))
		for i := 0; i < 50; i++ {
			if d := b.Delay(n); d < 0 || d > ceiling {
				t.Fatalf("Delay(%d) = %v, want within [0, %v]", n, d, ceiling)
			}
		}
	}
}

func TestProcsForStorage(t *testing.T) {
	prev := runtime.GOMAXPROCS(2)
	defer runtime.GOMAXPROCS(prev)
	t.Setenv("GOMAXPROCS", "")
	os.Unsetenv("GOMAXPROCS")
	restore := ProcsForStorage()
	if got := runtime.GOMAXPROCS(0); got != MinProcsForStorage {
		t.Errorf("GOMAXPROCS %d while raised, want %d", got, MinProcsForStorage)
	}
	restore()
	if got := runtime.GOMAXPROCS(0); got != 2 {
		t.Errorf("GOMAXPROCS %d after restore, want 2", got)
	}
	t.Setenv("GOMAXPROCS", "2")
	ProcsForStorage()()
	if got := runtime.GOMAXPROCS(0); got != 2 {
		t.Errorf("GOMAXPROCS %d with GOMAXPROCS=2 in the environment, want 2", got)
	}
}
