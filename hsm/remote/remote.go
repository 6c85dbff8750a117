// Package remote is the client of hsm/server: an HSM reached over HTTP/2
// and TLS 1.3 that is a cluster.Member like a local hsm/node file, so
// hsm/cluster balances, syncs, fails over and enforces the availability
// quorum across remote HSMs unchanged (see Opener).
//
// Each Member keeps one HTTP/2 connection to its HSM, and every session
// opened through it lives on that connection: when the Member is closed or
// the connection breaks, the server logs those sessions out and their
// session keys die. A session whose connection broke logs in again by
// itself at its next call (its session keys are gone, as after a CloudHSM
// client reconnects).
//
// Once the HSM says it takes them, calls travel on one long-lived stream
// request on that connection, so that calls made at once share its frames
// and syscalls (stream.go). Every call carries the caller's deadline. Error codes, and so whether a
// retry may help, survive the wire; a network failure is an unavailable
// error naming the HSM and its address, which the cluster retries on
// another HSM. This package retries nothing itself: retries belong to
// hsm/cluster. All methods are safe for concurrent use.
package remote

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/internal/wire"
	"github.com/keymig/keymig/hsm/pki"
	"github.com/keymig/keymig/hsm/server"
)

// untimedCallTimeout bounds the calls of the Member interface that take no
// context (SetFault, VerifyAudit, Audit).
const untimedCallTimeout = 2 * time.Minute

// Member is one remote HSM.
type Member struct {
	id, addr string
	base     string
	tlsCfg   *tls.Config
	protos   *http.Protocols

	link      atomic.Pointer[link] // the connection calls go on; Close starts a new one
	canStream atomic.Bool          // the HSM has said it takes OpStream
	streams
}

var _ cluster.Member = (*Member)(nil)

// New returns the client of HSM id served at addr (HOST:PORT). It connects
// at its first call. tlsCfg is the client's TLS configuration
// (pki.ClientConfig); nil speaks plain HTTP/2, for tests of the protocol.
func New(id, addr string, tlsCfg *tls.Config) *Member {
	p := new(http.Protocols)
	scheme := "https"
	if tlsCfg == nil {
		p.SetUnencryptedHTTP2(true)
		scheme = "http"
	} else {
		p.SetHTTP2(true)
	}
	m := &Member{id: id, addr: addr, base: scheme + "://" + addr + wire.Path, tlsCfg: tlsCfg, protos: p}
	m.link.Store(m.newLink())
	return m
}

// link is an HTTP/2 transport and the connections it dialled.
type link struct {
	tr *http.Transport
	hc *http.Client

	mu    sync.Mutex
	conns map[net.Conn]bool // open connections (one, but for a moment when it breaks)
}

func (m *Member) newLink() *link {
	l := &link{conns: map[net.Conn]bool{}}
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	l.tr = &http.Transport{
		TLSClientConfig: m.tlsCfg,
		Protocols:       m.protos,
		DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, address)
			if err != nil {
				return nil, err
			}
			tc := &trackedConn{Conn: c, l: l}
			l.mu.Lock()
			l.conns[tc] = true
			l.mu.Unlock()
			return tc, nil
		},
		TLSHandshakeTimeout: 10 * time.Second,
		// One connection per HSM: the sessions opened on it live there.
		HTTP2: &http.HTTP2Config{StrictMaxConcurrentRequests: true, SendPingTimeout: 15 * time.Second, PingTimeout: 10 * time.Second},
	}
	l.hc = &http.Client{Transport: l.tr}
	return l
}

// close closes the link's connections, whatever is in flight on them.
func (l *link) close() {
	l.tr.CloseIdleConnections()
	l.mu.Lock()
	var open []net.Conn
	for c := range l.conns {
		open = append(open, c)
	}
	l.mu.Unlock()
	for _, c := range open {
		c.Close()
	}
}

// trackedConn is a connection of a link's.
type trackedConn struct {
	net.Conn
	l    *link
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// do sends a request on the Member's current connection.
func (m *Member) do(req *http.Request) (*http.Response, error) {
	return m.link.Load().hc.Do(req)
}

// ID is the HSM's id.
func (m *Member) ID() string { return m.id }

// Addr is the address the HSM is reached at.
func (m *Member) Addr() string { return m.addr }

// Close closes the connection once the calls in flight on its stream of
// calls end (waiting at most closeStreamWait); other calls still in flight
// fail. The server then ends every session opened through this Member. A
// call made later opens a new connection.
func (m *Member) Close() error {
	m.streams.mu.Lock()
	cs := m.streams.cur
	m.streams.mu.Unlock()
	if cs != nil {
		cs.close()
	}
	m.link.Swap(m.newLink()).close()
	return nil
}

// Ping makes a call that does nothing: whether the HSM answers.
func (m *Member) Ping(ctx context.Context) error {
	return m.call(ctx, wire.OpPing, "", &wire.Call{}, &wire.Result{})
}

// call makes one operation and decodes its result into out. Once the HSM
// has said it takes streams of calls, the call goes on the Member's stream
// (stream.go).
func (m *Member) call(ctx context.Context, op, session string, in *wire.Call, out *wire.Result) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	if m.canStream.Load() {
		return m.viaStream(ctx, op, session, body, out)
	}
	return m.callOne(ctx, op, session, body, out)
}

// callOne makes one operation in a request of its own.
func (m *Member) callOne(ctx context.Context, op, session string, body []byte, out *wire.Result) error {
	resp, err := m.post(ctx, op, session, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return m.transportErr(ctx, op, fmt.Errorf("read the answer: %w", err))
	}
	return nil
}

// post sends a call and returns a successful response, or the error the
// HSM answered with.
func (m *Member) post(ctx context.Context, op, session string, body []byte) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, m.base+op, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if session != "" {
		req.Header.Set(wire.HeaderSession, session)
	}
	if dl, ok := ctx.Deadline(); ok {
		req.Header.Set(wire.HeaderDeadline, dl.UTC().Format(time.RFC3339Nano))
	}
	resp, err := m.do(req)
	if err != nil {
		return nil, m.transportErr(ctx, op, err)
	}
	if resp.Header.Get(wire.HeaderStream) != "" && !m.canStream.Load() {
		m.canStream.Store(true)
	}
	if resp.StatusCode == http.StatusOK {
		return resp, nil
	}
	defer resp.Body.Close()
	var we wire.Error
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&we); err != nil {
		return nil, hsm.Errorf(hsm.CodeUnavailable, op, 0, "HSM %s at %s answered %s, not a keymig HSM answer; check the address", m.id, m.addr, resp.Status)
	}
	return nil, m.answerErr(op, &we)
}

// answerErr is the error an HSM answered a call with.
func (m *Member) answerErr(op string, we *wire.Error) error {
	if we.Deadline {
		return fmt.Errorf("HSM %s at %s: %s: %w", m.id, m.addr, op, context.DeadlineExceeded)
	}
	if we.Unknown {
		return &lostAnswer{&hsm.Error{Code: hsm.CodeUnavailable, Op: we.Op, Key: hsm.KeyRef(we.Key), Msg: fmt.Sprintf("HSM %s at %s: %s", m.id, m.addr, we.Msg)}}
	}
	if we.Code == "" {
		return fmt.Errorf("HSM %s at %s: %s: %s", m.id, m.addr, op, we.Msg)
	}
	return &hsm.Error{Code: we.Code, Op: we.Op, Key: hsm.KeyRef(we.Key), Msg: we.Msg}
}

// transportErr describes a call that got no answer: the caller's context
// ended, a TLS check refused the HSM or the HSM refused us (permission, not
// worth retrying), or the network failed (unavailable, retried elsewhere).
func (m *Member) transportErr(ctx context.Context, op string, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("HSM %s at %s: %s: %w", m.id, m.addr, op, cerr)
	}
	var ve *pki.VerifyError
	if errors.As(err, &ve) {
		return hsm.Errorf(hsm.CodePermission, op, 0, "TLS handshake refused: %s", ve.Msg)
	}
	msg := pki.ExplainRemote(err, m.id, m.addr)
	if msg == "" && m.tlsCfg != nil && refusedEarly(err) {
		msg = m.diagnose(ctx)
	}
	if msg != "" {
		return hsm.Errorf(hsm.CodePermission, op, 0, "TLS handshake refused: %s", msg)
	}
	var ue interface{ Unwrap() error }
	if errors.As(err, &ue) {
		if inner := ue.Unwrap(); inner != nil {
			err = inner
		}
	}
	he := hsm.Errorf(hsm.CodeUnavailable, op, 0, "HSM %s at %s is unreachable: %v; retry, or check that its daemon (keymig hsm serve) runs", m.id, m.addr, err)
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "dial" {
		return he // never connected: the HSM did nothing
	}
	return &lostAnswer{he}
}

// lostAnswer is a call whose connection broke after it may have been sent:
// the HSM may have done it. It is an unavailable error, and tells the
// cluster not to make a key again elsewhere (cluster.Member).
type lostAnswer struct{ err *hsm.Error }

func (e *lostAnswer) Error() string { return e.err.Error() }

// Unwrap returns the unavailable error.
func (e *lostAnswer) Unwrap() error { return e.err }

// OutcomeUnknown reports that the HSM may have done the call.
func (e *lostAnswer) OutcomeUnknown() bool { return true }

// refusedEarly reports whether err may hide a server's refusal of the
// handshake: the transport gave up on the new connection, or the server
// closed it under the client's first write.
func refusedEarly(err error) bool {
	s := err.Error()
	return strings.Contains(s, "could not be established") || strings.Contains(s, "broken pipe") || strings.Contains(s, "connection reset by peer")
}

// diagnose finds out why a connection could not be established when the
// HTTP/2 transport does not say: in TLS 1.3 a server refuses a client's
// certificate after the client's side of the handshake is done, with an
// alert the client reads only at its first read, which the transport
// reports as a failure to set up the connection. It dials once more and
// reads the server's first bytes to learn the alert.
func (m *Member) diagnose(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	d := tls.Dialer{Config: m.tlsCfg.Clone()}
	c, err := d.DialContext(ctx, "tcp", m.addr)
	if err != nil {
		return pki.ExplainRemote(err, m.id, m.addr)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetReadDeadline(dl)
	}
	_, err = c.Read(make([]byte, 1))
	return pki.ExplainRemote(err, m.id, m.addr)
}

// stream makes a streamed listing, calling fn for each item.
func (m *Member) stream(ctx context.Context, op, session string, in *wire.Call, fn func(*wire.Item) error) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	resp, err := m.post(ctx, op, session, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	n := 0
	for {
		var it wire.Item
		if err := dec.Decode(&it); err != nil {
			return m.transportErr(ctx, op, fmt.Errorf("listing cut short after %d items: %w", n, err))
		}
		if it.Error != nil {
			return m.answerErr(op, it.Error)
		}
		if it.End {
			if it.Count != n {
				return m.transportErr(ctx, op, fmt.Errorf("listing of %d items delivered %d", it.Count, n))
			}
			return nil
		}
		n++
		if err := fn(&it); err != nil {
			return err
		}
	}
}

// Login opens a session on the HSM, on this Member's connection.
func (m *Member) Login(ctx context.Context, c hsm.Credentials) (hsm.Session, error) {
	s := &Session{m: m, creds: c}
	if err := s.login(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// Bootstrap creates the first crypto officer on a new, empty HSM.
func (m *Member) Bootstrap(ctx context.Context, officer hsm.Credentials) error {
	return m.call(ctx, wire.OpBootstrap, "", &wire.Call{User: officer.User, Password: officer.Password}, &wire.Result{})
}

// SetFault injects a fault into the served HSM, for every client of it.
// The interface gives it no error: a fault that cannot be sent is lost, and
// the HSM is then probably down anyway.
func (m *Member) SetFault(f hsm.Fault) {
	_ = m.SetFaultContext(context.Background(), f)
}

// SetFaultContext is SetFault with an error.
func (m *Member) SetFaultContext(ctx context.Context, f hsm.Fault) error {
	ctx, cancel := context.WithTimeout(ctx, untimedCallTimeout)
	defer cancel()
	return m.call(ctx, wire.OpSetFault, "", &wire.Call{Fault: &f}, &wire.Result{})
}

// Fault returns the fault last injected into the served HSM (fail-next as
// it was set, not what is left of it).
func (m *Member) Fault(ctx context.Context) (hsm.Fault, error) {
	var out wire.Result
	if err := m.call(ctx, wire.OpGetFault, "", &wire.Call{}, &out); err != nil {
		return hsm.Fault{}, err
	}
	if out.Fault == nil {
		return hsm.Fault{}, nil
	}
	return *out.Fault, nil
}

// VerifyAudit checks the HSM's audit chain, where it lives.
func (m *Member) VerifyAudit() (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), untimedCallTimeout)
	defer cancel()
	var out wire.Result
	err := m.call(ctx, wire.OpVerifyAudit, "", &wire.Call{}, &out)
	return out.Count, err
}

// Audit calls fn for every audit record in order.
func (m *Member) Audit(fn func(hsm.AuditRecord) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), untimedCallTimeout)
	defer cancel()
	return m.stream(ctx, wire.OpAudit, "", &wire.Call{}, func(it *wire.Item) error {
		if it.Audit == nil {
			return nil
		}
		rec := *it.Audit
		rec.Hash = it.Hash
		return fn(rec)
	})
}

// PeerListKeys lists every token key the HSM holds, streamed.
func (m *Member) PeerListKeys(ctx context.Context) ([]hsm.KeyInfo, error) {
	return m.listKeys(ctx, wire.OpPeerListKeys, "", &wire.Call{})
}

func (m *Member) listKeys(ctx context.Context, op, session string, in *wire.Call) ([]hsm.KeyInfo, error) {
	var keys []hsm.KeyInfo
	err := m.stream(ctx, op, session, in, func(it *wire.Item) error {
		if it.Key != nil {
			keys = append(keys, *it.Key)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return keys, nil
}

// PeerExportMasked exports a key as a masked object.
func (m *Member) PeerExportMasked(ctx context.Context, ref hsm.KeyRef) ([]byte, error) {
	var out wire.Result
	err := m.call(ctx, wire.OpPeerExportMasked, "", &wire.Call{Ref: uint64(ref)}, &out)
	return out.Data, err
}

// PeerInsertMasked stores a masked object under its handle.
func (m *Member) PeerInsertMasked(ctx context.Context, blob []byte) (hsm.KeyInfo, error) {
	var out wire.Result
	err := m.call(ctx, wire.OpPeerInsertMasked, "", &wire.Call{Data: blob}, &out)
	return keyOf(out.Key), err
}

// PeerDeleteKey removes a key whoever owns it.
func (m *Member) PeerDeleteKey(ctx context.Context, ref hsm.KeyRef) error {
	return m.call(ctx, wire.OpPeerDeleteKey, "", &wire.Call{Ref: uint64(ref)}, &wire.Result{})
}

// PeerUsers lists the HSM's user records.
func (m *Member) PeerUsers(ctx context.Context) ([]hsm.UserRecord, error) {
	var out wire.Result
	err := m.call(ctx, wire.OpPeerUsers, "", &wire.Call{}, &out)
	return out.Records, err
}

// PeerPutUser stores a user record as is.
func (m *Member) PeerPutUser(ctx context.Context, u hsm.UserRecord) error {
	return m.call(ctx, wire.OpPeerPutUser, "", &wire.Call{Record: &u}, &wire.Result{})
}

// PeerPutQuorumToken stores a quorum token another HSM generated.
func (m *Member) PeerPutQuorumToken(ctx context.Context, t hsm.QuorumToken) error {
	return m.call(ctx, wire.OpPeerPutQuorumToken, "", &wire.Call{Token: &t}, &wire.Result{})
}

// Snapshot returns the HSM's users, token keys (masked) and policy.
func (m *Member) Snapshot(ctx context.Context) ([]byte, error) {
	var out wire.Result
	err := m.call(ctx, wire.OpSnapshot, "", &wire.Call{}, &out)
	return out.Data, err
}

// RestoreSnapshot replaces the HSM's users, keys and policy.
func (m *Member) RestoreSnapshot(ctx context.Context, snap []byte) error {
	return m.call(ctx, wire.OpRestoreSnapshot, "", &wire.Call{Data: snap}, &wire.Result{})
}

func keyOf(k *hsm.KeyInfo) hsm.KeyInfo {
	if k == nil {
		return hsm.KeyInfo{}
	}
	return *k
}

// Session is a user's session on a remote HSM. It implements
// hsm.FullSession and hsm.Quorum.
type Session struct {
	m     *Member
	creds hsm.Credentials

	mu     sync.Mutex
	token  string
	user   hsm.User
	closed bool
}

var (
	_ hsm.FullSession = (*Session)(nil)
	_ hsm.Quorum      = (*Session)(nil)
)

func (s *Session) login(ctx context.Context) error {
	s.mu.Lock()
	c := s.creds
	s.mu.Unlock()
	var out wire.Result
	if err := s.m.call(ctx, wire.OpLogin, "", &wire.Call{User: c.User, Password: c.Password}, &out); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.token = out.Session
	if out.User != nil {
		s.user = *out.User
	}
	return nil
}

func (s *Session) current(op string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return "", hsm.Errorf(hsm.CodePermission, op, 0, "the session has been logged out")
	}
	return s.token, nil
}

// ended reports whether err is the server's refusal of a session that
// ended with its connection.
func ended(err error) bool {
	var he *hsm.Error
	return errors.As(err, &he) && he.Code == hsm.CodePermission && strings.HasPrefix(he.Msg, server.SessionEnded)
}

// do runs a session call; if the session ended with a broken connection it
// logs in again once and repeats the call, which the server had refused
// before doing anything.
func (s *Session) do(ctx context.Context, op string, in *wire.Call, out *wire.Result) error {
	tok, err := s.current(op)
	if err != nil {
		return err
	}
	err = s.m.call(ctx, op, tok, in, out)
	if !ended(err) {
		return err
	}
	if err := s.relogin(ctx, tok); err != nil {
		return err
	}
	if tok, err = s.current(op); err != nil {
		return err
	}
	return s.m.call(ctx, op, tok, in, out)
}

func (s *Session) relogin(ctx context.Context, old string) error {
	s.mu.Lock()
	same := s.token == old
	s.mu.Unlock()
	if !same {
		return nil // another call logged in again already
	}
	return s.login(ctx)
}

func (s *Session) key(ctx context.Context, op string, in *wire.Call) (hsm.KeyInfo, error) {
	var out wire.Result
	err := s.do(ctx, op, in, &out)
	return keyOf(out.Key), err
}

// newKey is key for a call that makes the key.
func (s *Session) newKey(ctx context.Context, op string, in *wire.Call) (hsm.KeyInfo, error) {
	var out wire.Result
	err := s.makeKeys(ctx, op, in, &out)
	return keyOf(out.Key), err
}

// makeKeys runs a call that makes keys. Under a context with hsm.MaskedCopies
// it asks the HSM for their masked objects in the same call, which saves
// the cluster a round trip per new key when it copies it to its other HSMs.
func (s *Session) makeKeys(ctx context.Context, op string, in *wire.Call, out *wire.Result) error {
	mc := hsm.MaskedCopiesFrom(ctx)
	in.Masked = mc != nil
	if err := s.do(ctx, op, in, out); err != nil {
		return err
	}
	if mc != nil {
		for _, m := range out.Masked {
			mc.Put(hsm.KeyRef(m.Ref), m.Blob)
		}
	}
	return nil
}

func (s *Session) data(ctx context.Context, op string, in *wire.Call) ([]byte, error) {
	var out wire.Result
	err := s.do(ctx, op, in, &out)
	return out.Data, err
}

func (s *Session) none(ctx context.Context, op string, in *wire.Call) error {
	return s.do(ctx, op, in, &wire.Result{})
}

// BackendName names the HSM and its address.
func (s *Session) BackendName() string {
	return fmt.Sprintf("remote HSM %s at %s", s.m.id, s.m.addr)
}

// User is the logged-in user.
func (s *Session) User() hsm.User {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.user
}

// Logout ends the session on the HSM and destroys its session keys.
func (s *Session) Logout(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	tok := s.token
	s.mu.Unlock()
	err := s.m.call(ctx, wire.OpLogout, tok, &wire.Call{}, &wire.Result{})
	if hsm.CodeOf(err) == hsm.CodeUnavailable {
		return nil // the connection is gone, and the session with it
	}
	return err
}

// GenerateKey makes a secret key.
func (s *Session) GenerateKey(ctx context.Context, spec hsm.KeySpec) (hsm.KeyInfo, error) {
	return s.newKey(ctx, wire.OpGenerateKey, &wire.Call{KeySpec: &spec})
}

// GenerateKeyPair makes a key pair.
func (s *Session) GenerateKeyPair(ctx context.Context, spec hsm.KeyPairSpec) (pub, priv hsm.KeyInfo, err error) {
	var out wire.Result
	err = s.makeKeys(ctx, wire.OpGenerateKeyPair, &wire.Call{PairSpec: &spec}, &out)
	return keyOf(out.Pub), keyOf(out.Key), err
}

// ListKeys returns the keys f matches, streamed.
func (s *Session) ListKeys(ctx context.Context, f hsm.Filter) ([]hsm.KeyInfo, error) {
	tok, err := s.current("list-keys")
	if err != nil {
		return nil, err
	}
	keys, err := s.m.listKeys(ctx, wire.OpListKeys, tok, &wire.Call{Filter: wire.FilterOf(f)})
	if ended(err) {
		if err := s.relogin(ctx, tok); err != nil {
			return nil, err
		}
		if tok, err = s.current("list-keys"); err != nil {
			return nil, err
		}
		keys, err = s.m.listKeys(ctx, wire.OpListKeys, tok, &wire.Call{Filter: wire.FilterOf(f)})
	}
	return keys, err
}

// GetKey returns one key.
func (s *Session) GetKey(ctx context.Context, ref hsm.KeyRef) (hsm.KeyInfo, error) {
	return s.key(ctx, wire.OpGetKey, &wire.Call{Ref: uint64(ref)})
}

// WrapKey wraps a key.
func (s *Session) WrapKey(ctx context.Context, r hsm.WrapRequest) ([]byte, error) {
	return s.data(ctx, wire.OpWrapKey, &wire.Call{Wrap: wire.WrapOf(r)})
}

// UnwrapKey unwraps a key.
func (s *Session) UnwrapKey(ctx context.Context, r hsm.UnwrapRequest) (hsm.KeyInfo, error) {
	return s.newKey(ctx, wire.OpUnwrapKey, &wire.Call{Unwrap: wire.UnwrapOf(r)})
}

// Encrypt encrypts with a key inside the HSM.
func (s *Session) Encrypt(ctx context.Context, key hsm.KeyRef, m hsm.Mechanism, p hsm.Params, plaintext []byte) ([]byte, error) {
	return s.data(ctx, wire.OpEncrypt, &wire.Call{Ref: uint64(key), Mechanism: m, Params: &p, Data: plaintext})
}

// Decrypt decrypts with a key inside the HSM.
func (s *Session) Decrypt(ctx context.Context, key hsm.KeyRef, m hsm.Mechanism, p hsm.Params, ciphertext []byte) ([]byte, error) {
	return s.data(ctx, wire.OpDecrypt, &wire.Call{Ref: uint64(key), Mechanism: m, Params: &p, Data: ciphertext})
}

// Info describes the HSM.
func (s *Session) Info(ctx context.Context) (hsm.ClusterInfo, error) {
	var out wire.Result
	err := s.do(ctx, wire.OpInfo, &wire.Call{}, &out)
	if out.Info == nil {
		return hsm.ClusterInfo{}, err
	}
	return *out.Info, err
}

// ShareKey shares a key with a user.
func (s *Session) ShareKey(ctx context.Context, key hsm.KeyRef, user string) error {
	return s.none(ctx, wire.OpShareKey, &wire.Call{Ref: uint64(key), User: user})
}

// UnshareKey withdraws a share.
func (s *Session) UnshareKey(ctx context.Context, key hsm.KeyRef, user string) error {
	return s.none(ctx, wire.OpUnshareKey, &wire.Call{Ref: uint64(key), User: user})
}

// SetAttribute sets one boolean attribute.
func (s *Session) SetAttribute(ctx context.Context, key hsm.KeyRef, a hsm.Attr, v bool) error {
	return s.none(ctx, wire.OpSetAttribute, &wire.Call{Ref: uint64(key), Attr: a, Value: v})
}

// DeleteKey deletes a key.
func (s *Session) DeleteKey(ctx context.Context, key hsm.KeyRef) error {
	return s.none(ctx, wire.OpDeleteKey, &wire.Call{Ref: uint64(key)})
}

// ExportPublicKey returns a public key as PEM.
func (s *Session) ExportPublicKey(ctx context.Context, key hsm.KeyRef) ([]byte, error) {
	return s.data(ctx, wire.OpExportPublicKey, &wire.Call{Ref: uint64(key)})
}

// ImportPublicKey stores a PEM public key.
func (s *Session) ImportPublicKey(ctx context.Context, pem []byte, t hsm.Template) (hsm.KeyInfo, error) {
	return s.newKey(ctx, wire.OpImportPublicKey, &wire.Call{Data: pem, Template: &t})
}

// ExportMasked exports a key as a masked object.
func (s *Session) ExportMasked(ctx context.Context, key hsm.KeyRef) ([]byte, error) {
	return s.data(ctx, wire.OpExportMasked, &wire.Call{Ref: uint64(key)})
}

// InsertMasked stores a masked object.
func (s *Session) InsertMasked(ctx context.Context, blob []byte) (hsm.KeyInfo, error) {
	return s.newKey(ctx, wire.OpInsertMasked, &wire.Call{Data: blob})
}

// CreateUser adds a user.
func (s *Session) CreateUser(ctx context.Context, name string, role hsm.Role, password string) error {
	return s.none(ctx, wire.OpCreateUser, &wire.Call{User: name, Role: role, Password: password})
}

// DeleteUser removes a user.
func (s *Session) DeleteUser(ctx context.Context, name string) error {
	return s.none(ctx, wire.OpDeleteUser, &wire.Call{User: name})
}

// ChangePassword sets a user's password.
func (s *Session) ChangePassword(ctx context.Context, name, password string) error {
	err := s.none(ctx, wire.OpChangePassword, &wire.Call{User: name, Password: password})
	if err == nil {
		s.mu.Lock()
		if name == s.creds.User {
			s.creds.Password = password // so that a login again after a broken connection works
		}
		s.mu.Unlock()
	}
	return err
}

// ListUsers lists the users.
func (s *Session) ListUsers(ctx context.Context) ([]hsm.User, error) {
	var out wire.Result
	err := s.do(ctx, wire.OpListUsers, &wire.Call{}, &out)
	return out.Users, err
}

// RegisterQuorumKey stores the caller's quorum public key.
func (s *Session) RegisterQuorumKey(ctx context.Context, user string, publicPEM []byte) error {
	return s.none(ctx, wire.OpRegisterQuorumKey, &wire.Call{User: user, Data: publicPEM})
}

// SetQuorumPolicy sets M for a service.
func (s *Session) SetQuorumPolicy(ctx context.Context, svc hsm.QuorumService, m int) error {
	return s.none(ctx, wire.OpSetQuorumPolicy, &wire.Call{Service: svc, M: m})
}

// GenerateQuorumToken makes a quorum token.
func (s *Session) GenerateQuorumToken(ctx context.Context, svc hsm.QuorumService) (hsm.QuorumToken, error) {
	var out wire.Result
	err := s.do(ctx, wire.OpGenerateQuorumToken, &wire.Call{Service: svc}, &out)
	if out.Token == nil {
		return hsm.QuorumToken{}, err
	}
	return *out.Token, err
}

// ApproveQuorumToken submits approvals of a token.
func (s *Session) ApproveQuorumToken(ctx context.Context, id hsm.Bytes, approvals []hsm.QuorumApproval) error {
	return s.none(ctx, wire.OpApproveQuorumToken, &wire.Call{TokenID: id, Approvals: approvals})
}
