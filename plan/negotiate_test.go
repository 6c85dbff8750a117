package plan

import (
	"fmt"
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
)

// softHSM is what SoftHSM 2.6.1 offers, as hsm/pkcs11 reads it.
var softHSM = []hsm.MechanismInfo{
	{Mechanism: hsm.MechAESKWP, Wrap: true, Unwrap: true, Native: "CKM_AES_KEY_WRAP_PAD"},
	{Mechanism: hsm.MechAESKW, Wrap: true, Unwrap: true, Native: "CKM_AES_KEY_WRAP"},
	{Mechanism: hsm.MechRSAOAEP, Wrap: true, Unwrap: true, Encrypt: true, Decrypt: true, Hashes: []string{"sha1"}, Native: "CKM_RSA_PKCS_OAEP"},
}

func tokenInv(n int, mechs []hsm.MechanismInfo) hsm.Inventory {
	var keys []hsm.KeyInfo
	for i := range n {
		keys = append(keys, aes(hsm.KeyRef(i+1), fmt.Sprint("k", i), fmt.Sprint("kcv", i), func(k *hsm.KeyInfo) { k.Owner = "user" }))
	}
	c := hsm.ClusterInfo{ID: "pkcs11:legacy/1", Policy: hsm.Policy{KeyCapacity: 1 << 30}}
	in := inv(c, "user", hsm.RoleCryptoUser, nil, keys...)
	in.Name, in.Can, in.Mechanisms = "pkcs11:token=legacy", hsm.Capabilities{Delete: true}, mechs
	return in
}

func TestNegotiateFromSoftHSM(t *testing.T) {
	dst := inv(info("dst", "L2"), "tina", hsm.RoleCryptoUser, []string{"tina"})
	for _, n := range []int{25, 3} {
		p, err := Build(tokenInv(n, softHSM), dst, Options{}, now)
		if err != nil {
			t.Fatal(err)
		}
		tr := p.Transport
		if tr.Method != MethodSessionKEK || tr.Hash != "sha1" {
			t.Fatalf("%d keys: transport %+v, want session-kek with sha1", n, tr)
		}
		if !strings.Contains(tr.Why, "only with sha1") {
			t.Errorf("%d keys: why %q does not say the token takes sha1 only", n, tr.Why)
		}
		if n < AutoSessionKEKThreshold && !strings.Contains(tr.Why, "CKM_RSA_AES_KEY_WRAP") {
			t.Errorf("%d keys: why %q does not say rsa-aes is missing", n, tr.Why)
		}
	}
	// Between two included clusters nothing changes: sha256.
	p, err := Build(inv(info("src", "L1"), "alice", hsm.RoleCryptoUser, nil, aes(1, "a", "111", nil)), dst, Options{}, now)
	if err != nil || p.Transport.Hash != "sha256" || p.Transport.Method != MethodRSAAES {
		t.Fatalf("included clusters: %+v %v", p.Transport, err)
	}
}

func TestNegotiateRefuses(t *testing.T) {
	dst := inv(info("dst", "L2"), "tina", hsm.RoleCryptoUser, []string{"tina"})
	noKWP := []hsm.MechanismInfo{softHSM[2]}
	_, err := Build(tokenInv(25, noKWP), dst, Options{}, now)
	if err == nil || !strings.Contains(err.Error(), "CKM_AES_KEY_WRAP_PAD") || !strings.Contains(err.Error(), "CKM_RSA_AES_KEY_WRAP") {
		t.Fatalf("no transport: %v", err)
	}
	_, err = Build(tokenInv(25, softHSM), dst, Options{Hash: "sha256"}, now)
	if err == nil || !strings.Contains(err.Error(), "only with sha1, not sha256") {
		t.Fatalf("sha256 asked of a sha1-only token: %v", err)
	}
	_, err = Build(tokenInv(25, softHSM), dst, Options{Transport: "rsa-aes"}, now)
	if err == nil || !strings.Contains(err.Error(), "CKM_RSA_AES_KEY_WRAP") {
		t.Fatalf("rsa-aes asked of a token without it: %v", err)
	}
}

// TestCheckValueFromToken: a token key whose check value was found by a
// round trip is transferred and the plan says so; one without a check
// value is blocked, saying why.
func TestCheckValueFromToken(t *testing.T) {
	src := tokenInv(3, softHSM)
	src.Keys[0].KCVFrom = hsm.KCVRoundTrip
	src.Keys[1].KCV = nil
	dst := inv(info("dst", "L2"), "tina", hsm.RoleCryptoUser, []string{"tina"})
	p, err := Build(src, dst, Options{}, now)
	if err != nil {
		t.Fatal(err)
	}
	byRef := map[hsm.KeyRef]Item{}
	for _, it := range p.Items {
		byRef[it.Ref] = it
	}
	if it := byRef[src.Keys[0].Ref]; it.Action != Transfer || !strings.Contains(it.Reason, "round trip") {
		t.Errorf("round-trip KCV: %+v", it)
	}
	if it := byRef[src.Keys[1].Ref]; it.Action != Blocked || it.ReasonCode != ReasonNoKCV {
		t.Errorf("no KCV: %+v", it)
	}
}
