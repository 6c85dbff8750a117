package rotate_test

import (
	"context"
	"crypto/aes"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/wrap"
)

// BenchmarkRotate rotates 1,000,000 data keys (KEYMIG_BENCH_RECORDS
// overrides) within one embedded 2-HSM cluster and reports records/s and
// the process's peak RSS, next to the same-run bound: AES-KWP unwrap+wrap
// pairs per second on this machine, done by the wrap package directly on
// every core. The file holds 10,000 distinct data keys made by the HSM,
// each copied 100 times with its own id: every record costs the HSMs the
// same three operations (unwrap, wrap, delete) as a distinct one would.
// Goals: ≥ 50,000 records/s and peak RSS ≤ 200 MB.
func BenchmarkRotate(b *testing.B) {
	records := 1_000_000
	if v, err := strconv.Atoi(os.Getenv("KEYMIG_BENCH_RECORDS")); err == nil && v > 0 {
		records = v
	}
	distinct := min(records, 10_000)
	ctx := context.Background()
	dir := b.TempDir()
	_, ss := testCluster(b, filepath.Join(dir, "c"), 2, 8)
	side := rotate.Side{Name: "c", Sessions: ss}
	_, old := master(b, ss[0], "tde-old")
	_, nw := master(b, ss[0], "tde-new")
	in := filepath.Join(dir, "datakeys.jsonl")
	generate(b, side, old, distinct, rotate.AlgKWP, in)
	replicate(b, in, records/distinct)
	bound := kwpBound(time.Second)

	var rusage syscall.Rusage
	b.ResetTimer()
	var rate float64
	for i := range b.N {
		out := filepath.Join(dir, fmt.Sprintf("rotated-%d.jsonl", i))
		j := openJournal(b, out+".journal")
		rep, err := rotate.Run(ctx, j, rotate.Config{Source: side, From: old, To: nw, In: in, Out: out, Workers: 64})
		if err != nil {
			b.Fatal(err)
		}
		if rep.Rotated != int64(distinct*(records/distinct)) {
			b.Fatalf("rotated %d", rep.Rotated)
		}
		rate = rep.Rate()
		os.Remove(out)
	}
	b.StopTimer()
	syscall.Getrusage(syscall.RUSAGE_SELF, &rusage)
	rss := float64(rusage.Maxrss) / 1024 // Linux reports KiB
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	b.ReportMetric(float64(ms.Sys)/(1<<20), "go-runtime-MB")
	b.ReportMetric(rate, "records/s")
	b.ReportMetric(rss, "peak-RSS-MB")
	b.ReportMetric(bound, "kwp-bound-pairs/s")
	verdict := func(ok bool) string {
		if ok {
			return "meets"
		}
		return "MISSES"
	}
	fmt.Printf("BenchmarkRotate: %d records in a 2-HSM cluster: %.0f records/s (%s the goal of >= 50000), peak RSS %.0f MB (%s the goal of <= 200 MB); bound: %.0f AES-KWP unwrap+wrap pairs/s on %d cores with the wrap package\n",
		records, rate, verdict(rate >= 50000), rss, verdict(rss <= 200), bound, runtime.GOMAXPROCS(0))
}

// kwpBound measures AES-KWP unwrap+wrap pairs per second of 256-bit keys
// under 256-bit KEKs, on every core, for about d.
func kwpBound(d time.Duration) float64 {
	kek1, kek2, dk := make([]byte, 32), make([]byte, 32), make([]byte, 32)
	rand.Read(kek1)
	rand.Read(kek2)
	rand.Read(dk)
	b1, _ := aes.NewCipher(kek1)
	b2, _ := aes.NewCipher(kek2)
	blob, _ := wrap.KeyWrapPadBlock(b1, dk)
	var n atomic.Int64
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for time.Now().Before(stop) {
				for range 256 {
					k, err := wrap.KeyUnwrapPadBlock(b1, blob)
					if err != nil {
						panic(err)
					}
					wrap.KeyWrapPadBlock(b2, k)
				}
				n.Add(256)
			}
		})
	}
	wg.Wait()
	return float64(n.Load()) / d.Seconds()
}
