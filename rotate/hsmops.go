package rotate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
)

// Session is what a rotation needs of a backend: the core, and deleting
// the session objects it unwraps data keys into as soon as they are used
// (a million data keys must not pile up until logout).
type Session interface {
	hsm.Session
	hsm.KeyDeleter
}

// Side is one cluster as rotate sees it: a name for messages (its
// directory) and one logged-in session per lane, all of the same user.
type Side struct {
	Name     string
	Sessions []Session
}

// sessionLabel labels every session object rotate makes, so that one left
// behind (it cannot outlive its session) is easy to recognise.
const sessionLabel = "keymig-rotate"

// lane is one path a data key takes: a source session and, across
// clusters, a target session with the transport KEK shared by the two.
type lane struct {
	src, dst Session
	srcKEK   hsm.KeyRef // source: session AES-256 KEK, wrap
	dstKEK   hsm.KeyRef // target: the same KEK, unwrap
	extra    []keyOn    // transport keys to delete at close
}

type keyOn struct {
	s    Session
	ref  hsm.KeyRef
	side string
}

// sessionTemplate is the template of every session object rotate unwraps:
// it must be extractable to be wrapped again.
func sessionTemplate() hsm.Template {
	return hsm.Template{Label: sessionLabel, Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: true}}
}

// mech maps a record's alg to the HSM mechanism.
func mech(alg string) hsm.Mechanism {
	if alg == AlgGCM {
		return hsm.MechAESGCM
	}
	return hsm.MechAESKWP
}

// setupLanes pairs the sessions of both sides and, across clusters, moves
// a session KEK from each source session to its target session by
// RSA-OAEP: one RSA operation per lane, then AES-KWP per data key.
func setupLanes(ctx context.Context, src Side, dst *Side) (_ []*lane, err error) {
	if len(src.Sessions) == 0 {
		return nil, fmt.Errorf("source cluster %s: no session to work with", src.Name)
	}
	var lanes []*lane
	defer func() {
		if err != nil {
			closeLanes(context.WithoutCancel(ctx), lanes, nil)
		}
	}()
	for i, s := range src.Sessions {
		l := &lane{src: s, dst: s}
		lanes = append(lanes, l)
		if dst == nil {
			continue
		}
		if len(dst.Sessions) == 0 {
			return nil, fmt.Errorf("target cluster %s: no session to work with", dst.Name)
		}
		l.dst = dst.Sessions[i%len(dst.Sessions)]
		if err := l.transport(ctx, src.Name, dst.Name); err != nil {
			return nil, err
		}
	}
	return lanes, nil
}

// oaepParams is the OAEP hash for the session KEK: sha256, or the
// strongest hash both sides take when one does not (a PKCS#11 token may
// take sha1 only; hsm.MechanismLister says so).
func oaepParams(ctx context.Context, a, b hsm.Session) (hsm.Params, error) {
	hashes := []string{"sha256", "sha384", "sha512", "sha224", "sha1"}
	takes := func(s hsm.Session, h string) (bool, error) {
		ml, ok := s.(hsm.MechanismLister)
		if !ok {
			return true, nil
		}
		infos, err := ml.Mechanisms(ctx)
		if err != nil {
			return false, err
		}
		for _, i := range infos {
			if i.Mechanism == hsm.MechRSAOAEP && i.SupportsHash(h) {
				return true, nil
			}
		}
		return false, nil
	}
	for _, h := range hashes {
		ok1, err := takes(a, h)
		if err != nil {
			return hsm.Params{}, err
		}
		ok2, err := takes(b, h)
		if err != nil {
			return hsm.Params{}, err
		}
		if ok1 && ok2 {
			return hsm.Params{Hash: h}, nil
		}
	}
	return hsm.Params{}, hsm.Errorf(hsm.CodeUnsupportedMechanism, "", 0, "no RSA-OAEP hash both sides take, so the session KEK cannot move; nothing was rotated")
}

// transport makes the lane's KEK: an RSA pair on the target, its public
// half imported into the source, an AES-256 KEK on the source wrapped
// under it and unwrapped on the target. All are session keys.
func (l *lane) transport(ctx context.Context, srcName, dstName string) error {
	label := sessionLabel + "-transport"
	pub, priv, err := l.dst.GenerateKeyPair(ctx, hsm.KeyPairSpec{
		Type: hsm.TypeRSA, Bits: 2048,
		Public:  hsm.Template{Label: label, Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}},
		Private: hsm.Template{Label: label, Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrUnwrap: true, hsm.AttrExtractable: false}},
	})
	if err != nil {
		return fmt.Errorf("target cluster %s: making the RSA transport key pair: %w", dstName, err)
	}
	l.extra = append(l.extra, keyOn{l.dst, pub.Ref, dstName}, keyOn{l.dst, priv.Ref, dstName})
	pem, err := l.dst.ExportPublicKey(ctx, pub.Ref)
	if err != nil {
		return fmt.Errorf("target cluster %s: exporting the transport public key: %w", dstName, err)
	}
	imp, err := l.src.ImportPublicKey(ctx, pem, hsm.Template{Label: label, Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}})
	if err != nil {
		return fmt.Errorf("source cluster %s: importing the transport public key: %w", srcName, err)
	}
	l.extra = append(l.extra, keyOn{l.src, imp.Ref, srcName})
	kek, err := l.src.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
		Label: label + "-kek", Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrExtractable: true},
	}})
	if err != nil {
		return fmt.Errorf("source cluster %s: making the session KEK: %w", srcName, err)
	}
	l.srcKEK = kek.Ref
	l.extra = append(l.extra, keyOn{l.src, kek.Ref, srcName})
	oaep, err := oaepParams(ctx, l.src, l.dst)
	if err != nil {
		return fmt.Errorf("clusters %s and %s: %w", srcName, dstName, err)
	}
	blob, err := l.src.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, Params: oaep, WrappingKey: imp.Ref, Payload: kek.Ref})
	if err != nil {
		return fmt.Errorf("source cluster %s: wrapping the session KEK: %w", srcName, err)
	}
	moved, err := l.dst.UnwrapKey(ctx, hsm.UnwrapRequest{
		Mechanism: hsm.MechRSAOAEP, Params: oaep, UnwrappingKey: priv.Ref, Blob: blob, Class: hsm.ClassSecret, Type: hsm.TypeAES,
		Template: hsm.Template{Label: label + "-kek", Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrUnwrap: true, hsm.AttrExtractable: false}},
	})
	if err != nil {
		return fmt.Errorf("target cluster %s: unwrapping the session KEK: %w", dstName, err)
	}
	l.dstKEK = moved.Ref
	l.extra = append(l.extra, keyOn{l.dst, moved.Ref, dstName})
	if !bytes.Equal(moved.KCV, kek.KCV) {
		return fmt.Errorf("the session KEK arrived at target cluster %s with check value %s, sent with %s: the transport is broken, nothing was rotated", dstName, moved.KCV, kek.KCV)
	}
	return nil
}

// closeLanes deletes the transport keys. They are session keys, so they go
// away at logout anyway; deleting them now keeps the HSMs tidy.
func closeLanes(ctx context.Context, lanes []*lane, log *slog.Logger) {
	for _, l := range lanes {
		for i := len(l.extra) - 1; i >= 0; i-- {
			k := l.extra[i]
			if err := k.s.DeleteKey(ctx, k.ref); err != nil && log != nil {
				log.Warn("could not delete a transport key; it is a session key and goes away at logout", "cluster", k.side, "key", k.ref, "err", err)
			}
		}
		l.extra = nil
	}
}

// recordError is a problem with one record (not with an HSM or a file).
type recordError struct {
	Line int64
	ID   string
	Err  error
}

func (e *recordError) Error() string {
	if e.ID != "" {
		return fmt.Sprintf("line %d (id %q): %v", e.Line, e.ID, e.Err)
	}
	return fmt.Sprintf("line %d: %v", e.Line, e.Err)
}

func (e *recordError) Unwrap() error { return e.Err }

// RecordError is the error a run stops with under OnError stop; it names
// the input file and the line.
type RecordError struct {
	File string
	Line int64
	ID   string
	Err  error
}

// Error names the file, line and id, and says what to do.
func (e *RecordError) Error() string {
	return e.Problem() + "; fix the record, or rotate under the skip policy to write such records to the rejects file and go on"
}

// Problem names the file, line and id and says what is wrong, without the
// advice of Error, for callers whose advice differs (a migration).
func (e *RecordError) Problem() string {
	id := ""
	if e.ID != "" {
		id = fmt.Sprintf(" (id %q)", e.ID)
	}
	return fmt.Sprintf("%s line %d%s: %v", e.File, e.Line, id, e.Err)
}

// Unwrap returns the record's problem.
func (e *RecordError) Unwrap() error { return e.Err }

// The HSM calls of a rotation. None is retried here: the backend retries
// what its HSMs answer (see package hsm/cluster), and a call that still
// fails fails its batch, which the next run redoes.

// unwrapSession unwraps ct under key into a session object of s.
func unwrapSession(ctx context.Context, s Session, m hsm.Mechanism, key hsm.KeyRef, ct []byte) (hsm.KeyInfo, error) {
	return s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: m, UnwrappingKey: key, Blob: ct,
		Class: hsm.ClassSecret, Type: hsm.TypeAES, Template: sessionTemplate()})
}

// wrapWith wraps payload under key.
func wrapWith(ctx context.Context, s Session, m hsm.Mechanism, key, payload hsm.KeyRef) ([]byte, error) {
	return s.WrapKey(ctx, hsm.WrapRequest{Mechanism: m, WrappingKey: key, Payload: payload})
}

// drop deletes a session object, even if ctx was cancelled meanwhile.
func drop(ctx context.Context, s Session, ref hsm.KeyRef) error {
	err := s.DeleteKey(context.WithoutCancel(ctx), ref)
	if hsm.CodeOf(err) == hsm.CodeNotFound {
		err = nil
	}
	return err
}

// errUnwrap is what a record gets when its ciphertext does not unwrap under
// the old master: the HSM's one unwrap error, whatever the cause.
var errUnwrap = errors.New(hsm.UnwrapFailedMessage)

// rewrap re-encrypts one data key through lane l, inside the HSMs, and
// returns its new ciphertext. A ciphertext that does not unwrap under the
// old master is a record error; anything else is the lane's.
func (l *lane) rewrap(ctx context.Context, from, to hsm.KeyRef, inAlg, outAlg string, ct []byte, srcName, dstName string) ([]byte, error) {
	k1, err := unwrapSession(ctx, l.src, mech(inAlg), from, ct)
	if err != nil {
		if errors.Is(err, hsm.ErrUnwrapFailed) {
			return nil, &recordError{Err: errUnwrap}
		}
		return nil, fmt.Errorf("source cluster %s: unwrap under the old master %s: %w", srcName, from, err)
	}
	if err := failpoint.Hit(failpoint.RotateAfterSessionUnwrap); err != nil {
		drop(ctx, l.src, k1.Ref)
		return nil, err
	}
	if l.srcKEK == 0 { // one cluster: wrap under the new master right here
		out, err := wrapWith(ctx, l.src, mech(outAlg), to, k1.Ref)
		if derr := drop(ctx, l.src, k1.Ref); derr != nil && err == nil {
			err = fmt.Errorf("deleting session object %s: %w", k1.Ref, derr)
		}
		if err != nil {
			return nil, fmt.Errorf("cluster %s: wrap under the new master %s: %w", srcName, to, err)
		}
		return out, nil
	}
	blob, err := wrapWith(ctx, l.src, hsm.MechAESKWP, l.srcKEK, k1.Ref)
	if derr := drop(ctx, l.src, k1.Ref); derr != nil && err == nil {
		err = fmt.Errorf("deleting session object %s: %w", k1.Ref, derr)
	}
	if err != nil {
		return nil, fmt.Errorf("source cluster %s: wrap under the transport KEK: %w", srcName, err)
	}
	k2, err := unwrapSession(ctx, l.dst, hsm.MechAESKWP, l.dstKEK, blob)
	if err != nil {
		return nil, fmt.Errorf("target cluster %s: unwrap under the transport KEK: %w", dstName, err)
	}
	if !bytes.Equal(k1.KCV, k2.KCV) {
		drop(ctx, l.dst, k2.Ref)
		return nil, fmt.Errorf("a data key arrived at target cluster %s with check value %s, sent with %s: the transport is broken", dstName, k2.KCV, k1.KCV)
	}
	out, err := wrapWith(ctx, l.dst, mech(outAlg), to, k2.Ref)
	if derr := drop(ctx, l.dst, k2.Ref); derr != nil && err == nil {
		err = fmt.Errorf("deleting session object %s: %w", k2.Ref, derr)
	}
	if err != nil {
		return nil, fmt.Errorf("target cluster %s: wrap under the new master %s: %w", dstName, to, err)
	}
	return out, nil
}
