package wrap

import (
	"crypto"
	"fmt"
	"testing"
)

// Benchmarks report ops/s besides ns/op: migrations are sized in keys per
// second. Each runs on one goroutine and on all cores (RunParallel); keys are
// read once (rsaKey) outside the timer.

func reportOps(b *testing.B) {
	if s := b.Elapsed().Seconds(); s > 0 {
		b.ReportMetric(float64(b.N)/s, "ops/s")
	}
}

// benchBoth runs op serially and in parallel as two sub-benchmarks.
func benchBoth(b *testing.B, op func() error) {
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := op(); err != nil {
				b.Fatal(err)
			}
		}
		reportOps(b)
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := op(); err != nil {
					b.Error(err)
					return
				}
			}
		})
		reportOps(b)
	})
}

func BenchmarkAESKeyWrap(b *testing.B) {
	kek, key := seq(32), seq(32)
	kw, _ := KeyWrap(kek, key)
	kwp, _ := KeyWrapPad(kek, key)
	b.Run("kw-wrap", func(b *testing.B) { benchBoth(b, func() error { _, err := KeyWrap(kek, key); return err }) })
	b.Run("kw-unwrap", func(b *testing.B) { benchBoth(b, func() error { _, err := KeyUnwrap(kek, kw); return err }) })
	b.Run("kwp-wrap", func(b *testing.B) { benchBoth(b, func() error { _, err := KeyWrapPad(kek, key); return err }) })
	b.Run("kwp-unwrap", func(b *testing.B) { benchBoth(b, func() error { _, err := KeyUnwrapPad(kek, kwp); return err }) })
}

func BenchmarkRSAUnwrap(b *testing.B) {
	for _, bits := range testKeyBits {
		priv := rsaKey(b, bits)
		p := RSAAESParams{OAEP: OAEPParams{Hash: crypto.SHA256}}
		oaep, err := WrapOAEP(&priv.PublicKey, seq(32), p.OAEP)
		if err != nil {
			b.Fatal(err)
		}
		rsaAES, err := WrapRSAAES(&priv.PublicKey, seq(32), p)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("oaep-%d", bits), func(b *testing.B) {
			benchBoth(b, func() error { _, err := UnwrapOAEP(priv, oaep, p.OAEP); return err })
		})
		b.Run(fmt.Sprintf("rsa-aes-%d", bits), func(b *testing.B) {
			benchBoth(b, func() error { _, err := UnwrapRSAAES(priv, rsaAES, p); return err })
		})
	}
}
