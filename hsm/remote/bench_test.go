package remote_test

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/node"
	"github.com/keymig/keymig/hsm/pki"
)

// percentiles reports p50 and p99 of ds as metrics.
func percentiles(b *testing.B, ds []time.Duration) {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	if len(ds) == 0 {
		return
	}
	b.ReportMetric(float64(ds[len(ds)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(ds[len(ds)*99/100].Microseconds()), "p99-µs")
}

// BenchmarkRoundTrip measures a call that does nothing through the whole
// stack (JSON, HTTP/2, TLS 1.3, loopback) against a bare ping over a TLS
// 1.3 connection in the same run: the difference is the RPC layer's cost.
func BenchmarkRoundTrip(b *testing.B) {
	p := thePKI(b)
	b.Run("rpc-ping", func(b *testing.B) {
		n := newNode(b, node.Options{})
		m := p.client(b, n.ID(), p.serve(b, n, n.ID(), pki.Options{}, nil), nil)
		ctx := context.Background()
		if err := m.Ping(ctx); err != nil {
			b.Fatal(err)
		}
		ds := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for range b.N {
			t := time.Now()
			if err := m.Ping(ctx); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(t))
		}
		percentiles(b, ds)
	})
	b.Run("tls-ping", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		kp, err := pki.IssueHSM(p.cluster, "hsm-ping", ln.Addr().String(), pki.Options{})
		if err != nil {
			b.Fatal(err)
		}
		scfg, _ := pki.ServerConfig(pki.ServerTLS{HSM: kp})
		go func() {
			c, err := tls.NewListener(ln, scfg).Accept()
			if err != nil {
				return
			}
			defer c.Close()
			io.Copy(c, c) // echo
		}()
		ccfg, _ := pki.ClientConfig(p.ca.CertPEM, "hsm-ping", ln.Addr().String(), nil)
		c, err := tls.Dial("tcp", ln.Addr().String(), ccfg)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, 1)
		ds := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for range b.N {
			t := time.Now()
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				b.Fatal(err)
			}
			ds = append(ds, time.Since(t))
		}
		percentiles(b, ds)
	})
}

// BenchmarkWrap measures AES-KWP wraps per second by 64 concurrent callers
// on one HSM, in-process and through the server, with and without 1 ms of
// latency injected on every HSM call.
func BenchmarkWrap(b *testing.B) {
	p := thePKI(b)
	for _, where := range []string{"local", "remote"} {
		for _, lat := range []time.Duration{0, time.Millisecond} {
			b.Run(where+"/latency="+lat.String(), func(b *testing.B) {
				ctx := context.Background()
				n := newNode(b, node.Options{MaxConcurrentOps: 256})
				var be hsm.Backend = n
				if where == "remote" {
					be = p.client(b, n.ID(), p.serve(b, n, n.ID(), pki.Options{}, nil), nil)
				}
				co, err := be.Login(ctx, officer)
				if err != nil {
					b.Fatal(err)
				}
				if err := co.(hsm.Users).CreateUser(ctx, "alice", hsm.RoleCryptoUser, "correct-horse"); err != nil {
					b.Fatal(err)
				}
				s, err := be.Login(ctx, hsm.Credentials{User: "alice", Password: "correct-horse"})
				if err != nil {
					b.Fatal(err)
				}
				kek, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "kek", Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}}})
				if err != nil {
					b.Fatal(err)
				}
				pl, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "payload", Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: true}}})
				if err != nil {
					b.Fatal(err)
				}
				n.SetFault(hsm.Fault{Latency: lat})
				req := hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: pl.Ref}
				var next atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for range 64 {
					wg.Go(func() {
						for next.Add(1) <= int64(b.N) {
							if _, err := s.WrapKey(ctx, req); err != nil {
								b.Error(err)
								return
							}
						}
					})
				}
				wg.Wait()
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "wraps/s")
			})
		}
	}
}
