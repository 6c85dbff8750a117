// Package boltgroup commits concurrent bbolt writes together, with no
// added delay: a write that finds no commit in progress starts one at
// once; writes that arrive while a commit is in progress wait for it and
// then share the next. Under load, commits grow to the number of writers;
// alone, a write costs one commit and nothing more.
//
// bbolt's own DB.Batch waits MaxBatchDelay before every commit, even when
// nothing else is writing, and a delay of zero makes batches of one. A
// pipeline of several durable writes per item (the journal, then each HSM)
// pays that delay at every step.
package boltgroup

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	bolt "go.etcd.io/bbolt"
)

// Group commits the writes given to Do on one database.
type Group struct {
	db *bolt.DB
	// Max bounds the writes of one commit; 0 means 1000.
	Max int
	// Yield makes a commit first let runnable writers join it. It trades
	// a little latency for fewer, larger commits, which pays when the CPU
	// is the bottleneck.
	Yield bool

	mu      sync.Mutex
	pending []call
	leading bool // a goroutine is committing and will take what is pending
}

type call struct {
	fn      func(*bolt.Tx) error
	applied func() error // may be nil
	err     chan error
}

// New returns a Group for db.
func New(db *bolt.DB) *Group { return &Group{db: db} }

// Do runs fn in a write transaction shared with concurrent calls and
// returns once that transaction has committed (or fn's error). As with
// bbolt's Batch, fn may run more than once: if any write of a shared
// commit fails, each is run again in a transaction of its own, so one bad
// write does not fail the others. fn must therefore compute its effect
// from the transaction, not from state it changes itself.
func (g *Group) Do(fn func(*bolt.Tx) error) error {
	return g.DoApplied(fn, nil)
}

// DoApplied is Do with a hook: applied runs once fn's write is final in
// the transaction that will be committed (after every write of it has run
// without error, in the order of the writes), just before the commit. It
// lets the caller start work that must follow the write, such as logging
// it, while the commit is on its way to the disk; if the commit then
// fails, DoApplied returns that error. An error from applied rolls the
// transaction back, for every write in it.
func (g *Group) DoApplied(fn func(*bolt.Tx) error, applied func() error) error {
	c := call{fn: fn, applied: applied, err: make(chan error, 1)}
	g.mu.Lock()
	g.pending = append(g.pending, c)
	if g.leading {
		g.mu.Unlock()
		return <-c.err
	}
	g.leading = true
	g.mu.Unlock()
	g.lead()
	return <-c.err
}

// lead commits what is pending, again and again, until nothing is.
func (g *Group) lead() {
	max := g.Max
	if max <= 0 {
		max = 1000
	}
	for {
		if g.Yield {
			runtime.Gosched()
		}
		g.mu.Lock()
		if len(g.pending) == 0 {
			g.leading = false
			g.mu.Unlock()
			return
		}
		n := min(len(g.pending), max)
		calls := append([]call(nil), g.pending[:n]...)
		g.pending = append(g.pending[:0], g.pending[n:]...)
		g.mu.Unlock()
		g.commit(calls)
	}
}

// errRetry marks the failure of one write of a shared commit.
var errRetry = errors.New("boltgroup: retry alone")

func (g *Group) commit(calls []call) {
	failed := -1
	err := g.db.Update(func(tx *bolt.Tx) error {
		for i, c := range calls {
			if err := safely(c.fn, tx); err != nil {
				failed = i
				return errRetry
			}
		}
		for _, c := range calls {
			if c.applied != nil {
				if err := c.applied(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	switch {
	case err == nil:
		for _, c := range calls {
			c.err <- nil
		}
	case failed >= 0:
		// Each alone, so that only the failing one fails.
		for _, c := range calls {
			c.err <- g.db.Update(func(tx *bolt.Tx) error {
				if err := safely(c.fn, tx); err != nil {
					return err
				}
				if c.applied != nil {
					return c.applied()
				}
				return nil
			})
		}
	default: // the commit itself failed
		for _, c := range calls {
			c.err <- err
		}
	}
}

// safely runs fn, turning a panic into an error so that the other writes
// of the commit are not lost with it.
func safely(fn func(*bolt.Tx) error, tx *bolt.Tx) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("boltgroup: write panicked: %v", p)
		}
	}()
	return fn(tx)
}
