package migrate_test

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/migrate"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/runner"
)

// throttlingHSMs are local HSMs whose sessions answer "throttled" to the
// first throttle wraps (all of them if throttle < 0), counting every wrap
// an HSM is asked for: a test double injected through cluster.Opener.
type throttlingHSMs struct {
	cluster.LocalHSMs
	throttle int64
	wraps    *atomic.Int64
}

func (o throttlingHSMs) Create(dir string, s cluster.MemberSpec) (cluster.Member, error) {
	m, err := o.LocalHSMs.Create(dir, s)
	return throttlingMember{Member: m, o: o}, err
}

type throttlingMember struct {
	cluster.Member
	o throttlingHSMs
}

func (m throttlingMember) Login(ctx context.Context, c hsm.Credentials) (hsm.Session, error) {
	s, err := m.Member.Login(ctx, c)
	if err != nil {
		return nil, err
	}
	return throttlingSession{FullSession: s.(hsm.FullSession), o: m.o}, nil
}

type throttlingSession struct {
	hsm.FullSession
	o throttlingHSMs
}

func (s throttlingSession) WrapKey(ctx context.Context, r hsm.WrapRequest) ([]byte, error) {
	if n := s.o.wraps.Add(1); s.o.throttle < 0 || n <= s.o.throttle {
		return nil, hsm.Errorf(hsm.CodeThrottled, "wrap", r.Payload, "the HSM is busy")
	}
	return s.FullSession.WrapKey(ctx, r)
}

// TestThrottledWrapIsRetriedByOneLayer moves one key from a source whose
// HSMs throttle its wraps, and counts the wraps the HSMs are asked for: the
// cluster retries a throttled answer, up to cluster.ThrottleAttempts tries,
// and the runner adds none of its own.
func TestThrottledWrapIsRetriedByOneLayer(t *testing.T) {
	tests := []struct {
		name      string
		throttle  int64
		wantWraps int64
		wantDone  int
	}{
		{"throttled three times", 3, 4, 1},
		{"throttled every time", -1, cluster.ThrottleAttempts, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			var wraps atomic.Int64
			_, src := clusterOf(t, filepath.Join(dir, "src"), throttlingHSMs{throttle: tt.throttle, wraps: &wraps})
			if _, err := src.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "k", ID: hsm.Bytes("k1")}}); err != nil {
				t.Fatal(err)
			}
			_, dst := testCluster(t, filepath.Join(dir, "dst"))
			p, r := planned(t, src, dst, plan.Options{Transport: "rsa-aes", TransportBits: 2048}, filepath.Join(dir, "j"))

			if n := wraps.Load(); n != 0 {
				t.Fatalf("%d wraps before the migration", n)
			}
			rep, err := migrate.New(p, src, dst, migrate.Options{Workers: 1, Backoff: runner.Backoff{Base: time.Millisecond, Cap: time.Millisecond, MaxAttempts: 5}}).Run(ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			if got := wraps.Load(); got != tt.wantWraps {
				t.Errorf("the HSMs were asked to wrap %d times, want %d", got, tt.wantWraps)
			}
			if rep.Summary.Retries != 0 || rep.Summary.Done != tt.wantDone {
				t.Errorf("runner: %d retries, %d done; want no retries and %d done (%s)", rep.Summary.Retries, rep.Summary.Done, tt.wantDone, runner.FormatFailures(rep.Summary.Failures, 3))
			}
		})
	}
}
