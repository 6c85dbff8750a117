package clonediff_test

import (
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/clonediff"
)

func key(ref hsm.KeyRef, label, owner string, kcv byte) hsm.KeyInfo {
	return hsm.KeyInfo{
		Ref: ref, Label: label, ID: hsm.Bytes{byte(ref)}, Class: hsm.ClassSecret, Type: hsm.TypeAES, Bits: 256,
		Attrs: hsm.Attributes{Token: true, Encrypt: true}, KCV: hsm.Bytes{kcv, kcv, kcv}, Owner: owner,
		Coverage: hsm.Coverage{HSMs: []string{"h1", "h2"}},
	}
}

func side(dir string, user hsm.User, users []string, keys ...hsm.KeyInfo) hsm.Inventory {
	return hsm.Inventory{
		Name: dir, User: user, Users: users, Keys: keys,
		Info: hsm.ClusterInfo{ID: "cluster-" + dir, Lineage: "lineage-1", Keys: len(keys), Policy: hsm.Policy{KeyCapacity: 100}},
	}
}

var officer = hsm.User{Name: "admin", Role: hsm.RoleCryptoOfficer}

// TestCompareRules checks each row of the diff against CloudHSM's rules.
func TestCompareRules(t *testing.T) {
	same := key(1, "same", "alice", 1)
	attrSrc, attrDst := key(2, "attr", "alice", 2), key(2, "attr", "alice", 2)
	attrDst.Attrs.Decrypt = true
	shareSrc, shareDst := key(3, "share", "alice", 3), key(3, "share", "alice", 3)
	shareSrc.SharedWith = []string{"bob"}
	shareDst.SharedWith = []string{"dave"}
	other := key(4, "other", "alice", 4)
	otherDst := key(4, "other", "alice", 9)
	newKey := key(5, "new", "alice", 5)
	partial := key(6, "partial", "alice", 6)
	partial.Coverage.Missing = []string{"h2"}
	inconsistent := key(7, "inconsistent", "alice", 7)
	inconsistent.Coverage.Inconsistent = []string{"decrypt"}
	noOwner := key(8, "carols", "carol", 8)
	noShare := key(9, "shared-with-erin", "alice", 9)
	noShare.SharedWith = []string{"erin"}
	session := key(10, "session", "alice", 10)
	session.Attrs.Token = false
	idTaken := key(11, "id-taken", "alice", 11)
	idTaken.ID = hsm.Bytes("dup")
	holder := key(12, "holder", "alice", 12)
	holder.ID = hsm.Bytes("dup")
	targetOnly := key(13, "target-only", "alice", 13)

	users := []string{"admin", "alice", "bob", "dave"}
	src := side("us", officer, append(users, "carol", "erin"), same, attrSrc, shareSrc, other, newKey, partial, inconsistent, noOwner, noShare, session, idTaken)
	dst := side("eu", officer, users, same, attrDst, shareDst, otherDst, holder, targetOnly)
	d := clonediff.Compare(src, dst, hsm.Filter{}, true)

	want := map[hsm.KeyRef]struct{ mark, detail string }{
		1:  {"=", "check value 010101"},
		2:  {"*", "decrypt is false on the source, true on the target"},
		3:  {"*", "shared with bob on the source only; shared with dave on the target only"},
		4:  {"*", "holds another key on the target"},
		5:  {"+", "to copy"},
		6:  {"!", "not synchronised across the source cluster (missing on h2); run keymig hsm sync --cluster us"},
		7:  {"!", "inconsistent decrypt"},
		8:  {"!", "user carol does not exist on the target"},
		9:  {"!", "user erin does not exist on the target"},
		10: {"!", "a session key"},
		11: {"!", "already has a secret-key with id 647570 on the target (key 0x000000000000000c)"},
		12: {"-", "on the target only; --prune deletes it (with --yes), but only its owner alice may"},
		13: {"-", "on the target only"},
	}
	if len(d.Rows) != len(want) {
		t.Fatalf("%d rows, want %d: %+v", len(d.Rows), len(want), d.Rows)
	}
	for _, r := range d.Rows {
		w := want[r.Ref]
		if r.Mark != w.mark || !strings.Contains(r.Detail, w.detail) {
			t.Errorf("key %s (%s): %s %q, want %s containing %q", r.Ref, r.Label, r.Mark, r.Detail, w.mark, w.detail)
		}
	}
	if len(d.Copy) != 1 || d.Copy[0].Ref != 5 || len(d.Prune) != 2 {
		t.Errorf("copy %v, prune %v; want key 5 to copy and 2 to prune", d.Copy, d.Prune)
	}
	c := d.Counts()
	if c["="] != 1 || c["+"] != 1 || c["*"] != 3 || c["!"] != 6 || c["-"] != 2 {
		t.Errorf("counts %v", c)
	}
}

// TestCompareLogins checks the owner-or-officer rule on each side, the
// filter and the target's capacity.
func TestCompareLogins(t *testing.T) {
	alice := hsm.User{Name: "alice", Role: hsm.RoleCryptoUser}
	bob := hsm.User{Name: "bob", Role: hsm.RoleCryptoUser}
	users := []string{"alice", "bob"}
	k1, k2 := key(1, "a", "alice", 1), key(2, "b", "alice", 2)

	d := clonediff.Compare(side("us", alice, users, k1), side("eu", bob, users), hsm.Filter{}, false)
	if r := d.Rows[0]; r.Mark != "!" || !strings.Contains(r.Detail, "only alice or a crypto officer may insert it into the target") {
		t.Errorf("bob on the target: %+v", r)
	}
	d = clonediff.Compare(side("us", bob, users, k1), side("eu", alice, users), hsm.Filter{}, false)
	if r := d.Rows[0]; r.Mark != "!" || !strings.Contains(r.Detail, "may export it masked from the source") {
		t.Errorf("bob on the source: %+v", r)
	}
	f, _ := hsm.ParseFilter([]string{"attr.label=b"})
	d = clonediff.Compare(side("us", alice, users, k1, k2), side("eu", alice, users), f, false)
	if len(d.Rows) != 1 || d.Rows[0].Ref != 2 || d.Rows[0].Mark != "+" {
		t.Errorf("filter: %+v", d.Rows)
	}
	full := side("eu", alice, users)
	full.Info.Policy.KeyCapacity, full.Info.Keys = 10, 9
	d = clonediff.Compare(side("us", alice, users, k1, k2), full, hsm.Filter{}, false)
	if d.Rows[0].Mark != "+" || d.Rows[1].Mark != "!" || !strings.Contains(d.Rows[1].Detail, "target cluster is full (9 of 10 keys)") {
		t.Errorf("capacity: %+v", d.Rows)
	}
}

func TestCheckClones(t *testing.T) {
	a := hsm.ClusterInfo{ID: "cluster-a", Lineage: "lineage-1"}
	b := hsm.ClusterInfo{ID: "cluster-b", Lineage: "lineage-1"}
	c := hsm.ClusterInfo{ID: "cluster-c", Lineage: "lineage-2"}
	if err := clonediff.CheckClones(a, b, "us", "eu"); err != nil {
		t.Errorf("clones refused: %v", err)
	}
	if err := clonediff.CheckClones(a, c, "us", "other"); err == nil || !strings.Contains(err.Error(), "keymig hsm backup create --cluster us") {
		t.Errorf("not clones: %v", err)
	}
	if err := clonediff.CheckClones(a, a, "us", "us2"); err == nil || !strings.Contains(err.Error(), "same cluster") {
		t.Errorf("same cluster: %v", err)
	}
}
