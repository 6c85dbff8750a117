package remote_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/internal/wire"
	"github.com/keymig/keymig/hsm/node"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/hsm/remote"
	"github.com/keymig/keymig/hsm/server"
)

// gated is an HSM whose GetKey waits: it says on started that it began,
// then returns when release is closed (or its context ends, said on
// gaveUp).
type gated struct {
	cluster.Member
	started chan struct{}
	release chan struct{}
	gaveUp  chan error
}

func (g gated) Login(ctx context.Context, c hsm.Credentials) (hsm.Session, error) {
	s, err := g.Member.Login(ctx, c)
	if err != nil {
		return nil, err
	}
	return gatedSession{FullSession: s.(hsm.FullSession), g: g}, nil
}

type gatedSession struct {
	hsm.FullSession
	g gated
}

func (s gatedSession) GetKey(ctx context.Context, ref hsm.KeyRef) (hsm.KeyInfo, error) {
	s.g.started <- struct{}{}
	select {
	case <-s.g.release:
		return s.FullSession.GetKey(ctx, ref)
	case <-ctx.Done():
		s.g.gaveUp <- ctx.Err()
		return hsm.KeyInfo{}, ctx.Err()
	}
}

func newGated(m cluster.Member) gated {
	return gated{Member: m, started: make(chan struct{}, 16), release: make(chan struct{}), gaveUp: make(chan error, 16)}
}

// signalHandler is a slog handler that closes seen at the first record
// whose message is msg.
type signalHandler struct {
	msg  string
	seen chan struct{}
	once *sync.Once
}

func (h signalHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h signalHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message == h.msg {
		h.once.Do(func() { close(h.seen) })
	}
	return nil
}
func (h signalHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h signalHandler) WithGroup(string) slog.Handler      { return h }

// multiHandler hands each record to all its handlers.
type multiHandler []slog.Handler

func (hs multiHandler) Enabled(context.Context, slog.Level) bool { return true }
func (hs multiHandler) Handle(ctx context.Context, r slog.Record) error {
	for _, h := range hs {
		h.Handle(ctx, r)
	}
	return nil
}
func (hs multiHandler) WithAttrs([]slog.Attr) slog.Handler { return hs }
func (hs multiHandler) WithGroup(string) slog.Handler      { return hs }

// serveWith serves m like testPKI.serve, with a logger, and returns the
// server.
func (p *testPKI) serveWith(t *testing.T, m cluster.Member, lg *slog.Logger) (*server.Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	kp, err := pki.IssueHSM(p.cluster, m.ID(), ln.Addr().String(), pki.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := pki.ServerConfig(pki.ServerTLS{HSM: kp, PeerAnchorPEM: p.ca.CertPEM})
	if err != nil {
		t.Fatal(err)
	}
	srv := server.New(m, server.Options{TLS: cfg, Logger: lg})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Shutdown(context.Background())
		<-done
	})
	return srv, ln.Addr().String()
}

// loginAlice makes alice, a crypto user, on m and logs her in.
func loginAlice(t *testing.T, m cluster.Member) hsm.Session {
	t.Helper()
	ctx := ctxT(t)
	co, err := m.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	if err := co.(hsm.FullSession).CreateUser(ctx, "alice", hsm.RoleCryptoUser, "correct-horse"); err != nil {
		t.Fatal(err)
	}
	s, err := m.Login(ctx, hsm.Credentials{User: "alice", Password: "correct-horse"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestStreamAnswersEachCall: calls made at once on one stream each get
// their own answer.
func TestStreamAnswersEachCall(t *testing.T) {
	p := thePKI(t)
	n := newNode(t, node.Options{MaxConcurrentOps: 1 << 10})
	m := p.client(t, n.ID(), p.serve(t, n, n.ID(), pki.Options{}, nil), nil)
	ctx := ctxT(t)
	s := loginAlice(t, m)
	const calls = 300
	errs := make(chan error, calls)
	var wg sync.WaitGroup
	for i := range calls {
		wg.Go(func() {
			label := fmt.Sprint("key-", i)
			k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Label: label, Session: i%2 == 0}})
			if err == nil && k.Label != label {
				err = fmt.Errorf("the call for %s was answered with key %s labelled %s", label, k.Ref, k.Label)
			}
			if err == nil {
				var got hsm.KeyInfo
				if got, err = s.GetKey(ctx, k.Ref); err == nil && got.Label != label {
					err = fmt.Errorf("looking up %s (%s) answered %s", k.Ref, label, got.Label)
				}
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// TestStreamDeadlineTravels: a call on the stream runs on the HSM under
// its caller's deadline.
func TestStreamDeadlineTravels(t *testing.T) {
	p := thePKI(t)
	g := newGated(newNode(t, node.Options{}))
	m := p.client(t, g.ID(), p.serve(t, g, g.ID(), pki.Options{}, nil), nil)
	s, err := m.Login(ctxT(t), officer)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := s.GetKey(ctx, 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call past its deadline: %v, want context.DeadlineExceeded", err)
	}
	select {
	case err := <-g.gaveUp:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("the HSM's call ended with %v, want its deadline", err)
		}
	case <-ctxT(t).Done():
		t.Fatal("the HSM never gave up the call: its deadline did not travel")
	}
}

// TestStreamShutdownDrains: a server shutting down answers the calls it is
// running, and a call sent after it stopped reading is refused as never
// run (retry-safe), not as one whose outcome is unknown.
func TestStreamShutdownDrains(t *testing.T) {
	p := thePKI(t)
	n := newNode(t, node.Options{})
	g := newGated(n)
	drained := signalHandler{msg: server.StreamDrained, seen: make(chan struct{}), once: new(sync.Once)}
	refused := signalHandler{msg: server.StreamRefused, seen: make(chan struct{}), once: new(sync.Once)}
	srv, addr := p.serveWith(t, g, slog.New(multiHandler{drained, refused}))
	m := p.client(t, g.ID(), addr, nil)
	ctx := ctxT(t)
	s := loginAlice(t, m)
	k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "drained"}})
	if err != nil {
		t.Fatal(err)
	}
	first := make(chan error, 1)
	go func() {
		_, err := s.GetKey(ctx, k.Ref)
		first <- err
	}()
	<-g.started
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(ctx) }()
	<-drained.seen
	second := make(chan error, 1)
	go func() {
		_, err := s.(hsm.FullSession).Info(ctx)
		second <- err
	}()
	<-refused.seen
	close(g.release)
	if err := <-first; err != nil {
		t.Errorf("call running when the server began to shut down: %v, want its answer", err)
	}
	err = <-second
	var unknown interface{ OutcomeUnknown() bool }
	if !errors.Is(err, hsm.ErrUnavailable) || errors.As(err, &unknown) || !strings.Contains(err.Error(), "before it ran") {
		t.Errorf("call sent after the server stopped running calls: %v, want unavailable saying it never ran", err)
	}
	if err := <-shut; err != nil {
		t.Errorf("shutdown: %v", err)
	}
}

// oldAnswer is the answer of a daemon from before streams of calls: it
// does not say it takes them.
type oldAnswer struct{ http.ResponseWriter }

func (w oldAnswer) WriteHeader(code int) {
	w.Header().Del(wire.HeaderStream)
	w.ResponseWriter.WriteHeader(code)
}

func (w oldAnswer) Write(b []byte) (int, error) {
	w.Header().Del(wire.HeaderStream)
	return w.ResponseWriter.Write(b)
}

// TestNoStreamsFallsBack: a client that learnt its HSM takes streams of
// calls, facing a daemon that does not (an older one put back in its
// place), makes its calls in requests of their own again.
func TestNoStreamsFallsBack(t *testing.T) {
	n := newNode(t, node.Options{})
	srv := server.New(n, server.Options{})
	var old atomic.Bool
	var refused atomic.Int64
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case !old.Load():
			srv.ServeHTTP(w, r)
		case strings.HasSuffix(r.URL.Path, "/"+wire.OpStream):
			refused.Add(1)
			http.Error(w, "not a keymig HSM call", http.StatusNotFound)
		default:
			srv.ServeHTTP(oldAnswer{w}, r)
		}
	})
	protos := new(http.Protocols)
	protos.SetUnencryptedHTTP2(true)
	hs := &http.Server{Handler: h, Protocols: protos}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	m := remote.New(n.ID(), ln.Addr().String(), nil)
	t.Cleanup(func() { m.Close() })
	s := loginAlice(t, m)
	m.Close() // the daemon is replaced: the next call connects again
	old.Store(true)
	ctx := ctxT(t)
	for i := range 3 {
		if _, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: fmt.Sprint("k", i)}}); err != nil {
			t.Fatalf("call %d to a daemon without streams: %v", i, err)
		}
	}
	if got := refused.Load(); got != 1 {
		t.Errorf("the stream was asked for %d times, want once", got)
	}
}
