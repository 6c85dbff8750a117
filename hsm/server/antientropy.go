package server

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/keymig/keymig/hsm/cluster"
)

// Peer is another HSM of the cluster as the anti-entropy loop watches it.
type Peer interface {
	ID() string
	// Ping reports whether the HSM answers.
	Ping(ctx context.Context) error
}

// AntiEntropy runs a daemon's automatic key synchronisation, CloudHSM's
// "periodically clones keys to every HSM in the cluster": a pass at start,
// one about every Every (jittered, so daemons of one cluster do not pass in
// step), and one at once when a peer that did not answer answers again.
// A pass is cluster.Cluster.Sync over a view of the cluster whose members
// are the daemon's own HSMs and its peers; it is idempotent, so daemons
// passing at the same time do no harm.
type AntiEntropy struct {
	// Sync runs one pass.
	Sync func(ctx context.Context) (cluster.SyncReport, error)
	// Every is the mean period between passes; 0 runs passes only at
	// start and when a peer returns.
	Every time.Duration
	// Peers are watched every PeerCheckEvery (default 1s) for a return.
	Peers          []Peer
	PeerCheckEvery time.Duration
	// PassTimeout bounds one pass; default 2 minutes.
	PassTimeout time.Duration
	// Log gets one line per pass that copied something or met a problem.
	Log *slog.Logger
	// Passed, if set, is called after every pass (tests observe it).
	Passed func(reason string, rep cluster.SyncReport, err error)
}

// Run runs passes until ctx ends.
func (a *AntiEntropy) Run(ctx context.Context) {
	if a.Log == nil {
		a.Log = slog.New(slog.DiscardHandler)
	}
	returned := make(chan string, 1)
	go a.watch(ctx, returned)
	a.pass(ctx, "start")
	var tick <-chan time.Time
	var t *time.Timer
	if a.Every > 0 {
		t = time.NewTimer(a.jittered())
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
			a.pass(ctx, "periodic")
			t.Reset(a.jittered())
		case id := <-returned:
			a.pass(ctx, "HSM "+id+" is back")
		}
	}
}

// jittered is Every scaled by a random factor in [0.5, 1.5).
func (a *AntiEntropy) jittered() time.Duration {
	return time.Duration(float64(a.Every) * (0.5 + rand.Float64()))
}

func (a *AntiEntropy) pass(ctx context.Context, reason string) {
	timeout := a.PassTimeout
	if timeout == 0 {
		timeout = 2 * time.Minute
	}
	pctx, cancel := context.WithTimeout(ctx, timeout)
	rep, err := a.Sync(pctx)
	cancel()
	if ctx.Err() != nil {
		return
	}
	switch {
	case err != nil:
		a.Log.Warn("anti-entropy pass failed", "reason", reason, "err", err)
	case rep.KeysCopied+rep.KeysDeleted+rep.UsersCopied > 0 || len(rep.Problems) > 0:
		a.Log.Info("anti-entropy pass", "reason", reason, "keys-copied", rep.KeysCopied, "keys-deleted", rep.KeysDeleted,
			"users-copied", rep.UsersCopied, "problems", len(rep.Problems))
		for _, p := range rep.Problems {
			a.Log.Debug("anti-entropy problem", "problem", p)
		}
	default:
		a.Log.Debug("anti-entropy pass: nothing to copy", "reason", reason)
	}
	if a.Passed != nil {
		a.Passed(reason, rep, err)
	}
}

// watch pings the peers and reports one that answers after it did not.
func (a *AntiEntropy) watch(ctx context.Context, returned chan<- string) {
	if len(a.Peers) == 0 {
		return
	}
	every := a.PeerCheckEvery
	if every == 0 {
		every = time.Second
	}
	up := map[string]bool{}
	for _, p := range a.Peers {
		up[p.ID()] = true // a pass runs at start anyway
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, p := range a.Peers {
			pctx, cancel := context.WithTimeout(ctx, every+5*time.Second)
			ok := p.Ping(pctx) == nil
			cancel()
			if ok && !up[p.ID()] {
				a.Log.Info("peer HSM is back", "peer", p.ID())
				select {
				case returned <- p.ID():
				default: // a pass is pending already
				}
			}
			up[p.ID()] = ok
		}
	}
}
