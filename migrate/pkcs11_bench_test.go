package migrate_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/pkcs11"
	"github.com/keymig/keymig/internal/softhsmtest"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/migrate"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/runner"
	"github.com/sourcegraph/conc/pool"
)

// BenchmarkTokenToCluster moves 200 and 2,000 AES-256 keys from a
// SoftHSM2 token into a 2-HSM included cluster by session-kek (the
// transport plan negotiates with SoftHSM: OAEP-SHA1 for the KEK, KWP per
// key), and prints keys/s beside, measured in the same run:
//   - the per-key pkcs11-tool loop a user would script
//     (../shared/peers/softhsm/migrate-loop.sh, N=200, VERIFY=0; set
//     KEYMIG_BENCH_NO_PEER=1 to leave it out, KEYMIG_SOFTHSM_PEER to point
//     elsewhere); goal ≥ 20× its keys/s;
//   - the bound: SoftHSM's own rate for the token's share of a key, one
//     CKM_AES_KEY_WRAP_PAD wrap, with one goroutine and with the session
//     pool's size.
func BenchmarkTokenToCluster(b *testing.B) {
	e := softhsmtest.Shared(b)
	ctx := context.Background()
	loop := peerLoopRate(b)
	for _, n := range []int{200, 2000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			label := e.NewToken(b, "bench")
			u, err := pkcs11.ParseURI(e.URI(label))
			if err != nil {
				b.Fatal(err)
			}
			tok, err := pkcs11.Open(ctx, u, pkcs11.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer tok.Close()
			src, err := tok.Login(ctx, hsm.Credentials{Password: softhsmtest.UserPIN})
			if err != nil {
				b.Fatal(err)
			}
			defer src.Logout(ctx)
			p := pool.New().WithErrors().WithMaxGoroutines(8)
			for i := range n {
				p.Go(func() error {
					_, err := src.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: fmt.Sprintf("mk-%05d", i), ID: hsm.Bytes(fmt.Sprintf("mk%06d", i)),
						Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: true, hsm.AttrDecrypt: true}}})
					return err
				})
			}
			if err := p.Wait(); err != nil {
				b.Fatal(err)
			}
			srcInv := benchInventory(b, u.String(), src)
			bound1, boundN := kwpBound(b, src, srcInv.Keys[0].Ref)
			defer runner.ProcsForStorage()()
			b.ResetTimer()
			for it := 0; it < b.N; it++ {
				b.StopTimer()
				_, dst := benchCluster(b, filepath.Join(b.TempDir(), "dst"))
				pl, err := plan.Build(srcInv, benchInventory(b, "dst", dst), plan.Options{}, time.Now())
				if err != nil {
					b.Fatal(err)
				}
				if pl.Transport.Method != plan.MethodSessionKEK {
					b.Fatalf("plan chose %s: %s", pl.Transport.Method, pl.Transport.Why)
				}
				j, err := journal.Open(filepath.Join(b.TempDir(), "j"), journal.Options{BatchSize: 64})
				if err != nil {
					b.Fatal(err)
				}
				r, _, _, err := j.Begin(pl.Digest, migrate.RunKind, nil)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				start := time.Now()
				rep, err := migrate.New(pl, src, dst, migrate.Options{Workers: 64}).Run(ctx, r)
				el := time.Since(start)
				b.StopTimer()
				j.Close()
				if err != nil || rep.Summary.Done != n {
					b.Fatalf("run: %v, %+v", err, rep.Summary)
				}
				rate := float64(n) / el.Seconds()
				b.ReportMetric(rate, "keys/s")
				b.ReportMetric(bound1, "kwp-wraps/s")
				msg := fmt.Sprintf("token → cluster, %d keys, %s (%s): %.0f keys/s; SoftHSM KWP wrap bound %.0f/s (1 goroutine), %.0f/s (%d): %.0f%% of the bound",
					n, pl.Transport.Method, pl.Transport.Hash, rate, bound1, boundN, pkcs11.DefaultSessions, 100*rate/max(bound1, boundN))
				if loop > 0 {
					b.ReportMetric(rate/loop, "x-loop")
					msg += fmt.Sprintf("; migrate-loop.sh N=200 %.1f keys/s in this run: %.0f× (goal ≥ 20×)", loop, rate/loop)
				} else {
					msg += "; migrate-loop.sh not run"
				}
				b.Log(msg)
				fmt.Fprintln(os.Stderr, "BENCH", msg)
			}
		})
	}
}

// kwpBound measures CKM_AES_KEY_WRAP_PAD wraps of payload per second on
// the token, for about a second, with one goroutine and with the pool's size.
func kwpBound(b *testing.B, s hsm.Session, payload hsm.KeyRef) (one, many float64) {
	ctx := context.Background()
	kek, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: plan.TransportLabelPrefix + "-bench", Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}}})
	if err != nil {
		b.Fatal(err)
	}
	rate := func(workers int) float64 {
		var ops atomic.Int64
		deadline := time.Now().Add(time.Second)
		start := time.Now()
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				for time.Now().Before(deadline) {
					if _, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: payload}); err != nil {
						b.Error(err)
						return
					}
					ops.Add(1)
				}
			})
		}
		wg.Wait()
		return float64(ops.Load()) / time.Since(start).Seconds()
	}
	return rate(1), rate(pkcs11.DefaultSessions)
}

// peerLoopRate runs the pkcs11-tool baseline once (N=200, its migrate
// phase) in a SoftHSM directory of its own and returns its keys/s, or 0
// when it is left out or absent.
func peerLoopRate(b *testing.B) float64 {
	if os.Getenv("KEYMIG_BENCH_NO_PEER") == "1" {
		b.Log("KEYMIG_BENCH_NO_PEER=1: the migrate-loop.sh baseline is not run")
		return 0
	}
	peer := os.Getenv("KEYMIG_SOFTHSM_PEER")
	if peer == "" {
		peer = filepath.Join("..", "..", "shared", "peers", "softhsm")
	}
	if _, err := os.Stat(filepath.Join(peer, "migrate-loop.sh")); err != nil {
		b.Logf("no migrate-loop.sh in %s (set KEYMIG_SOFTHSM_PEER): the baseline is not run", peer)
		return 0
	}
	dir := filepath.Join(b.TempDir(), "peer")
	env := append(os.Environ(), "VERIFY=0")
	for _, args := range [][]string{{filepath.Join(peer, "setup.sh"), dir}, {filepath.Join(peer, "migrate-loop.sh"), "200", dir}} {
		cmd := exec.Command("bash", args...)
		cmd.Env = env
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			b.Fatalf("%v: %v\n%s", args, err, out.String())
		}
		sc := bufio.NewScanner(&out)
		for sc.Scan() {
			if m := resultRE.FindStringSubmatch(sc.Text()); m != nil {
				v, _ := strconv.ParseFloat(m[1], 64)
				b.Logf("migrate-loop.sh: %s", sc.Text())
				fmt.Fprintln(os.Stderr, "BENCH migrate-loop.sh:", sc.Text())
				return v
			}
		}
	}
	b.Fatal("migrate-loop.sh printed no RESULT line")
	return 0
}

var resultRE = regexp.MustCompile(`^RESULT .*migrate_keys_per_s=([0-9.]+)`)
