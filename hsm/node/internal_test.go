package node

import (
	"bytes"
	"context"
	"crypto/rand"
	"path/filepath"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/wrap"
)

func newInternal(t testing.TB, o Options) *Node {
	t.Helper()
	o.ID, o.Lineage = "hsm-internal", "lineage-internal"
	o.LineageSecret = bytes.Repeat([]byte{1}, 32)
	o.KDFIterations = 1000
	n, err := Create(filepath.Join(t.TempDir(), "n.db"), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func TestThrottleAtMaxConcurrentOps(t *testing.T) {
	n := newInternal(t, Options{MaxConcurrentOps: 3})
	ctx := context.Background()
	var releases []func()
	for i := 0; i < 3; i++ {
		r, err := n.begin(ctx, "test")
		if err != nil {
			t.Fatalf("slot %d: %v", i, err)
		}
		releases = append(releases, r)
	}
	_, err := n.PeerListKeys(ctx)
	if hsm.CodeOf(err) != hsm.CodeThrottled || !hsm.IsRetryable(err) {
		t.Fatalf("op past MaxConcurrentOps: %v", err)
	}
	if n.InFlight() != 3 {
		t.Errorf("in flight = %d after a refused op, want 3", n.InFlight())
	}
	releases[0]()
	if _, err := n.PeerListKeys(ctx); err != nil {
		t.Errorf("after a slot freed: %v", err)
	}
	for _, r := range releases[1:] {
		r()
	}
	if n.InFlight() != 0 {
		t.Errorf("in flight = %d, want 0", n.InFlight())
	}
}

func TestInsertMaskedOtherKeySameHandle(t *testing.T) {
	n := newInternal(t, Options{})
	ctx := context.Background()
	if err := n.Bootstrap(ctx, hsm.Credentials{User: "admin", Password: "officer-password"}); err != nil {
		t.Fatal(err)
	}
	co, _ := n.Login(ctx, hsm.Credentials{User: "admin", Password: "officer-password"})
	if err := co.(hsm.FullSession).CreateUser(ctx, "alice", hsm.RoleCryptoUser, "alice-password"); err != nil {
		t.Fatal(err)
	}
	s, _ := n.Login(ctx, hsm.Credentials{User: "alice", Password: "alice-password"})
	k, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256})
	if err != nil {
		t.Fatal(err)
	}
	other := make([]byte, 32)
	rand.Read(other)
	info := k
	info.KCV, _ = wrap.KCVSecret(other)
	blob := n.mask(info, other)
	_, err = co.(hsm.FullSession).InsertMasked(ctx, blob)
	if hsm.CodeOf(err) != hsm.CodeExists || !bytes.Contains([]byte(err.Error()), []byte(k.Ref.String())) {
		t.Errorf("insert of another key under a used handle: %v", err)
	}
	// A blob whose KCV does not match its material is refused.
	info.KCV = k.KCV
	info.Ref = 42
	if _, err := co.(hsm.FullSession).InsertMasked(ctx, n.mask(info, other)); hsm.CodeOf(err) != hsm.CodeIntegrity {
		t.Errorf("kcv mismatch: %v", err)
	}
}

func seedPayload() []byte {
	return encodeMaskedPayload(hsm.KeyInfo{Ref: 0x1122334455667788, Class: hsm.ClassSecret, Type: hsm.TypeAES, Bits: 128,
		Label: "seed", ID: []byte{1, 2}, Attrs: hsm.Attributes{Token: true, Sensitive: true}, KCV: []byte{1, 2, 3},
		Owner: "alice", SharedWith: []string{"bob", "carol"}}, bytes.Repeat([]byte{9}, 16))
}

// FuzzDecodeMasked feeds untrusted bytes to the masked-object parsers: the
// header parser and unmask (which must fail cleanly on anything not sealed
// by this lineage), and the payload decoder, which must either refuse the
// input or decode it to something that re-encodes to the same bytes.
func FuzzDecodeMasked(f *testing.F) {
	n := newInternal(f, Options{})
	valid := n.mask(hsm.KeyInfo{Ref: 7, Class: hsm.ClassSecret, Type: hsm.TypeAES, Bits: 128, KCV: mustKCV(bytes.Repeat([]byte{9}, 16)), Owner: "alice"}, bytes.Repeat([]byte{9}, 16))
	f.Add(valid)
	f.Add(seedPayload())
	f.Add([]byte("KMMO\x01\x00\x03abc"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		parseMaskedHeader(b)
		if mk, err := n.unmask("fuzz", b); err == nil && (mk.info.Ref != 7 || mk.info.Owner != "alice") {
			// Only blobs sealed under the masking key open; the fuzzer
			// cannot forge one, so success means it replayed a seed.
			t.Fatalf("unmask accepted a forged blob: %+v", mk.info)
		} else if err != nil && hsm.CodeOf(err) != hsm.CodeIntegrity {
			t.Fatalf("unmask error %v has code %q, want integrity", err, hsm.CodeOf(err))
		}
		mk, err := decodeMaskedPayload(b)
		if err != nil {
			return
		}
		if again := encodeMaskedPayload(mk.info, mk.material); !bytes.Equal(again, b) {
			t.Fatalf("decode/encode is not a round trip:\n%x\n%x", b, again)
		}
	})
}

func mustKCV(k []byte) []byte { v, _ := wrap.KCVSecret(k); return v }
