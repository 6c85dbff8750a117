package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/node"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/hsm/server"
	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/urfave/cli/v2"
)

// drainTimeout bounds how long SIGTERM waits for calls in flight.
const drainTimeout = 30 * time.Second

// hsmServeOptions are the inputs of `keymig hsm serve`.
type hsmServeOptions struct {
	Dir       string
	HSM       string // one HSM; empty serves every HSM of Dir
	ReadyFile string // written once every HSM listens: one "serving HSM ID on ADDR" line each
	LogFormat string // overrides the global --log-format when set
	// SyncEvery is the mean period of the automatic anti-entropy pass; 0
	// runs it only at start and when a peer HSM comes back.
	SyncEvery time.Duration
	// PeerCheckEvery is how often peers are pinged to notice one coming
	// back; 0 means a second.
	PeerCheckEvery time.Duration
	// synced, if set, is called after every anti-entropy pass (tests).
	synced func(reason string, rep cluster.SyncReport, err error)
}

// hsmServeCommand is `keymig hsm serve`.
func hsmServeCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "serve HSMs of a networked cluster over mutual TLS, as a daemon",
		Description: `serve runs one HSM of the cluster (--hsm ID), or every HSM of DIR each on its
own address, as a daemon that owns the HSM's file and audit log and serves it
over HTTP/2 and TLS 1.3 at the address given to keymig hsm init --addresses.
Many clients at once; each client's sessions, and their session keys, end
with its connection. A second serve of the same HSM is refused, naming the
daemon that holds it. SIGTERM (or Ctrl-C) drains the calls in flight and
exits 0.

Every few seconds (--sync-every, jittered), and at once when a peer HSM comes
back, the daemons run the anti-entropy pass: keys and users missing on an HSM
are copied to it from its peers, with no keymig hsm sync by hand.

When every HSM listens, serve prints "serving HSM ID on ADDR (pid N)" for each, to
stdout and to --ready-file if given, so that scripts wait for that marker.

Example:
  keymig hsm serve --dir ./prod --log-format json`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "the networked cluster `DIR`ectory"},
			&cli.StringFlag{Name: "hsm", Usage: "serve only the HSM `ID` (default: every HSM of DIR)"},
			&cli.StringFlag{Name: "ready-file", Usage: "once listening, write one line per HSM served to `FILE`"},
			&cli.StringFlag{Name: "log-format", Usage: "log format on stderr: text or json (default: the global --log-format)"},
			&cli.DurationFlag{Name: "sync-every", Value: 5 * time.Second, Usage: "run the anti-entropy pass about this often, jittered (0: only at start and when a peer comes back)"},
			&cli.DurationFlag{Name: "peer-check-every", Value: time.Second, Usage: "ping the peer HSMs this often to notice one coming back"},
		},
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			return runHSMServe(c.Context, e, hsmServeOptions{Dir: c.String("dir"), HSM: c.String("hsm"),
				ReadyFile: c.String("ready-file"), LogFormat: c.String("log-format"), SyncEvery: c.Duration("sync-every"),
				PeerCheckEvery: c.Duration("peer-check-every")})
		},
	}
}

// served is one HSM being served.
type served struct {
	id, addr string
	node     *node.Node
	srv      *server.Server
	lock     *serveLock
	done     chan error
}

// runHSMServe serves the HSMs until ctx ends, then drains and returns nil.
func runHSMServe(ctx context.Context, e *env, o hsmServeOptions) (err error) {
	log := e.log
	if o.LogFormat != "" {
		if log, err = newLogger(e.stderr, o.LogFormat, "info"); err != nil {
			return err
		}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	info, err := clusterInfo(o.Dir)
	if err != nil {
		return err
	}
	n, err := readNetwork(o.Dir)
	if err != nil {
		return err
	}
	ids := n.hsmIDs()
	if o.HSM != "" {
		if _, ok := n.Addresses[o.HSM]; !ok {
			return fmt.Errorf("cluster %s has no HSM %q (it has %s)", o.Dir, o.HSM, strings.Join(ids, ", "))
		}
		ids = []string{o.HSM}
	}
	var clientAnchor []byte
	if n.MTLSEnforcement {
		if clientAnchor, err = os.ReadFile(tlsPath(o.Dir, clientAnchorFile)); err != nil {
			return fmt.Errorf("cluster %s: mutual TLS enforcement is on but the client trust anchor cannot be read: %w", o.Dir, err)
		}
	}
	var all []*served
	defer func() {
		for _, s := range all {
			s.close(log)
		}
	}()
	for _, id := range ids {
		s, err := startServing(o.Dir, id, n, info.Policy.KDFIterations, clientAnchor, log)
		if err != nil {
			return err
		}
		all = append(all, s)
	}
	var ready strings.Builder
	for _, s := range all {
		fmt.Fprintf(&ready, "serving HSM %s on %s (pid %d)\n", s.id, s.addr, os.Getpid())
	}
	if o.ReadyFile != "" {
		if err := atomicfile.WriteFile(o.ReadyFile, []byte(ready.String()), 0o644); err != nil {
			return err
		}
	}
	fmt.Fprint(e.stdout, ready.String())
	log.Info("serving", "cluster", info.ID, "hsms", len(all), "mtls-enforcement", n.MTLSEnforcement)

	stopSync, err := startAntiEntropy(ctx, o, n, all, log)
	if err != nil {
		return err
	}
	defer stopSync()
	for _, s := range all {
		select {
		case err := <-s.done:
			return fmt.Errorf("HSM %s on %s stopped serving: %w", s.id, s.addr, err)
		default:
		}
	}
	<-ctx.Done()
	log.Info("stopping: draining calls in flight", "timeout", drainTimeout.String())
	stopSync()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), drainTimeout)
	defer cancel()
	for _, s := range all {
		if err := s.srv.Shutdown(dctx); err != nil {
			log.Warn("drain cut short", "hsm", s.id, "err", err)
		}
	}
	return nil
}

// startServing opens HSM id, takes its serve lock and listens.
func startServing(dir, id string, n *networkConfig, kdf int, clientAnchor []byte, log *slog.Logger) (_ *served, err error) {
	lock, err := lockServe(dir, id, n.Addresses[id])
	if err != nil {
		return nil, err
	}
	s := &served{id: id, lock: lock, done: make(chan error, 1)}
	defer func() {
		if err != nil {
			s.close(log)
		}
	}()
	s.node, err = node.Open(filepath.Join(dir, id+".db"), node.OpenOptions{Timeout: time.Second, KDFIterations: kdf})
	if err != nil {
		return s, fmt.Errorf("cluster %s: open HSM %s: %w (is another keymig process using the cluster directory?)", dir, id, err)
	}
	kp, err := pki.ReadKeyPair(tlsPath(dir, id+".crt"), tlsPath(dir, id+".key"))
	if err != nil {
		return s, fmt.Errorf("cluster %s: HSM %s has no TLS certificate (finish the initialisation with keymig hsm init --signed-cert): %w", dir, id, err)
	}
	anchor, err := os.ReadFile(tlsPath(dir, trustAnchorFile))
	if err != nil {
		return s, fmt.Errorf("cluster %s: trust anchor: %w", dir, err)
	}
	cfg, err := pki.ServerConfig(pki.ServerTLS{HSM: kp, Enforce: clientAnchor != nil, ClientAnchorPEM: clientAnchor, PeerAnchorPEM: anchor})
	if err != nil {
		return s, fmt.Errorf("cluster %s: HSM %s: %w", dir, id, err)
	}
	ln, err := net.Listen("tcp", n.Addresses[id])
	if err != nil {
		return s, fmt.Errorf("cluster %s: HSM %s cannot listen on %s: %w", dir, id, n.Addresses[id], err)
	}
	s.addr = ln.Addr().String()
	if s.addr != n.Addresses[id] {
		// Port 0 picked a free port: record it, so clients and later
		// serves of this HSM use it.
		if err := recordAddress(dir, id, s.addr); err != nil {
			ln.Close()
			return s, err
		}
	}
	lock.update(s.addr)
	s.srv = server.New(s.node, server.Options{TLS: cfg, Logger: log})
	go func() { s.done <- s.srv.Serve(ln) }()
	log.Info("listening", "hsm", id, "addr", s.addr)
	return s, nil
}

func (s *served) close(log *slog.Logger) {
	if s.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
		s.srv.Shutdown(ctx)
		cancel()
		s.srv = nil
	}
	if s.node != nil {
		if err := s.node.Close(); err != nil {
			log.Error("close HSM", "hsm", s.id, "err", err)
		}
		s.node = nil
	}
	if s.lock != nil {
		s.lock.unlock()
		s.lock = nil
	}
}

// recordAddress writes the address HSM id listens on into network.json,
// under a lock since each daemon of the cluster may do so.
func recordAddress(dir, id, addr string) error {
	f, err := os.OpenFile(filepath.Join(dir, networkFile+".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	n, err := readNetwork(dir)
	if err != nil {
		return err
	}
	n.Addresses[id] = addr
	return writeNetwork(dir, n)
}

// serveLock is the lock a daemon holds on the HSM it serves: an flock on
// DIR/HSM-ID.serve, which holds who holds it.
type serveLock struct {
	f      *os.File
	holder serveHolder
}

// serveHolder is the record in a serve lock.
type serveHolder struct {
	PID   int       `json:"pid"`
	Host  string    `json:"host"`
	Addr  string    `json:"address"`
	Since time.Time `json:"since"`
}

func lockServe(dir, id, addr string) (*serveLock, error) {
	path := filepath.Join(dir, id+".serve")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: lock HSM %s: %w", dir, id, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			holder := "another process"
			if h, ok := readServeHolder(path); ok {
				holder = fmt.Sprintf("pid %d on %s (listening on %s since %s)", h.PID, h.Host, h.Addr, h.Since.Format(time.RFC3339))
			}
			return nil, fmt.Errorf("HSM %s of cluster %s is already served by %s; stop that daemon first", id, dir, holder)
		}
		return nil, fmt.Errorf("cluster %s: lock HSM %s: %w", dir, id, err)
	}
	host, _ := os.Hostname()
	l := &serveLock{f: f, holder: serveHolder{PID: os.Getpid(), Host: host, Addr: addr, Since: time.Now().UTC().Truncate(time.Second)}}
	l.write()
	return l, nil
}

func readServeHolder(path string) (serveHolder, bool) {
	var h serveHolder
	b, err := os.ReadFile(path)
	return h, err == nil && json.Unmarshal(b, &h) == nil && h.PID != 0
}

func (l *serveLock) update(addr string) {
	l.holder.Addr = addr
	l.write()
}

func (l *serveLock) write() {
	b, _ := json.Marshal(l.holder)
	if err := l.f.Truncate(0); err == nil {
		l.f.WriteAt(append(b, '\n'), 0)
	}
}

func (l *serveLock) unlock() {
	syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	l.f.Close()
}
