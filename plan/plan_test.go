package plan

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/clonediff"
)

var now = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)

func info(id, lineage string) hsm.ClusterInfo {
	return hsm.ClusterInfo{ID: id, Region: "us-east-1", Lineage: lineage,
		Policy: hsm.Policy{FIPS: true, KeyCapacity: 3300, KeyAvailabilityCheck: true}}
}

func aes(ref hsm.KeyRef, id string, kcv string, mod func(*hsm.KeyInfo)) hsm.KeyInfo {
	k := hsm.KeyInfo{Ref: ref, Label: "k" + id, ID: hsm.Bytes(id), Class: hsm.ClassSecret, Type: hsm.TypeAES, Bits: 256,
		Attrs: hsm.Attributes{Token: true, Extractable: true, Sensitive: true, Modifiable: true, Destroyable: true},
		KCV:   hsm.Bytes(kcv), Owner: "alice", Coverage: hsm.Coverage{HSMs: []string{"h1", "h2"}}}
	if mod != nil {
		mod(&k)
	}
	return k
}

// everything is what the included cluster can do.
var everything = hsm.Capabilities{Share: true, SetAttribute: true, Delete: true, Masked: true, Users: true}

func inv(c hsm.ClusterInfo, user string, role hsm.Role, users []string, keys ...hsm.KeyInfo) hsm.Inventory {
	c.Keys = len(keys)
	return hsm.Inventory{Name: "/c/" + c.ID, Info: c, User: hsm.User{Name: user, Role: role}, Users: users, Can: everything, Keys: keys}
}

func TestBuildClassifies(t *testing.T) {
	src := inv(info("src", "L1"), "alice", hsm.RoleCryptoUser, []string{"alice", "bob"},
		aes(1, "a", "111", nil),
		aes(2, "b", "222", func(k *hsm.KeyInfo) { k.Attrs.Extractable = false }),
		aes(3, "c", "333", func(k *hsm.KeyInfo) { k.Owner = "bob"; k.SharedWith = []string{"alice"} }),
		aes(4, "d", "444", func(k *hsm.KeyInfo) { k.Attrs.Token = false }),
		aes(5, "e", "555", func(k *hsm.KeyInfo) { k.Type, k.Bits, k.Class = hsm.TypeRSA, 1024, hsm.ClassPrivate }),
		aes(6, "f", "666", func(k *hsm.KeyInfo) { k.SharedWith = []string{"carol"} }),
		aes(7, "g", "777", nil), // already on the target
		aes(8, "h", "888", nil), // id conflict on the target
		aes(9, "i", "999", func(k *hsm.KeyInfo) { k.Attrs.WrapWithTrusted = true }),
		aes(10, "j", "aaa", func(k *hsm.KeyInfo) { k.Class, k.Type, k.Bits = hsm.ClassPrivate, hsm.TypeRSA, 2048 }),
	)
	dst := inv(info("dst", "L2"), "tina", hsm.RoleCryptoUser, []string{"tina", "alice"},
		aes(100, "g", "777", func(k *hsm.KeyInfo) { k.Owner = "tina" }),
		aes(101, "h", "000", func(k *hsm.KeyInfo) { k.Owner = "tina" }),
	)
	p, err := Build(src, dst, Options{Transport: "rsa-oaep"}, now)
	if err != nil {
		t.Fatal(err)
	}
	want := map[hsm.KeyRef]struct {
		action Action
		code   string
		method Method
	}{
		1:  {Transfer, "", MethodRSAOAEP},
		2:  {Blocked, ReasonNotExtractable, ""},
		3:  {Blocked, ReasonNotOwner, ""},
		4:  {Blocked, ReasonSessionKey, ""},
		5:  {Blocked, ReasonNotFIPS, ""},
		6:  {Blocked, ReasonUserMissing, ""},
		7:  {Skip, "", ""},
		8:  {Blocked, ReasonConflict, ""},
		9:  {Blocked, ReasonWrapWithTrusted, ""},
		10: {Transfer, "", MethodRSAAES}, // a private key does not fit in OAEP
	}
	if len(p.Items) != len(want) {
		t.Fatalf("%d items, want %d", len(p.Items), len(want))
	}
	for _, it := range p.Items {
		w := want[it.Ref]
		if it.Action != w.action || it.ReasonCode != w.code || it.Method != w.method {
			t.Errorf("key %s: %s/%s/%s (%s), want %s/%s/%s", it.Ref, it.Action, it.ReasonCode, it.Method, it.Reason, w.action, w.code, w.method)
		}
		if it.Action == Blocked && !strings.Contains(it.Reason, " ") {
			t.Errorf("key %s: reason %q does not tell the user anything", it.Ref, it.Reason)
		}
	}
}

func TestBuildTransportChoice(t *testing.T) {
	many := make([]hsm.KeyInfo, AutoSessionKEKThreshold)
	for i := range many {
		many[i] = aes(hsm.KeyRef(i+1), string(rune('a'+i)), "k"+string(rune('a'+i)), nil)
	}
	tests := []struct {
		name string
		keys []hsm.KeyInfo
		opt  string
		want Method
	}{
		{"auto few", many[:3], "auto", MethodRSAAES},
		{"auto many", many, "auto", MethodSessionKEK},
		{"forced oaep", many[:3], "rsa-oaep", MethodRSAOAEP},
		{"forced kek", many[:1], "session-kek", MethodSessionKEK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := inv(info("s", "L1"), "alice", hsm.RoleCryptoUser, nil, tt.keys...)
			dst := inv(info("d", "L2"), "alice", hsm.RoleCryptoUser, []string{"alice"})
			p, err := Build(src, dst, Options{Transport: tt.opt}, now)
			if err != nil {
				t.Fatal(err)
			}
			if p.Transport.Method != tt.want || p.Transport.Why == "" {
				t.Fatalf("transport %+v, want %s", p.Transport, tt.want)
			}
		})
	}
}

func TestBuildClonesSync(t *testing.T) {
	src := inv(info("s", "L1"), "admin", hsm.RoleCryptoOfficer, nil,
		aes(1, "a", "111", func(k *hsm.KeyInfo) { k.Attrs.Extractable = false }),
		aes(2, "b", "222", nil),
		aes(3, "c", "333", func(k *hsm.KeyInfo) { k.Owner = "zoe" }),
		aes(4, "d", "444", func(k *hsm.KeyInfo) { k.Coverage.Missing = []string{"h2"} }),
		aes(5, "e", "555", nil), // same handle and KCV, shared on the target only
		aes(6, "f", "666", nil), // the handle holds another key on the target
	)
	dst := inv(info("d", "L1"), "admin", hsm.RoleCryptoOfficer, []string{"admin", "alice"},
		aes(2, "b", "222", nil),
		aes(5, "e", "555", func(k *hsm.KeyInfo) { k.SharedWith = []string{"admin"} }),
		aes(6, "f", "999", nil),
	)
	p, err := Build(src, dst, Options{}, now)
	if err != nil {
		t.Fatal(err)
	}
	got := map[hsm.KeyRef]Item{}
	for _, it := range p.Items {
		got[it.Ref] = it
	}
	// The same rules as keymig synckey: a key that differs is never skipped.
	want := map[hsm.KeyRef]struct {
		action Action
		code   string
	}{1: {Sync, ""}, 2: {Skip, ""}, 3: {Blocked, ReasonUserMissing}, 4: {Blocked, ReasonUnsynced},
		5: {Blocked, clonediff.ReasonDiffers}, 6: {Blocked, clonediff.ReasonOtherKey}}
	for ref, w := range want {
		if it := got[ref]; it.Action != w.action || it.ReasonCode != w.code {
			t.Errorf("key %s: %s/%s (%s), want %s/%s", ref, it.Action, it.ReasonCode, it.Reason, w.action, w.code)
		}
	}
}

func TestBuildCapacity(t *testing.T) {
	src := inv(info("s", "L1"), "alice", hsm.RoleCryptoUser, nil, aes(1, "a", "1", nil), aes(2, "b", "2", nil), aes(3, "c", "3", nil))
	d := info("d", "L2")
	d.Policy.KeyCapacity = 2
	dst := inv(d, "alice", hsm.RoleCryptoUser, []string{"alice"}, aes(9, "z", "9", nil))
	p, err := Build(src, dst, Options{}, now)
	if err != nil {
		t.Fatal(err)
	}
	c := p.Counts()
	if c[Transfer] != 1 || c[Blocked] != 2 {
		t.Fatalf("counts %v, want 1 transfer and 2 blocked by capacity", c)
	}
}

func TestDigestDetectsTampering(t *testing.T) {
	src := inv(info("s", "L1"), "alice", hsm.RoleCryptoUser, nil, aes(1, "a", "111", nil), aes(2, "b", "222", nil))
	dst := inv(info("d", "L2"), "alice", hsm.RoleCryptoUser, []string{"alice"})
	p, err := Build(src, dst, Options{}, now)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		t.Fatal(err)
	}
	good := buf.Bytes()
	if _, err := Decode(good); err != nil {
		t.Fatalf("good plan refused: %v", err)
	}
	// Every single-byte change is refused, each with ErrTampered.
	for i := range good {
		bad := bytes.Clone(good)
		bad[i] ^= 0x01
		if _, err := Decode(bad); !errors.Is(err, ErrTampered) {
			t.Fatalf("byte %d (%q) changed: Decode = %v, want ErrTampered", i, good[i], err)
		}
	}
	for _, n := range []int{0, 1, len(good) / 2, len(good) - 2} {
		if _, err := Decode(good[:n]); err == nil {
			t.Fatalf("plan truncated to %d bytes accepted", n)
		}
	}
}

func TestCheckFresh(t *testing.T) {
	srcKeys := []hsm.KeyInfo{aes(1, "a", "111", nil), aes(2, "b", "222", nil)}
	dstKeys := []hsm.KeyInfo{aes(50, "z", "999", func(k *hsm.KeyInfo) { k.Owner = "tina" })}
	src := inv(info("s", "L1"), "alice", hsm.RoleCryptoUser, nil, srcKeys...)
	dst := inv(info("d", "L2"), "tina", hsm.RoleCryptoUser, []string{"tina"}, dstKeys...)
	p, err := Build(src, dst, Options{}, now)
	if err != nil {
		t.Fatal(err)
	}
	migrated := append(dstKeys, aes(77, "a", "111", func(k *hsm.KeyInfo) { k.Owner = "tina" }))
	transport := append(migrated, hsm.KeyInfo{Ref: 88, Label: TransportLabelPrefix + "-x", Class: hsm.ClassPrivate})
	tests := []struct {
		name     string
		src, dst []hsm.KeyInfo
		stale    string
	}{
		{"unchanged", srcKeys, dstKeys, ""},
		{"planned key now on target", srcKeys, migrated, ""},
		{"transport keys ignored", srcKeys, transport, ""},
		{"source key added", append(srcKeys, aes(3, "c", "333", nil)), dstKeys, "1 added"},
		{"source key removed", srcKeys[:1], dstKeys, "1 removed"},
		{"source key changed", []hsm.KeyInfo{srcKeys[0], aes(2, "b", "222", func(k *hsm.KeyInfo) { k.SharedWith = []string{"x"} })}, dstKeys, "1 changed"},
		{"target key deleted", srcKeys, nil, "target"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := p.CheckFresh(tt.src, tt.dst)
			if tt.stale == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrStale) || !strings.Contains(err.Error(), tt.stale) || !strings.Contains(err.Error(), "keymig plan") {
				t.Fatalf("err = %v, want stale mentioning %q", err, tt.stale)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	src := inv(info("s", "L1"), "alice", hsm.RoleCryptoUser, nil, aes(1, "a", "111", nil))
	dst := inv(info("d", "L2"), "alice", hsm.RoleCryptoUser, []string{"alice"})
	p, _ := Build(src, dst, Options{}, now)
	var buf bytes.Buffer
	p.Write(&buf)
	f.Add(buf.Bytes())
	f.Add([]byte(`{"format-version":1}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		q, err := Decode(data)
		if err != nil {
			return
		}
		// Anything accepted must re-seal to the digest it carried.
		d := q.Digest
		if err := q.Seal(); err != nil || q.Digest != d {
			t.Fatalf("accepted a plan whose digest does not verify")
		}
	})
}

// TestBuildForCoreOnlyBackends: a target that cannot share keys gets them
// without their shares, and the item says so; two backends of one lineage
// that do not both move masked objects are no clone pair, so their keys
// transfer rather than sync.
func TestBuildForCoreOnlyBackends(t *testing.T) {
	src := inv(info("src", "L1"), "alice", hsm.RoleCryptoUser, []string{"alice", "bob"},
		aes(1, "a", "111", func(k *hsm.KeyInfo) { k.SharedWith = []string{"bob"} }),
		aes(2, "b", "222", nil))
	dst := inv(info("dst", "L1"), "alice", hsm.RoleCryptoUser, nil)
	dst.Can = hsm.Capabilities{} // a PKCS#11 token: no shares, users or masked objects
	p, err := Build(src, dst, Options{}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, it := range p.Items {
		if it.Action != Transfer {
			t.Errorf("key %s: %s (%s), want transfer: a core-only target is not a clone", it.Ref, it.Action, it.Reason)
		}
	}
	a := p.Items[0]
	if len(a.Shares) != 0 || !strings.Contains(a.NotPreserved, "shares are not carried over") || !strings.Contains(a.NotPreserved, "bob") {
		t.Errorf("key %s: shares %v, not preserved %q; want no shares and a note naming bob", a.Ref, a.Shares, a.NotPreserved)
	}
	if b := p.Items[1]; b.NotPreserved != "" {
		t.Errorf("key %s without shares: not preserved %q", b.Ref, b.NotPreserved)
	}
}
