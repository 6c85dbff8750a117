package cli

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/node"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/hsm/remote"
	"github.com/keymig/keymig/hsm/server"
	"github.com/keymig/keymig/internal/atomicfile"
)

// serveStateDir holds, per daemon, the cluster view its anti-entropy pass
// runs over: a copy of cluster.json the cluster client keeps its state in.
const serveStateDir = "serve-state"

// ownHSM is an HSM this daemon serves, as a member of its cluster view:
// the daemon, not the view, closes it.
type ownHSM struct{ *node.Node }

// Close leaves the HSM open for the daemon.
func (ownHSM) Close() error { return nil }

// viewOpener opens the members of a daemon's cluster view: its own HSMs
// in-process, the others through their daemons.
type viewOpener struct {
	own    map[string]*node.Node
	remote *remote.Opener
}

func (v *viewOpener) Create(dir string, s cluster.MemberSpec) (cluster.Member, error) {
	return v.remote.Create(dir, s)
}

func (v *viewOpener) Open(dir string, s cluster.MemberSpec, timeout time.Duration) (cluster.Member, error) {
	if n, ok := v.own[s.ID]; ok {
		return ownHSM{n}, nil
	}
	return v.remote.Open(dir, s, timeout)
}

func (v *viewOpener) Remove(dir, id string) error { return v.remote.Remove(dir, id) }

// startAntiEntropy starts the daemon's automatic key synchronisation over
// a view of the cluster; stop ends it and waits for a pass in flight.
func startAntiEntropy(ctx context.Context, o hsmServeOptions, n *networkConfig, all []*served, log *slog.Logger) (stop func(), err error) {
	if len(n.Addresses) < 2 {
		return func() {}, nil // one HSM: nothing to copy anywhere
	}
	state := filepath.Join(o.Dir, serveStateDir, all[0].id)
	if err := os.MkdirAll(state, 0o700); err != nil {
		return nil, err
	}
	cfg, err := os.ReadFile(filepath.Join(o.Dir, "cluster.json"))
	if err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(filepath.Join(state, "cluster.json"), cfg, 0o644); err != nil {
		return nil, err
	}
	anchor, err := os.ReadFile(tlsPath(o.Dir, trustAnchorFile))
	if err != nil {
		return nil, fmt.Errorf("cluster %s: trust anchor: %w", o.Dir, err)
	}
	// To its peers a daemon authenticates with its own HSM certificate,
	// which they accept under mutual TLS enforcement too.
	self, err := pki.ReadKeyPair(tlsPath(o.Dir, all[0].id+".crt"), tlsPath(o.Dir, all[0].id+".key"))
	if err != nil {
		return nil, err
	}
	peerTLS := func(id, addr string) (*tls.Config, error) { return pki.ClientConfig(anchor, id, addr, &self) }
	v := &viewOpener{own: map[string]*node.Node{}, remote: &remote.Opener{Addrs: n.Addresses, TLS: peerTLS}}
	for _, s := range all {
		v.own[s.id] = s.node
	}
	cl, err := cluster.Open(ctx, state, cluster.OpenOptions{LockTimeout: time.Second, Members: v})
	if err != nil {
		return nil, fmt.Errorf("cluster %s: the anti-entropy view: %w", o.Dir, err)
	}
	var peers []server.Peer
	for _, id := range n.hsmIDs() {
		if _, ok := v.own[id]; ok {
			continue
		}
		cfg, err := peerTLS(id, n.Addresses[id])
		if err != nil {
			cl.Close()
			return nil, err
		}
		peers = append(peers, remote.New(id, n.Addresses[id], cfg))
	}
	ae := &server.AntiEntropy{Sync: cl.Sync, Every: o.SyncEvery, Peers: peers, PeerCheckEvery: o.PeerCheckEvery,
		Log: log.With("component", "anti-entropy"), Passed: o.synced}
	actx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		ae.Run(actx)
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			cancel()
			<-done
			cl.Close()
			for _, p := range peers {
				p.(*remote.Member).Close()
			}
		})
	}, nil
}
