package migrate_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/migrate"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/runner"
)

var (
	officer = hsm.Credentials{User: "admin", Password: "admin-pass-1"}
	user    = hsm.Credentials{User: "alice", Password: "alice-pass-1"}
)

// testCluster makes a 2-HSM cluster with a crypto user and logs in as it.
func testCluster(t *testing.T, dir string) (*cluster.Cluster, hsm.Session) {
	return benchCluster(t, dir)
}

// benchCluster is testCluster for tests and benchmarks alike.
func benchCluster(t testing.TB, dir string) (*cluster.Cluster, hsm.Session) {
	return clusterOf(t, dir, nil)
}

// clusterOf is testCluster with HSMs made by members (nil: local ones).
func clusterOf(t testing.TB, dir string, members cluster.Opener) (*cluster.Cluster, hsm.Session) {
	t.Helper()
	ctx := context.Background()
	keymigtest.CheckAfter(t, dir)
	c, err := cluster.Init(ctx, cluster.InitOptions{Dir: dir, HSMs: 2, Officer: officer, KDFIterations: 1000, KeyCapacity: 100000, Members: members})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	co, err := c.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	if err := co.(hsm.Users).CreateUser(ctx, user.User, hsm.RoleCryptoUser, user.Password); err != nil {
		t.Fatal(err)
	}
	co.Logout(ctx)
	s, err := c.Login(ctx, user)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Logout(context.Background()) })
	return c, s
}

// planned plans the migration from src to dst and begins its run in a
// journal at path, closed when the test ends.
func planned(t *testing.T, src, dst hsm.Session, o plan.Options, path string) (*plan.Plan, *journal.Run) {
	t.Helper()
	p, err := plan.Build(inventory(t, "src", src), inventory(t, "dst", dst), o, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	j, err := journal.Open(path, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	r, _, _, err := j.Begin(p.Digest, migrate.RunKind, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p, r
}

func inventory(t *testing.T, dir string, s hsm.Session) hsm.Inventory {
	return benchInventory(t, dir, s)
}

func benchInventory(t testing.TB, dir string, s hsm.Session) hsm.Inventory {
	t.Helper()
	inv, err := hsm.TakeInventory(context.Background(), s, dir)
	if err != nil {
		t.Fatal(err)
	}
	return inv
}

// TestMigrateUnderFaults moves keys while both clusters throttle 20% of
// operations and one target HSM of two goes down mid-run and comes back:
// the run completes and every key is on the target once, with its KCV, on
// both HSMs.
func TestMigrateUnderFaults(t *testing.T) {
	const n = 300
	ctx := context.Background()
	dir := t.TempDir()
	srcC, src := testCluster(t, filepath.Join(dir, "src"))
	dstC, dst := testCluster(t, filepath.Join(dir, "dst"))
	want := map[string]string{}
	for i := 0; i < n; i++ {
		k, err := src.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "f", ID: hsm.Bytes(fmt.Sprintf("f%04d", i))}})
		if err != nil {
			t.Fatal(err)
		}
		want[k.ID.String()] = k.KCV.String()
	}
	p, r := planned(t, src, dst, plan.Options{Transport: "session-kek"}, filepath.Join(dir, "j"))

	throttle := hsm.Fault{Throttle: 0.2}
	for _, c := range []*cluster.Cluster{srcC, dstC} {
		if err := c.SetFault(cluster.AllHSMs, throttle); err != nil {
			t.Fatal(err)
		}
	}
	down := dstC.Info().HSMs[1].ID
	var done atomic.Int64
	var progress progressHook = func() {
		// Keys made while it is down wait for it to come back: bring it
		// back by time, not by progress.
		if done.Add(1) == n/3 {
			dstC.SetFault(down, hsm.Fault{Down: true, Throttle: 0.2})
			time.AfterFunc(500*time.Millisecond, func() { dstC.SetFault(down, throttle) })
		}
	}
	m := migrate.New(p, src, dst, migrate.Options{Workers: 16, Progress: progress, CoverageWait: 10 * time.Second,
		Backoff: runner.Backoff{Base: 5 * time.Millisecond, Cap: 200 * time.Millisecond, MaxAttempts: 20}})
	rep, err := m.Run(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Summary.Failed != 0 || rep.Summary.Done != n {
		t.Fatalf("summary %+v: %s", rep.Summary, runner.FormatFailures(rep.Summary.Failures, 5))
	}
	for _, c := range []*cluster.Cluster{srcC, dstC} {
		c.SetFault(cluster.AllHSMs, hsm.Fault{})
	}
	t.Logf("retries by the runner: %d; cluster stats: source %+v, target %+v", rep.Summary.Retries, srcC.Stats(), dstC.Stats())

	keys, err := dst.ListKeys(ctx, hsm.Filter{Class: hsm.ClassSecret})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, k := range keys {
		if k.Label != "f" {
			continue
		}
		seen[k.ID.String()]++
		if want[k.ID.String()] != k.KCV.String() {
			t.Errorf("key %s: KCV %s, want %s", k.ID, k.KCV, want[k.ID.String()])
		}
		if k.Coverage.Count() < 2 {
			t.Errorf("key %s on %d HSMs", k.ID, k.Coverage.Count())
		}
	}
	for id := range want {
		if seen[id] != 1 {
			t.Errorf("key %s on the target %d times, want once", id, seen[id])
		}
	}
}

// progressHook is a runner.Progress that calls itself as each item ends.
type progressHook func()

func (h progressHook) Start(int, int) {}
func (h progressHook) Finished(bool)  { h() }
func (h progressHook) Stop()          {}
