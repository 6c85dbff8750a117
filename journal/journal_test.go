package journal

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func openTemp(t *testing.T) (*Journal, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "plan.json.journal")
	j, err := Open(path, Options{Command: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if j.closed {
			return
		}
		if errs := j.Check(); len(errs) > 0 {
			t.Errorf("journal check after test: %v", errs)
		}
		j.Close()
	})
	return j, path
}

func TestBeginResume(t *testing.T) {
	j, path := openTemp(t)
	r, _, existed, err := j.Begin("digest-1", "migrate", map[string]string{"plan": "p.json"})
	if err != nil || existed {
		t.Fatalf("Begin = %v, existed %v", err, existed)
	}
	if _, err := r.AddItems([]Item{{Key: "a", State: "pending"}, {Key: "b", State: "pending"}}); err != nil {
		t.Fatal(err)
	}
	if err := r.Put(Item{Key: "a", State: "done", Result: "0x2a", Attempts: 1}); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	j2, err := Open(path, Options{Command: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer j2.Close()
	r2, _, existed, err := j2.Begin("digest-1", "migrate", nil)
	if err != nil || !existed {
		t.Fatalf("resume: Begin = %v, existed %v", err, existed)
	}
	// Seeding again keeps the state already reached.
	added, err := r2.AddItems([]Item{{Key: "a", State: "pending"}, {Key: "b", State: "pending"}, {Key: "c", State: "pending"}})
	if err != nil || added != 1 {
		t.Fatalf("AddItems = %d, %v; want 1 new", added, err)
	}
	it, ok, err := r2.Get("a")
	if err != nil || !ok || it.State != "done" || it.Result != "0x2a" {
		t.Fatalf("item a after resume = %+v, %v, %v", it, ok, err)
	}
	counts, _ := r2.Counts()
	if counts["done"] != 1 || counts["pending"] != 2 {
		t.Fatalf("counts = %v", counts)
	}
	if _, _, _, err := j2.Begin("digest-1", "rotate", nil); err == nil {
		t.Fatal("a run of another kind under the same id was accepted")
	}
}

func TestConcurrentPuts(t *testing.T) {
	j, _ := openTemp(t)
	r, _, _, err := j.Begin("run", "migrate", nil)
	if err != nil {
		t.Fatal(err)
	}
	const n = 500
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < n; i += 16 {
				key := fmt.Sprintf("k%04d", i)
				for _, st := range []string{"started", "done"} {
					if err := r.Put(Item{Key: key, State: st, Attempts: 1}); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	counts, err := r.Counts()
	if err != nil || counts["done"] != n {
		t.Fatalf("counts = %v, %v; want %d done", counts, err, n)
	}
}

func TestSecondOpenIsRefusedWithHolder(t *testing.T) {
	_, path := openTemp(t)
	_, err := Open(path, Options{Command: "migrate", Wait: 50 * 1e6})
	var le *LockedError
	if !errors.As(err, &le) {
		t.Fatalf("second Open = %v, want *LockedError", err)
	}
	if le.Holder == nil || le.Holder.PID != os.Getpid() || le.Holder.Command != "test" {
		t.Fatalf("holder = %+v", le.Holder)
	}
	if _, err := Unlock(path); err == nil {
		t.Fatal("Unlock of a live holder succeeded")
	}
}

func TestStaleLockIsTakenOver(t *testing.T) {
	path := filepath.Join(t.TempDir(), "j")
	j, err := Open(path, Options{Command: "migrate"})
	if err != nil {
		t.Fatal(err)
	}
	// Simulate a process that died holding the journal: rewrite the lock
	// record with a pid that cannot exist, and close without releasing.
	host, _ := os.Hostname()
	dead := Lock{Host: host, PID: 1 << 30, Command: "migrate"}
	j.lock = dead
	if err := j.db.Update(func(tx *bolt.Tx) error { return putJSON(tx.Bucket(bucketMeta), keyLock, dead) }); err != nil {
		t.Fatal(err)
	}
	j.db.Close()

	if l, err := Unlock(path); err != nil || l == nil || l.PID != dead.PID {
		t.Fatalf("Unlock = %+v, %v", l, err)
	}
	// Take over without unlock as well.
	j2, err := Open(path, Options{Command: "migrate"})
	if err != nil {
		t.Fatal(err)
	}
	defer j2.Close()
	if j2.TookOver != nil {
		t.Fatalf("TookOver = %+v after unlock; want nil", j2.TookOver)
	}
}

func TestCheckFindsDamage(t *testing.T) {
	tests := []struct {
		name   string
		damage func(t *testing.T, path string)
	}{
		{"truncated", func(t *testing.T, path string) {
			fi, _ := os.Stat(path)
			if err := os.Truncate(path, fi.Size()/3); err != nil {
				t.Fatal(err)
			}
		}},
		{"garbage", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("not a journal at all, just text"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "j")
			j, err := Open(path, Options{})
			if err != nil {
				t.Fatal(err)
			}
			r, _, _, _ := j.Begin("run", "migrate", nil)
			items := make([]Item, 2000)
			for i := range items {
				items[i] = Item{Key: fmt.Sprintf("item-%05d", i), State: "pending"}
			}
			r.AddItems(items)
			j.Close()
			tt.damage(t, path)
			j, err = Open(path, Options{})
			if err == nil {
				errs := j.Check()
				j.Close()
				if len(errs) == 0 {
					t.Fatal("damaged journal opened and checked clean")
				}
			}
		})
	}
}

func FuzzDecodeItem(f *testing.F) {
	f.Add([]byte("k"), []byte(`{"key":"k","state":"done","attempts":1,"result":"0x2a"}`))
	f.Add([]byte("k"), []byte(`{"key":"k","state":"pending"} {}`))
	f.Add([]byte("x"), []byte(`{"key":"k","state":"pending","attempts":-1}`))
	f.Fuzz(func(t *testing.T, k, v []byte) {
		it, err := DecodeItem(k, v)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v is not ErrFormat", err)
			}
			return
		}
		if it.Key != string(k) || it.State == "" || it.Attempts < 0 {
			t.Fatalf("accepted bad item %+v", it)
		}
	})
}

// Prune keeps the newest done runs of a kind and never touches runs of
// another kind or runs that are not done.
func TestPrune(t *testing.T) {
	j, _ := openTemp(t)
	status := []string{RunDone, RunDone, RunFailed, RunDone, RunInterrupted, RunDone, RunDone}
	for i, st := range status {
		r, _, _, err := j.Begin(fmt.Sprintf("sync-%d", i), "synckey", nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.AddItems([]Item{{Key: "k", State: "done"}}); err != nil {
			t.Fatal(err)
		}
		r.Event("note", "run %d", i)
		if err := r.Finish(st, nil); err != nil {
			t.Fatal(err)
		}
	}
	other, _, _, _ := j.Begin("plan-digest", "migrate", nil)
	other.Finish(RunDone, nil)

	removed, err := j.Prune("synckey", 2)
	if err != nil || removed != 3 {
		t.Fatalf("pruned %d, %v; want 3 (done runs 0, 1 and 3)", removed, err)
	}
	var left []string
	runs, _ := j.Runs()
	for _, r := range runs {
		left = append(left, r.ID)
	}
	want := "[sync-2 sync-4 sync-5 sync-6 plan-digest]"
	if got := fmt.Sprint(left); got != want {
		t.Errorf("runs left %s, want %s", got, want)
	}
	if _, _, err := j.Run("sync-0"); err == nil {
		t.Error("a pruned run is still there")
	}
	if removed, err := j.Prune("synckey", 2); err != nil || removed != 0 {
		t.Errorf("second prune removed %d, %v", removed, err)
	}
	if _, err := j.Prune("synckey", -1); err == nil {
		t.Error("keep -1 was accepted")
	}
}
