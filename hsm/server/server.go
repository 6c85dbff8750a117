// Package server serves one HSM (a hsm/node file, or any cluster.Member)
// over the network: HTTP/2 over TLS 1.3 with, when enforcement is on,
// client certificates required (see hsm/pki). The protocol is
// hsm/internal/wire; hsm/remote is its client.
//
// Sessions belong to the connection that logged in: a session token sent
// on another connection is refused, and when a connection closes every
// session opened on it is logged out, so its session keys die with it, as
// in CloudHSM. Each call runs under the caller's deadline (a header, or a
// field of a call on a stream) and is cancelled when the caller's
// connection goes away. A client's calls usually travel on one long-lived
// stream request (stream.go), each answered as soon as it is done.
//
// The peer API (listing every key, masked copies, user records,
// snapshots) needs no login, as between the HSMs of a cluster: it is
// guarded by TLS alone, so a cluster outside a rehearsal runs with mutual
// TLS enforcement on.
//
// Shutdown stops accepting, stops running new calls from streams (a call
// sent after that is answered as never run), waits for the calls in
// flight, then logs out every session. A Server is safe for concurrent
// use.
package server

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/internal/wire"
)

// maxBody bounds a call's body: masked objects and snapshots of a full
// cluster fit well within it.
const maxBody = 256 << 20

// Options configure a Server.
type Options struct {
	// TLS is the server's TLS configuration (pki.ServerConfig); nil serves
	// plain HTTP/2, for tests of the protocol only.
	TLS *tls.Config
	// Logger receives one line per connection refused or session ended and
	// per failed call; nil discards them.
	Logger *slog.Logger
}

// Server serves one HSM.
type Server struct {
	m    cluster.Member
	log  *slog.Logger
	http *http.Server
	tls  *tls.Config

	closing   chan struct{} // closed by Shutdown: streams of calls end
	closeOnce sync.Once

	mu       sync.Mutex
	sessions map[string]*session
	conns    map[net.Conn]*conn
	fault    hsm.Fault // the fault last set through this server
}

// conn is one client connection and the sessions opened on it.
type conn struct {
	remote   string
	sessions map[string]bool
	closed   bool // set under Server.mu once the connection is gone
}

type session struct {
	s    hsm.Session
	conn *conn
	user string
}

type connKey struct{}

// New returns a server of m.
func New(m cluster.Member, o Options) *Server {
	lg := o.Logger
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	s := &Server{m: m, log: lg.With("hsm", m.ID()), tls: o.TLS, closing: make(chan struct{}), sessions: map[string]*session{}, conns: map[net.Conn]*conn{}}
	p := new(http.Protocols)
	p.SetHTTP2(true)
	if o.TLS == nil {
		p.SetUnencryptedHTTP2(true)
	}
	s.http = &http.Server{
		Handler:           s,
		Protocols:         p,
		HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: 1024},
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			cn := &conn{remote: c.RemoteAddr().String(), sessions: map[string]bool{}}
			s.mu.Lock()
			s.conns[c] = cn
			s.mu.Unlock()
			return context.WithValue(ctx, connKey{}, cn)
		},
		ConnState: func(c net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				s.dropConn(c)
			}
		},
	}
	return s
}

// Serve accepts connections on ln until Shutdown; it returns
// http.ErrServerClosed after a Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	if s.tls != nil {
		ln = tls.NewListener(ln, s.tls)
	}
	return s.http.Serve(ln)
}

// Shutdown stops accepting connections, waits for calls in flight (until
// ctx ends), then logs out every session.
func (s *Server) Shutdown(ctx context.Context) error {
	s.closeOnce.Do(func() { close(s.closing) })
	err := s.http.Shutdown(ctx)
	s.mu.Lock()
	all := s.sessions
	s.sessions = map[string]*session{}
	s.mu.Unlock()
	for _, ss := range all {
		ss.s.Logout(context.WithoutCancel(ctx))
	}
	return err
}

// Sessions is how many sessions are open.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// dropConn logs out every session opened on a closed connection.
func (s *Server) dropConn(c net.Conn) {
	s.mu.Lock()
	cn := s.conns[c]
	delete(s.conns, c)
	var ended []*session
	if cn != nil {
		cn.closed = true
		for tok := range cn.sessions {
			if ss, ok := s.sessions[tok]; ok {
				ended = append(ended, ss)
				delete(s.sessions, tok)
			}
		}
	}
	s.mu.Unlock()
	for _, ss := range ended {
		ss.s.Logout(context.Background())
	}
	if len(ended) > 0 {
		s.log.Info("connection closed; its sessions ended", "remote", cn.remote, "sessions", len(ended))
	}
}

// ServeHTTP answers one call.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	op, ok := strings.CutPrefix(r.URL.Path, wire.Path)
	if !ok || r.Method != http.MethodPost {
		http.Error(w, "not a keymig HSM call", http.StatusNotFound)
		return
	}
	w.Header().Set(wire.HeaderStream, "1")
	ctx := r.Context()
	if op == wire.OpStream {
		s.serveStream(ctx, w, r)
		return
	}
	if d := r.Header.Get(wire.HeaderDeadline); d != "" {
		t, err := time.Parse(time.RFC3339Nano, d)
		if err != nil {
			writeErr(w, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "bad deadline header %q", d))
			return
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, t)
		defer cancel()
	}
	var in wire.Call
	if err := json.NewDecoder(io.LimitReader(r.Body, maxBody)).Decode(&in); err != nil && !errors.Is(err, io.EOF) {
		writeErr(w, hsm.Errorf(hsm.CodeInvalidInput, op, 0, "the call's body is not valid JSON: %v", err))
		return
	}
	tok := r.Header.Get(wire.HeaderSession)
	var err error
	switch op {
	case wire.OpListKeys, wire.OpPeerListKeys, wire.OpAudit:
		if err = s.stream(ctx, w, tok, op, &in); err == nil {
			return
		}
	default:
		var out wire.Result
		if err = s.dispatch(ctx, tok, op, &in, &out); err == nil {
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(&out)
			return
		}
	}
	s.logFailed(ctx, op, err)
	writeErr(w, err)
}

// logFailed logs a call that failed other than with an HSM's refusal or
// because its caller went away.
func (s *Server) logFailed(ctx context.Context, op string, err error) {
	if hsm.CodeOf(err) == "" && ctx.Err() == nil {
		s.log.Warn("call failed", "op", op, "err", err)
	}
}

func writeErr(w http.ResponseWriter, err error) {
	body := wireError(err)
	status := http.StatusInternalServerError
	switch body.Code {
	case hsm.CodeNotFound:
		status = http.StatusNotFound
	case hsm.CodePermission:
		status = http.StatusForbidden
	case hsm.CodeThrottled:
		status = http.StatusTooManyRequests
	case hsm.CodeUnavailable, hsm.CodeQuorum:
		status = http.StatusServiceUnavailable
	case "":
	default:
		status = http.StatusUnprocessableEntity
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(body)
}

func wireError(err error) *wire.Error {
	var he *hsm.Error
	if errors.As(err, &he) {
		return &wire.Error{Code: he.Code, Op: he.Op, Key: uint64(he.Key), Msg: he.Msg}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return &wire.Error{Code: hsm.CodeUnavailable, Msg: "the caller's deadline passed before the HSM answered", Deadline: true}
	}
	return &wire.Error{Msg: err.Error()}
}

// sessionOf returns the session tok names, refusing one opened on another
// connection than the call's (ctx) or already ended.
func (s *Server) sessionOf(ctx context.Context, tok, op string) (hsm.FullSession, error) {
	cn, _ := ctx.Value(connKey{}).(*conn)
	s.mu.Lock()
	ss, ok := s.sessions[tok]
	s.mu.Unlock()
	if !ok || ss.conn != cn {
		return nil, hsm.Errorf(hsm.CodePermission, op, 0, "%s: the session has ended (sessions end with their connection); log in again", SessionEnded)
	}
	fs, ok := ss.s.(hsm.FullSession)
	if !ok {
		return nil, hsm.Errorf(hsm.CodeUnsupported, op, 0, "HSM %s: the session lacks the optional capabilities", s.m.ID())
	}
	return fs, nil
}

// SessionEnded starts the message of a call on a session that is no
// longer open; hsm/remote logs in again when it sees it.
const SessionEnded = "session ended"

func (s *Server) login(ctx context.Context, in *wire.Call, out *wire.Result) error {
	sess, err := s.m.Login(ctx, hsm.Credentials{User: in.User, Password: in.Password})
	if err != nil {
		return err
	}
	cn, _ := ctx.Value(connKey{}).(*conn)
	b := make([]byte, 16)
	rand.Read(b)
	tok := hex.EncodeToString(b)
	s.mu.Lock()
	if cn != nil {
		if cn.closed {
			s.mu.Unlock()
			sess.Logout(context.WithoutCancel(ctx))
			return hsm.Errorf(hsm.CodeUnavailable, wire.OpLogin, 0, "HSM %s: the connection closed during the login", s.m.ID())
		}
		cn.sessions[tok] = true
	}
	s.sessions[tok] = &session{s: sess, conn: cn, user: in.User}
	s.mu.Unlock()
	u := sess.User()
	out.Session, out.User = tok, &u
	return nil
}

func (s *Server) logout(ctx context.Context, tok string) error {
	cn, _ := ctx.Value(connKey{}).(*conn)
	s.mu.Lock()
	ss, ok := s.sessions[tok]
	if ok && ss.conn == cn {
		delete(s.sessions, tok)
		if cn != nil {
			delete(cn.sessions, tok)
		}
	}
	s.mu.Unlock()
	if !ok || ss.conn != cn {
		return nil // idempotent
	}
	return ss.s.Logout(ctx)
}

// dispatch runs one call; tok is the session it names, if any.
func (s *Server) dispatch(ctx context.Context, tok, op string, in *wire.Call, out *wire.Result) error {
	m := s.m
	switch op {
	case wire.OpPing:
		return nil
	case wire.OpLogin:
		return s.login(ctx, in, out)
	case wire.OpLogout:
		return s.logout(ctx, tok)
	case wire.OpBootstrap:
		return m.Bootstrap(ctx, hsm.Credentials{User: in.User, Password: in.Password})
	case wire.OpSetFault:
		f := hsm.Fault{}
		if in.Fault != nil {
			f = *in.Fault
		}
		if err := f.Validate(); err != nil {
			return err
		}
		m.SetFault(f)
		s.mu.Lock()
		s.fault = f
		s.mu.Unlock()
		s.log.Info("fault set", "fault", f.String())
		out.Fault = &f
		return nil
	case wire.OpGetFault:
		s.mu.Lock()
		f := s.fault
		s.mu.Unlock()
		out.Fault = &f
		return nil
	case wire.OpVerifyAudit:
		n, err := m.VerifyAudit()
		out.Count = n
		return err
	case wire.OpPeerExportMasked:
		b, err := m.PeerExportMasked(ctx, hsm.KeyRef(in.Ref))
		out.Data = b
		return err
	case wire.OpPeerInsertMasked:
		k, err := m.PeerInsertMasked(ctx, in.Data)
		out.Key = &k
		return err
	case wire.OpPeerDeleteKey:
		return m.PeerDeleteKey(ctx, hsm.KeyRef(in.Ref))
	case wire.OpPeerUsers:
		u, err := m.PeerUsers(ctx)
		out.Records = u
		return err
	case wire.OpPeerPutUser:
		if in.Record == nil {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "no user record")
		}
		return m.PeerPutUser(ctx, *in.Record)
	case wire.OpPeerPutQuorumToken:
		if in.Token == nil {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "no quorum token")
		}
		return m.PeerPutQuorumToken(ctx, *in.Token)
	case wire.OpSnapshot:
		b, err := m.Snapshot(ctx)
		out.Data = b
		return err
	case wire.OpRestoreSnapshot:
		return m.RestoreSnapshot(ctx, in.Data)
	}
	sess, err := s.sessionOf(ctx, tok, op)
	if err != nil {
		return err
	}
	if err := sessionCall(ctx, sess, op, in, out); err != nil {
		return err
	}
	switch op {
	case wire.OpGenerateKey, wire.OpGenerateKeyPair, wire.OpUnwrapKey, wire.OpImportPublicKey, wire.OpInsertMasked:
		if in.Masked {
			attachMasked(ctx, sess, out)
		}
	}
	return nil
}

// attachMasked adds to out the masked objects of the token keys the call
// made, exported by the session that made them (so under its permissions,
// and audited). A key whose export fails is left out: the client then
// exports it by a call of its own.
func attachMasked(ctx context.Context, sess hsm.FullSession, out *wire.Result) {
	for _, k := range []*hsm.KeyInfo{out.Key, out.Pub} {
		if k == nil || k.Ref == 0 || !k.Attrs.Token {
			continue
		}
		if blob, err := sess.ExportMasked(ctx, k.Ref); err == nil {
			out.Masked = append(out.Masked, wire.MaskedKey{Ref: uint64(k.Ref), Blob: blob})
		}
	}
}

func sessionCall(ctx context.Context, s hsm.FullSession, op string, in *wire.Call, out *wire.Result) error {
	params := func() hsm.Params {
		if in.Params == nil {
			return hsm.Params{}
		}
		return *in.Params
	}
	key := func(k hsm.KeyInfo, err error) error {
		out.Key = &k
		return err
	}
	switch op {
	case wire.OpGenerateKey:
		if in.KeySpec == nil {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "no key spec")
		}
		return key(s.GenerateKey(ctx, *in.KeySpec))
	case wire.OpGenerateKeyPair:
		if in.PairSpec == nil {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "no key pair spec")
		}
		pub, priv, err := s.GenerateKeyPair(ctx, *in.PairSpec)
		out.Pub, out.Key = &pub, &priv
		return err
	case wire.OpGetKey:
		return key(s.GetKey(ctx, hsm.KeyRef(in.Ref)))
	case wire.OpWrapKey:
		if in.Wrap == nil {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "no wrap request")
		}
		b, err := s.WrapKey(ctx, in.Wrap.HSM())
		out.Data = b
		return err
	case wire.OpUnwrapKey:
		if in.Unwrap == nil {
			return hsm.Errorf(hsm.CodeInvalidInput, op, 0, "no unwrap request")
		}
		return key(s.UnwrapKey(ctx, in.Unwrap.HSM()))
	case wire.OpEncrypt:
		b, err := s.Encrypt(ctx, hsm.KeyRef(in.Ref), in.Mechanism, params(), in.Data)
		out.Data = b
		return err
	case wire.OpDecrypt:
		b, err := s.Decrypt(ctx, hsm.KeyRef(in.Ref), in.Mechanism, params(), in.Data)
		out.Data = b
		return err
	case wire.OpInfo:
		i, err := s.Info(ctx)
		out.Info = &i
		return err
	case wire.OpShareKey:
		return s.ShareKey(ctx, hsm.KeyRef(in.Ref), in.User)
	case wire.OpUnshareKey:
		return s.UnshareKey(ctx, hsm.KeyRef(in.Ref), in.User)
	case wire.OpSetAttribute:
		return s.SetAttribute(ctx, hsm.KeyRef(in.Ref), in.Attr, in.Value)
	case wire.OpDeleteKey:
		return s.DeleteKey(ctx, hsm.KeyRef(in.Ref))
	case wire.OpExportPublicKey:
		b, err := s.ExportPublicKey(ctx, hsm.KeyRef(in.Ref))
		out.Data = b
		return err
	case wire.OpImportPublicKey:
		t := hsm.Template{}
		if in.Template != nil {
			t = *in.Template
		}
		return key(s.ImportPublicKey(ctx, in.Data, t))
	case wire.OpExportMasked:
		b, err := s.ExportMasked(ctx, hsm.KeyRef(in.Ref))
		out.Data = b
		return err
	case wire.OpInsertMasked:
		return key(s.InsertMasked(ctx, in.Data))
	case wire.OpCreateUser:
		return s.CreateUser(ctx, in.User, in.Role, in.Password)
	case wire.OpDeleteUser:
		return s.DeleteUser(ctx, in.User)
	case wire.OpChangePassword:
		return s.ChangePassword(ctx, in.User, in.Password)
	case wire.OpListUsers:
		u, err := s.ListUsers(ctx)
		out.Users = u
		return err
	}
	q, isQ := s.(hsm.Quorum)
	switch op {
	case wire.OpRegisterQuorumKey, wire.OpSetQuorumPolicy, wire.OpGenerateQuorumToken, wire.OpApproveQuorumToken:
		if !isQ {
			return hsm.Errorf(hsm.CodeUnsupported, op, 0, "this HSM has no quorum authentication")
		}
	}
	switch op {
	case wire.OpRegisterQuorumKey:
		return q.RegisterQuorumKey(ctx, in.User, in.Data)
	case wire.OpSetQuorumPolicy:
		return q.SetQuorumPolicy(ctx, in.Service, in.M)
	case wire.OpGenerateQuorumToken:
		t, err := q.GenerateQuorumToken(ctx, in.Service)
		out.Token = &t
		return err
	case wire.OpApproveQuorumToken:
		return q.ApproveQuorumToken(ctx, in.TokenID, in.Approvals)
	}
	return hsm.Errorf(hsm.CodeUnsupported, op, 0, "unknown operation %q: the client is newer than this HSM", op)
}

// stream answers a listing as JSON lines and a trailer.
func (s *Server) stream(ctx context.Context, w http.ResponseWriter, tok, op string, in *wire.Call) error {
	var items []wire.Item
	switch op {
	case wire.OpPeerListKeys, wire.OpListKeys:
		var keys []hsm.KeyInfo
		var err error
		if op == wire.OpPeerListKeys {
			keys, err = s.m.PeerListKeys(ctx)
		} else {
			sess, serr := s.sessionOf(ctx, tok, op)
			if serr != nil {
				return serr
			}
			keys, err = sess.ListKeys(ctx, in.Filter.HSM())
		}
		if err != nil {
			return err
		}
		items = make([]wire.Item, len(keys))
		for i := range keys {
			items[i].Key = &keys[i]
		}
	case wire.OpAudit:
		err := s.m.Audit(func(rec hsm.AuditRecord) error {
			items = append(items, wire.Item{Audit: &rec, Hash: rec.Hash})
			return nil
		})
		if err != nil {
			return err
		}
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	bw := bufio.NewWriterSize(w, 64<<10)
	enc := json.NewEncoder(bw)
	fl, _ := w.(http.Flusher)
	for i := range items {
		if err := enc.Encode(&items[i]); err != nil {
			return nil // the client went away; it sees no trailer
		}
		if i%1024 == 1023 {
			bw.Flush()
			if fl != nil {
				fl.Flush()
			}
		}
	}
	enc.Encode(&wire.Item{End: true, Count: len(items)})
	bw.Flush()
	return nil
}
