package migrate

import (
	"context"
	"fmt"
	"log/slog"
	"slices"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/plan"
)

// transport holds the keys a run makes to carry keys across: an RSA pair
// on the target whose public half is imported into the source, and for
// session-kek an AES-256 key on the source moved once to the target. All
// are session keys, so they vanish with the sessions even if keymig is
// killed; close deletes them explicitly when the run ends.
type transport struct {
	src, dst   hsm.Session
	plan       *plan.Plan
	dstPriv    hsm.KeyRef // target: RSA private key, unwrap
	dstPub     hsm.KeyRef // target: its public half
	srcPub     hsm.KeyRef // source: the imported public key, wrap
	srcKEK     hsm.KeyRef // source: session KEK, wrap (session-kek only)
	dstKEK     hsm.KeyRef // target: the same KEK, unwrap
	oaepParams hsm.Params
}

func setupTransport(ctx context.Context, src, dst hsm.Session, p *plan.Plan) (_ *transport, err error) {
	t := &transport{src: src, dst: dst, plan: p, oaepParams: hsm.Params{Hash: p.Transport.Hash}}
	defer func() {
		if err != nil {
			t.close(context.WithoutCancel(ctx), nil)
		}
	}()
	label := plan.TransportLabelPrefix + "-" + p.ShortDigest()
	pub, priv, err := dst.GenerateKeyPair(ctx, hsm.KeyPairSpec{
		Type: hsm.TypeRSA, Bits: p.Transport.Bits,
		Public:  hsm.Template{Label: label, Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}},
		Private: hsm.Template{Label: label, Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrUnwrap: true, hsm.AttrExtractable: false}},
	})
	if err != nil {
		return nil, fmt.Errorf("target cluster: making the %d-bit RSA transport key pair: %w", p.Transport.Bits, err)
	}
	t.dstPub, t.dstPriv = pub.Ref, priv.Ref
	pem, err := dst.ExportPublicKey(ctx, pub.Ref)
	if err != nil {
		return nil, fmt.Errorf("target cluster: exporting the transport public key: %w", err)
	}
	imp, err := src.ImportPublicKey(ctx, pem, hsm.Template{Label: label, Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true}})
	if err != nil {
		return nil, fmt.Errorf("source cluster: importing the transport public key: %w", err)
	}
	t.srcPub = imp.Ref
	if p.Transport.Method != plan.MethodSessionKEK {
		return t, nil
	}
	kek, err := src.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
		Label: label + "-kek", Session: true,
		Attrs: map[hsm.Attr]bool{hsm.AttrWrap: true, hsm.AttrExtractable: true},
	}})
	if err != nil {
		return nil, fmt.Errorf("source cluster: making the session KEK: %w", err)
	}
	t.srcKEK = kek.Ref
	blob, err := src.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, Params: t.oaepParams, WrappingKey: t.srcPub, Payload: kek.Ref})
	if err != nil {
		return nil, fmt.Errorf("source cluster: wrapping the session KEK: %w", err)
	}
	moved, err := dst.UnwrapKey(ctx, hsm.UnwrapRequest{
		Mechanism: hsm.MechRSAOAEP, Params: t.oaepParams, UnwrappingKey: t.dstPriv, Blob: blob,
		Class: hsm.ClassSecret, Type: hsm.TypeAES,
		Template: hsm.Template{Label: label + "-kek", Session: true, Attrs: map[hsm.Attr]bool{hsm.AttrUnwrap: true, hsm.AttrExtractable: false}},
	})
	clear(blob)
	if err != nil {
		return nil, fmt.Errorf("target cluster: unwrapping the session KEK: %w", err)
	}
	t.dstKEK = moved.Ref
	if !slices.Equal(moved.KCV, kek.KCV) {
		return nil, fmt.Errorf("the session KEK arrived with check value %s, sent with %s: the transport is broken, nothing was moved", moved.KCV, kek.KCV)
	}
	return t, nil
}

// requests returns the wrap and unwrap requests for an item's method.
func (t *transport) requests(pi plan.Item) (hsm.WrapRequest, hsm.UnwrapRequest) {
	switch pi.Method {
	case plan.MethodSessionKEK:
		return hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: t.srcKEK, Payload: pi.Ref},
			hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: t.dstKEK}
	case plan.MethodRSAOAEP:
		return hsm.WrapRequest{Mechanism: hsm.MechRSAOAEP, Params: t.oaepParams, WrappingKey: t.srcPub, Payload: pi.Ref},
			hsm.UnwrapRequest{Mechanism: hsm.MechRSAOAEP, Params: t.oaepParams, UnwrappingKey: t.dstPriv}
	default:
		return hsm.WrapRequest{Mechanism: hsm.MechRSAAES, Params: t.oaepParams, WrappingKey: t.srcPub, Payload: pi.Ref},
			hsm.UnwrapRequest{Mechanism: hsm.MechRSAAES, Params: t.oaepParams, UnwrappingKey: t.dstPriv}
	}
}

// close deletes the transport keys on both sides.
func (t *transport) close(ctx context.Context, log *slog.Logger) {
	for _, k := range []struct {
		s    hsm.Session
		ref  hsm.KeyRef
		side string
	}{{t.src, t.srcKEK, "source"}, {t.src, t.srcPub, "source"}, {t.dst, t.dstKEK, "target"}, {t.dst, t.dstPriv, "target"}, {t.dst, t.dstPub, "target"}} {
		if k.ref == 0 {
			continue
		}
		if err := deleteKey(ctx, k.s, k.ref); err != nil && log != nil {
			log.Warn("could not delete a transport key; it is a session key and goes away at logout", "cluster", k.side, "key", k.ref, "err", err)
		}
	}
}
