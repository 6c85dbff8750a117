package cli

import (
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
)

// quietEnv is an env writing to buffers, for commands run in-process.
func quietEnv() *env {
	return withStreams(nil, io.Discard, io.Discard)
}

// newServedCluster makes a networked cluster of n HSMs with a rehearsal
// CA; its HSMs' ports are picked when first served.
func newServedCluster(t *testing.T, n int) string {
	t.Helper()
	dir := t.TempDir()
	e := quietEnv()
	ca := filepath.Join(dir, "ca")
	if err := runHSMCACreate(context.Background(), e, ca, "test CA"); err != nil {
		t.Fatal(err)
	}
	prod := filepath.Join(dir, "prod")
	addrs := slices.Repeat([]string{"127.0.0.1:0"}, n)
	err := runHSMInit(context.Background(), e, hsmInitOptions{Dir: prod, Region: "us-east-1", HSMs: n, KeyCapacity: 100,
		KDFIterations: minKDFIterations, Officer: testOfficer, Network: networkInitOptions{Addresses: addrs, CustomerCA: ca}})
	if err != nil {
		t.Fatal(err)
	}
	return prod
}

// daemon is a keymig hsm serve run in-process.
type daemon struct {
	cancel context.CancelFunc
	done   chan error
	passes chan pass // the anti-entropy passes it ran
}

// pass is one anti-entropy pass a daemon ran.
type pass struct {
	reason string
	copied int
}

// serveHSM starts serving (one HSM, or all when id is empty) and returns
// once the daemon is ready (its ready file is written).
func serveHSM(t *testing.T, dir, id string) *daemon {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := &daemon{cancel: cancel, done: make(chan error, 1), passes: make(chan pass, 1000)}
	ready := filepath.Join(t.TempDir(), "ready")
	readyCh := make(chan struct{})
	var stdout bytes.Buffer
	e := withStreams(nil, &syncWriter{w: &stdout, onWrite: func() { close(readyCh) }}, io.Discard)
	go func() {
		d.done <- runHSMServe(ctx, e, hsmServeOptions{Dir: dir, HSM: id, ReadyFile: ready, PeerCheckEvery: 10 * time.Millisecond,
			synced: func(reason string, rep cluster.SyncReport, err error) {
				if err == nil {
					select {
					case d.passes <- pass{reason, rep.KeysCopied}:
					default:
					}
				}
			}})
	}()
	select {
	case <-readyCh:
	case err := <-d.done:
		t.Fatalf("serve %s stopped before it was ready: %v", id, err)
	}
	t.Cleanup(func() { d.stop(t) })
	return d
}

func (d *daemon) stop(t *testing.T) {
	t.Helper()
	if d.cancel == nil {
		return
	}
	d.cancel()
	d.cancel = nil
	if err := <-d.done; err != nil {
		t.Errorf("serve: %v", err)
	}
}

// syncWriter calls onWrite once, at the first write: the ready marker.
type syncWriter struct {
	w       io.Writer
	onWrite func()
}

func (s *syncWriter) Write(b []byte) (int, error) {
	if s.onWrite != nil {
		s.onWrite()
		s.onWrite = nil
	}
	return s.w.Write(b)
}

func waitCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute) // a safety net, never the expected wait
	t.Cleanup(cancel)
	return ctx
}

// waitPass waits for d to run a pass for reason; the start pass must have
// copied the missed key.
func waitPass(ctx context.Context, t *testing.T, d *daemon, reason string) {
	t.Helper()
	for {
		select {
		case p := <-d.passes:
			if p.reason != reason {
				continue
			}
			if reason == "start" && p.copied != 1 {
				t.Fatalf("the returning daemon's start pass copied %d keys, want the 1 it missed", p.copied)
			}
			return
		case <-ctx.Done():
			t.Fatalf("no anti-entropy pass for %q", reason)
		}
	}
}

// TestServeSyncsByItself: a key made while one HSM of three is down reaches
// it when its daemon comes back, with no keymig hsm sync; the daemons that
// stayed up notice the return and pass at once.
func TestServeSyncsByItself(t *testing.T) {
	prod := newServedCluster(t, 3)
	serveHSM(t, prod, "").stop(t) // pins the free ports it picked in network.json
	n, err := readNetwork(prod)
	if err != nil {
		t.Fatal(err)
	}
	ids := n.hsmIDs()
	var daemons []*daemon
	for _, id := range ids {
		daemons = append(daemons, serveHSM(t, prod, id))
	}
	app := filepath.Join(t.TempDir(), "app")
	if err := runHSMClientConfig(context.Background(), quietEnv(), hsmClientConfigOptions{Dir: prod, Out: app}); err != nil {
		t.Fatal(err)
	}
	ctx := waitCtx(t)
	alice := hsm.Credentials{User: "alice", Password: "alice-pass"}
	err = withSession(ctx, clusterOptions{Dir: app, Creds: testOfficer}, func(_ *cluster.Cluster, s hsm.Session) error {
		return s.(hsm.Users).CreateUser(ctx, alice.User, hsm.RoleCryptoUser, alice.Password)
	})
	if err != nil {
		t.Fatal(err)
	}

	daemons[2].stop(t)
	var made hsm.KeyInfo
	err = withSession(ctx, clusterOptions{Dir: app, Creds: alice}, func(_ *cluster.Cluster, s hsm.Session) (err error) {
		made, err = s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "while-down"}})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if made.Coverage.Count() != 2 || !slices.Contains(made.Coverage.Unreachable, ids[2]) {
		t.Fatalf("key made while %s is down has coverage %+v, want 2 HSMs and %s unreachable", ids[2], made.Coverage, ids[2])
	}

	back := serveHSM(t, prod, ids[2])
	// The returning daemon's first pass pulls the key in; the others notice
	// the return and pass too. Both are markers, not clocks.
	waitPass(ctx, t, back, "start")
	waitPass(ctx, t, daemons[0], "HSM "+ids[2]+" is back")
	err = withSession(ctx, clusterOptions{Dir: app, Creds: alice}, func(cl *cluster.Cluster, s hsm.Session) error {
		k, err := s.GetKey(ctx, made.Ref)
		if err != nil {
			return err
		}
		if !k.Coverage.Full() || k.Coverage.Count() != 3 {
			return errors.New("coverage " + k.Coverage.String())
		}
		return nil
	})
	if err != nil {
		t.Fatalf("key %s after %s came back: %v", made.Ref, ids[2], err)
	}
}
