package remote_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
)

// dropAfterImport serves an HSM whose first public-key import (over the
// whole cluster) is committed and then never answered: the handler
// panics, which resets the HTTP/2 stream, as a daemon killed right after
// its commit would.
type dropAfterImport struct {
	cluster.Member
	fired *atomic.Bool
	where *atomic.Value // the HSM id that committed the lost import
}

func (d dropAfterImport) Login(ctx context.Context, c hsm.Credentials) (hsm.Session, error) {
	s, err := d.Member.Login(ctx, c)
	if err != nil {
		return nil, err
	}
	return dropSession{FullSession: s.(hsm.FullSession), d: d}, nil
}

type dropSession struct {
	hsm.FullSession
	d dropAfterImport
}

func (s dropSession) ImportPublicKey(ctx context.Context, p []byte, t hsm.Template) (hsm.KeyInfo, error) {
	k, err := s.FullSession.ImportPublicKey(ctx, p, t)
	if err == nil && s.d.fired.CompareAndSwap(false, true) {
		s.d.where.Store(s.d.ID())
		panic("the answer is lost")
	}
	return k, err
}

// TestLostAnswerIsNotMadeTwice: after a create whose answer was lost, the
// cluster does not fail over and make the key elsewhere, and listings wait
// for the HSM that may hold it, so that a caller looking before trying
// again cannot miss it.
func TestLostAnswerIsNotMadeTwice(t *testing.T) {
	var fired atomic.Bool
	var where atomic.Value
	c, served := newServedCluster(t, 3, func(m cluster.Member) cluster.Member {
		return dropAfterImport{Member: m, fired: &fired, where: &where}
	})
	ctx := ctxT(t)
	co, err := c.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	if err := co.(hsm.Users).CreateUser(ctx, "alice", hsm.RoleCryptoUser, "correct-horse"); err != nil {
		t.Fatal(err)
	}
	alice, err := c.Login(ctx, hsm.Credentials{User: "alice", Password: "correct-horse"})
	if err != nil {
		t.Fatal(err)
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	pub := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	label := "partner"
	_, err = alice.ImportPublicKey(ctx, pub, hsm.Template{Label: label})
	if !errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), "may or may not have been made") {
		t.Fatalf("import whose answer was lost: %v, want unavailable saying the key may have been made", err)
	}
	holder := where.Load().(string)
	served.nodes[holder].SetFault(hsm.Fault{Down: true})
	// The listing waits for the HSM; this caller gives up first.
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	_, err = alice.ListKeys(short, hsm.Filter{Label: &label})
	if !errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), holder) {
		t.Fatalf("listing while %s, which may hold the key, is down: %v, want unavailable naming it", holder, err)
	}
	served.nodes[holder].SetFault(hsm.Fault{})
	keys, err := alice.ListKeys(ctx, hsm.Filter{Label: &label})
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 1 || keys[0].Coverage.HSMs[0] != holder {
		t.Fatalf("after %s is back: %d keys labelled %q (%+v), want the one it made", holder, len(keys), label, keys)
	}
}
