package migrate_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/internal/testcluster"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/migrate"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/runner"
	"github.com/sourcegraph/conc/pool"
)

// BenchmarkMigrateNetworked moves 3,300 AES-256 keys (a full default
// cluster) between two networked 2-HSM clusters on loopback (every HSM
// call through hsm/remote, HTTP/2 and TLS 1.3 to hsm/server), session-kek,
// 64 workers, without and with 1 ms of latency on every HSM call, and one
// worker at 1 ms for the bound: the goal at 1 ms is ≥ 30× one worker's
// rate and ≥ 2,000 keys/s.
func BenchmarkMigrateNetworked(b *testing.B) {
	const n = 3300
	ctx := context.Background()
	srcC, src := clusterOf(b, filepath.Join(b.TempDir(), "src"), testcluster.NewServed(b))
	p := pool.New().WithErrors().WithMaxGoroutines(32)
	for i := range n {
		p.Go(func() error {
			_, err := src.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "bench", ID: hsm.Bytes(fmt.Sprintf("n%06d", i))}})
			return err
		})
	}
	if err := p.Wait(); err != nil {
		b.Fatal(err)
	}
	srcInv := benchInventory(b, "src", src)
	var oneWorker float64
	for _, tc := range []struct {
		latency time.Duration
		workers int
		keys    int
	}{{time.Millisecond, 1, 200}, {0, 64, n}, {time.Millisecond, 64, n}} {
		b.Run(fmt.Sprintf("latency=%s/workers=%d", tc.latency, tc.workers), func(b *testing.B) {
			defer runner.ProcsForStorage()()
			for range b.N {
				b.StopTimer()
				dstC, dst := clusterOf(b, filepath.Join(b.TempDir(), "dst"), testcluster.NewServed(b))
				for _, c := range []*cluster.Cluster{srcC, dstC} {
					if err := c.SetFault(cluster.AllHSMs, hsm.Fault{Latency: tc.latency}); err != nil {
						b.Fatal(err)
					}
				}
				inv := srcInv
				inv.Keys = inv.Keys[:min(len(inv.Keys), tc.keys)]
				pl, err := plan.Build(inv, benchInventory(b, "dst", dst), plan.Options{Transport: "session-kek", TransportBits: 2048}, time.Now())
				if err != nil {
					b.Fatal(err)
				}
				j, err := journal.Open(filepath.Join(b.TempDir(), "j"), journal.Options{BatchSize: tc.workers})
				if err != nil {
					b.Fatal(err)
				}
				r, _, _, err := j.Begin(pl.Digest, migrate.RunKind, nil)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				start := time.Now()
				rep, err := migrate.New(pl, src, dst, migrate.Options{Workers: tc.workers}).Run(ctx, r)
				el := time.Since(start)
				b.StopTimer()
				j.Close()
				if err != nil || rep.Summary.Done != len(inv.Keys) {
					b.Fatalf("run: %v, %+v", err, rep.Summary)
				}
				rate := float64(len(inv.Keys)) / el.Seconds()
				b.ReportMetric(rate, "keys/s")
				if tc.workers == 1 {
					oneWorker = rate
				} else if tc.latency > 0 && oneWorker > 0 {
					b.Logf("at %s: %.0f keys/s with %d workers, %.1f× one worker's %.0f keys/s (goal ≥ 30× and ≥ 2000 keys/s)",
						tc.latency, rate, tc.workers, rate/oneWorker, oneWorker)
				}
			}
		})
	}
}
