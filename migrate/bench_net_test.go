package migrate_test

import (
	"context"
	"fmt"
	"path/filepath"
	"syscall"
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
// worker at 1 ms: the goal at 1 ms is ≥ 30× one worker's rate and ≥ 2,000
// keys/s. The same runs between two in-process clusters (the same HSM
// files, no network) are the bound the network stack is measured against:
// on one machine the HSMs' own work and fsyncs share its cores and disk
// with the client, whichever way it reaches them.
func BenchmarkMigrateNetworked(b *testing.B) {
	for _, kind := range []string{"in-process", "networked"} {
		b.Run(kind, func(b *testing.B) { benchMigrateServed(b, kind == "networked") })
	}
}

func benchMigrateServed(b *testing.B, networked bool) {
	const n = 3300
	ctx := context.Background()
	members := func(b *testing.B) cluster.Opener {
		if networked {
			return testcluster.NewServed(b)
		}
		return nil
	}
	srcC, src := clusterOf(b, filepath.Join(b.TempDir(), "src"), members(b))
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
				dstC, dst := clusterOf(b, filepath.Join(b.TempDir(), "dst"), members(b))
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
				cpu0 := cpuTime()
				b.StartTimer()
				start := time.Now()
				rep, err := migrate.New(pl, src, dst, migrate.Options{Workers: tc.workers}).Run(ctx, r)
				el := time.Since(start)
				b.StopTimer()
				cpu := cpuTime() - cpu0
				j.Close()
				if err != nil || rep.Summary.Done != len(inv.Keys) {
					b.Fatalf("run: %v, %+v", err, rep.Summary)
				}
				rate := float64(len(inv.Keys)) / el.Seconds()
				b.ReportMetric(rate, "keys/s")
				b.ReportMetric(float64(cpu.Microseconds())/float64(len(inv.Keys)), "cpu-µs/key")
				b.ReportMetric(cpu.Seconds()/el.Seconds(), "cores")
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

// cpuTime is the CPU time (user and system) the process has used: the
// client's and, in these benchmarks, the served HSMs'.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
