package node_test

import (
	"context"
	"fmt"
	"runtime"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
)

// benchNode is a node with alice, an AES KEK (wrap, unwrap, encrypt,
// decrypt) and a payload key, sized for benchmarks.
func benchNode(b *testing.B) (hsm.Session, hsm.KeyInfo, hsm.KeyInfo) {
	_, s := withAlice(b, node.Options{FIPS: true, KeyCapacity: 1 << 30, MaxConcurrentOps: 1 << 20})
	ctx := context.Background()
	kek, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
		Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrUnwrap: true, hsm.AttrEncrypt: true, hsm.AttrDecrypt: true}}})
	if err != nil {
		b.Fatal(err)
	}
	p, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256})
	if err != nil {
		b.Fatal(err)
	}
	return s, kek, p
}

// parallel runs op at the given number of goroutines and reports ops/s.
func parallel(b *testing.B, goroutines int, op func() error) {
	b.ReportAllocs()
	if goroutines == 1 {
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if err := op(); err != nil {
				b.Fatal(err)
			}
		}
	} else {
		b.SetParallelism((goroutines + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := op(); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

func BenchmarkNode(b *testing.B) {
	ctx := context.Background()
	for _, g := range []int{1, 64} {
		b.Run(fmt.Sprintf("wrap/aes-kwp/g=%d", g), func(b *testing.B) {
			s, kek, p := benchNode(b)
			parallel(b, g, func() error {
				_, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: p.Ref})
				return err
			})
		})
		b.Run(fmt.Sprintf("unwrap/aes-kwp/token/g=%d", g), func(b *testing.B) {
			s, kek, p := benchNode(b)
			blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: p.Ref})
			if err != nil {
				b.Fatal(err)
			}
			parallel(b, g, func() error {
				_, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: blob, Class: hsm.ClassSecret, Type: hsm.TypeAES})
				return err
			})
		})
		b.Run(fmt.Sprintf("encrypt/aes-gcm/g=%d", g), func(b *testing.B) {
			s, kek, _ := benchNode(b)
			msg := make([]byte, 256)
			parallel(b, g, func() error {
				_, err := s.Encrypt(ctx, kek.Ref, hsm.MechAESGCM, hsm.Params{}, msg)
				return err
			})
		})
	}
}
