package boltgroup

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func open(t *testing.T) *bolt.DB {
	t.Helper()
	db, err := bolt.Open(filepath.Join(t.TempDir(), "db"), 0o600, &bolt.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("b")); return err }); err != nil {
		t.Fatal(err)
	}
	return db
}

// Concurrent writes all land, fewer commits than writes are made, and a
// failing write fails alone.
func TestGroupCommits(t *testing.T) {
	for _, yield := range []bool{false, true} {
		t.Run(fmt.Sprintf("yield=%v", yield), func(t *testing.T) { testGroupCommits(t, yield) })
	}
}

func testGroupCommits(t *testing.T, yield bool) {
	db := open(t)
	g := New(db)
	g.Max, g.Yield = 16, yield
	const n = 400
	bad := errors.New("bad write")
	var wg sync.WaitGroup
	var mu sync.Mutex
	txs := map[int]bool{}
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			errs[i] = g.Do(func(tx *bolt.Tx) error {
				mu.Lock()
				txs[tx.ID()] = true
				mu.Unlock()
				if i%50 == 7 {
					return bad
				}
				return tx.Bucket([]byte("b")).Put([]byte(fmt.Sprint(i)), []byte("v"))
			})
		})
	}
	wg.Wait()
	stored := 0
	db.View(func(tx *bolt.Tx) error { stored = tx.Bucket([]byte("b")).Stats().KeyN; return nil })
	for i, err := range errs {
		if (i%50 == 7) != errors.Is(err, bad) {
			t.Errorf("write %d: %v", i, err)
		}
	}
	if want := n - n/50; stored != want {
		t.Errorf("%d keys stored, want %d", stored, want)
	}
	if len(txs) >= n {
		t.Errorf("%d writes took %d transactions: they were not grouped", n, len(txs))
	}
}

// A panicking write is an error for it alone.
func TestGroupPanic(t *testing.T) {
	g := New(open(t))
	if err := g.Do(func(*bolt.Tx) error { panic("boom") }); err == nil {
		t.Fatal("a panicking write returned no error")
	}
	if err := g.Do(func(tx *bolt.Tx) error { return tx.Bucket([]byte("b")).Put([]byte("k"), []byte("v")) }); err != nil {
		t.Fatal(err)
	}
}

// The applied hook runs exactly once for each write that commits, never
// for one that fails, even when a failing write shares its first commit.
func TestAppliedOnce(t *testing.T) {
	db := open(t)
	g := New(db)
	const n = 200
	var mu sync.Mutex
	applied := map[int]int{}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			g.DoApplied(func(tx *bolt.Tx) error {
				if i%40 == 3 {
					return errors.New("bad")
				}
				return tx.Bucket([]byte("b")).Put([]byte(fmt.Sprint(i)), []byte("v"))
			}, func() error {
				mu.Lock()
				applied[i]++
				mu.Unlock()
				return nil
			})
		})
	}
	wg.Wait()
	for i := range n {
		want := 1
		if i%40 == 3 {
			want = 0
		}
		if applied[i] != want {
			t.Errorf("write %d: applied %d times, want %d", i, applied[i], want)
		}
	}
	// An error from the hook rolls the write back.
	err := g.DoApplied(func(tx *bolt.Tx) error { return tx.Bucket([]byte("b")).Put([]byte("x"), []byte("v")) },
		func() error { return errors.New("log failed") })
	if err == nil {
		t.Fatal("a failing hook did not fail the write")
	}
	db.View(func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("b")).Get([]byte("x")) != nil {
			t.Error("the write of a failing hook was committed")
		}
		return nil
	})
}
