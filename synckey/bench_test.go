package synckey_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/internal/clonediff"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/synckey"
	"github.com/sourcegraph/conc/pool"
)

var (
	benchOfficer = hsm.Credentials{User: "admin", Password: "bench-admin-pass"}
	benchUser    = hsm.Credentials{User: "alice", Password: "bench-alice-pass"}
)

// benchSource makes a 2-HSM cluster with room for capacity keys and a
// crypto user, and returns it open, logged in as that user (the owner of
// the keys it makes, so it may export and insert them masked).
func benchSource(b *testing.B, dir string, capacity int) (*cluster.Cluster, hsm.FullSession) {
	ctx := context.Background()
	c, err := cluster.Init(ctx, cluster.InitOptions{Dir: dir, HSMs: 2, Officer: benchOfficer, KDFIterations: 1000, KeyCapacity: capacity})
	if err != nil {
		b.Fatal(err)
	}
	co, err := c.Login(ctx, benchOfficer)
	if err != nil {
		b.Fatal(err)
	}
	if err := co.(hsm.Users).CreateUser(ctx, benchUser.User, hsm.RoleCryptoUser, benchUser.Password); err != nil {
		b.Fatal(err)
	}
	co.Logout(ctx)
	s, err := c.Login(ctx, benchUser)
	if err != nil {
		b.Fatal(err)
	}
	return c, s.(hsm.FullSession)
}

// benchClone restores backup into dir (2 HSMs) and logs in.
func benchClone(b *testing.B, backup, dir string) (*cluster.Cluster, hsm.FullSession) {
	ctx := context.Background()
	c, err := cluster.Restore(ctx, cluster.RestoreOptions{Backup: backup, Dir: dir, Region: "eu-west-1", HSMs: 2, KDFIterations: 1000})
	if err != nil {
		b.Fatal(err)
	}
	s, err := c.Login(ctx, benchUser)
	if err != nil {
		b.Fatal(err)
	}
	return c, s.(hsm.FullSession)
}

func benchKeys(b *testing.B, s hsm.Session, n int) {
	p := pool.New().WithErrors().WithMaxGoroutines(32)
	for i := 0; i < n; i++ {
		p.Go(func() error {
			_, err := s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "bench", ID: hsm.Bytes(fmt.Sprintf("b%06d", i))}})
			return err
		})
	}
	if err := p.Wait(); err != nil {
		b.Fatal(err)
	}
}

func envKeys(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// BenchmarkSynckeyDiff16666 diffs two 2-HSM clones of 16,666 keys each
// (CloudHSM hsm2m's per-cluster maximum): both listings and the comparison,
// as synckey does before each run. Goal: under 1 s.
func BenchmarkSynckeyDiff16666(b *testing.B) {
	n := envKeys("KEYMIG_BENCH_DIFF_KEYS", 16666)
	ctx := context.Background()
	dir := b.TempDir()
	srcC, src := benchSource(b, filepath.Join(dir, "src"), n+100)
	defer srcC.Close()
	made := time.Now()
	benchKeys(b, src, n)
	backup := filepath.Join(dir, "src.backup")
	if _, err := srcC.Backup(ctx, backup); err != nil {
		b.Fatal(err)
	}
	dstC, dst := benchClone(b, backup, filepath.Join(dir, "dst"))
	defer dstC.Close()
	b.Logf("made %d keys and a clone in %s (not timed)", n, time.Since(made).Round(time.Millisecond))
	s := synckey.New(synckey.Pair{Source: src, Target: dst, SourceDir: "src", TargetDir: "dst"}, nil, synckey.Options{})

	b.ResetTimer()
	var total time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		d, _, _, err := s.Diff(ctx)
		total += time.Since(start)
		if err != nil {
			b.Fatal(err)
		}
		if c := d.Counts(); c[clonediff.MarkSame] != n {
			b.Fatalf("diff of two identical clones: %v", c)
		}
	}
	sec := total.Seconds() / float64(b.N)
	b.ReportMetric(sec, "s/diff")
	b.Logf("diff of two %d-key clones: %.3f s (goal < 1 s: %s)", n, sec, verdict(sec < 1))
}

// BenchmarkSynckeyCopy3300 copies 3,300 keys (the default cluster
// capacity) into an empty clone: masked export, insert, read back, the
// journal fsyncing each transition.
func BenchmarkSynckeyCopy3300(b *testing.B) {
	n := envKeys("KEYMIG_BENCH_COPY_KEYS", 3300)
	ctx := context.Background()
	dir := b.TempDir()
	srcC, src := benchSource(b, filepath.Join(dir, "src"), n+100)
	defer srcC.Close()
	backup := filepath.Join(dir, "empty.backup")
	if _, err := srcC.Backup(ctx, backup); err != nil {
		b.Fatal(err)
	}
	benchKeys(b, src, n)

	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		it := b.TempDir()
		dstC, dst := benchClone(b, backup, filepath.Join(it, "dst"))
		j, err := journal.Open(filepath.Join(it, "sync.journal"), journal.Options{BatchSize: 64})
		if err != nil {
			b.Fatal(err)
		}
		s := synckey.New(synckey.Pair{Source: src, Target: dst, SourceDir: "src", TargetDir: "dst"}, j, synckey.Options{Workers: 64})
		b.StartTimer()
		start := time.Now()
		res, err := s.Sync(ctx)
		el := time.Since(start)
		b.StopTimer()
		j.Close()
		dst.Logout(ctx)
		dstC.Close()
		if err != nil || res.Summary.Copied != n {
			b.Fatalf("sync: %v, %s", err, res.Summary)
		}
		b.ReportMetric(el.Seconds(), "s/copy")
		b.ReportMetric(float64(n)/el.Seconds(), "keys/s")
		b.Logf("full copy of %d keys into an empty clone: %.2f s (%.0f keys/s)", n, el.Seconds(), float64(n)/el.Seconds())
	}
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}
