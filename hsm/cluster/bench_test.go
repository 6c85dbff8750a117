package cluster

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
)

// BenchmarkClusterLatency measures wrap, unwrap and encrypt operations per
// second against a 2-HSM cluster whose HSMs are 1 ms away, at 1, 16 and 64
// concurrent callers, and prints how much 64 callers gain over 1 (the goal
// is at least 30×: the round trip hidden by concurrency).
func BenchmarkClusterLatency(b *testing.B) {
	ctx := context.Background()
	c := newCluster(b, 2)
	s := login(b, c, alice)
	kek := genAES(b, s, "kek", nil)
	payload := genAES(b, s, "payload", map[hsm.Attr]bool{hsm.AttrExtractable: true})
	wrapReq := hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: payload.Ref}
	blob, err := s.WrapKey(ctx, wrapReq)
	if err != nil {
		b.Fatal(err)
	}
	unwrapReq := hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: blob,
		Class: hsm.ClassSecret, Type: hsm.TypeAES, Template: hsm.Template{Label: "unwrapped", Session: true}}
	if err := c.SetFault(AllHSMs, hsm.Fault{Latency: time.Millisecond}); err != nil {
		b.Fatal(err)
	}
	ops := []struct {
		name string
		fn   func() error
	}{
		{"wrap", func() error { _, err := s.WrapKey(ctx, wrapReq); return err }},
		{"unwrap", func() error { _, err := s.UnwrapKey(ctx, unwrapReq); return err }},
		{"encrypt", func() error { return encrypt(ctx, s, kek.Ref) }},
	}
	rates := map[string]map[int]float64{}
	var mu sync.Mutex
	for _, op := range ops {
		rates[op.name] = map[int]float64{}
		for _, callers := range []int{1, 16, 64} {
			b.Run(fmt.Sprintf("%s/callers=%d", op.name, callers), func(b *testing.B) {
				var next atomic.Int64
				var wg sync.WaitGroup
				start := time.Now()
				for range callers {
					wg.Go(func() {
						for next.Add(1) <= int64(b.N) {
							if err := op.fn(); err != nil {
								b.Error(err)
								return
							}
						}
					})
				}
				wg.Wait()
				rate := float64(b.N) / time.Since(start).Seconds()
				b.ReportMetric(rate, "ops/s")
				mu.Lock()
				rates[op.name][callers] = rate
				mu.Unlock()
			})
		}
	}
	for _, op := range ops {
		r := rates[op.name]
		if r[1] == 0 {
			continue
		}
		ratio := r[64] / r[1]
		verdict := "meets"
		if ratio < 30 {
			verdict = "MISSES"
		}
		fmt.Printf("BenchmarkClusterLatency %s: 1 caller %.0f ops/s, 16 callers %.0f ops/s, 64 callers %.0f ops/s: 64/1 = %.1fx (%s the goal of >= 30x)\n",
			op.name, r[1], r[16], r[64], ratio, verdict)
	}
	b.Logf("stats: %+v", c.Stats())
}
