package plan

import (
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
)

func TestBuildDataKeys(t *testing.T) {
	nonExtractable := func(k *hsm.KeyInfo) { k.Attrs.Extractable = false; k.Attrs.Unwrap = true }
	dk := func(label string) DataKeys {
		return DataKeys{Label: label, In: label + ".jsonl", SHA256: "ab", Records: 10}
	}
	src := inv(info("src", "L1"), "alice", hsm.RoleCryptoUser, []string{"alice"},
		aes(1, "a", "111", nonExtractable), // rotate
		aes(2, "b", "222", nonExtractable), // no file: stays blocked
		aes(3, "c", "333", func(k *hsm.KeyInfo) { nonExtractable(k); k.Attrs.Unwrap = false }),
		aes(4, "d", "444", nonExtractable), // its new master is already on the target
		aes(5, "e", "555", nonExtractable), // id taken on the target by another key
		aes(6, "f", "666", nonExtractable), // bad lines in its file
		aes(7, "g", "777", func(k *hsm.KeyInfo) { k.Owner = "bob"; k.SharedWith = []string{"alice"}; k.Attrs.Unwrap = true }),
	)
	dst := inv(info("dst", "L2"), "tina", hsm.RoleCryptoUser, []string{"tina", "alice", "bob"},
		aes(100, "d", "ddd", func(k *hsm.KeyInfo) { k.Owner = "tina" }),
		aes(101, "e", "eee", func(k *hsm.KeyInfo) { k.Owner = "tina"; k.Label = "other" }),
	)
	bad := dk("kf")
	bad.Bad, bad.Problem = 2, "line 3: not JSON"
	// The caller's advice names its own flag (the CLI's --datakeys).
	advice := func(code string, it Item) string {
		if code == ReasonNotExtractable {
			return "give its data keys with --datakeys " + it.Label + "=FILE"
		}
		return ""
	}
	p, err := Build(src, dst, Options{DataKeys: []DataKeys{dk("ka"), dk("kc"), dk("kd"), dk("ke"), bad, dk("kg")}, Advice: advice}, now)
	if err != nil {
		t.Fatal(err)
	}
	want := map[hsm.KeyRef]struct {
		action Action
		code   string
		target hsm.KeyRef
	}{
		1: {Rotate, "", 0},
		2: {Blocked, ReasonNotExtractable, 0},
		3: {Blocked, ReasonDataKeys, 0},
		4: {Rotate, "", 100},
		5: {Blocked, ReasonDataKeys, 0},
		6: {Blocked, ReasonDataKeys, 0},
		7: {Rotate, "", 0}, // not the owner, but a shared user may unwrap with it
	}
	for _, it := range p.Items {
		w := want[it.Ref]
		if it.Action != w.action || it.ReasonCode != w.code || it.TargetRef != w.target {
			t.Errorf("key %s: %s/%s target %s (%s), want %s/%s target %s", it.Ref, it.Action, it.ReasonCode, it.TargetRef, it.Reason, w.action, w.code, w.target)
		}
		if it.Action == Rotate && (it.Rotation == nil || it.Rotation.Out != it.Rotation.In+".rotated") {
			t.Errorf("key %s: rotation %+v, want the file and FILE.rotated", it.Ref, it.Rotation)
		}
	}
	if !strings.Contains(p.Items[1].Reason, "--datakeys kb=FILE") {
		t.Errorf("a non-extractable key without data keys should say how to give them: %q", p.Items[1].Reason)
	}
	if p, _ := Build(src, dst, Options{}, now); !strings.Contains(p.Items[1].Reason, "give its data-key file when planning") {
		t.Errorf("without the caller's advice, plan's own: %q", p.Items[1].Reason)
	}
	if p.Work() != 3 {
		t.Errorf("work %d, want the 3 rotations", p.Work())
	}
	// The new master a run makes does not make its own plan stale.
	made := aes(200, "a", "fff", func(k *hsm.KeyInfo) { k.Owner = "tina" })
	if err := p.CheckFresh(src.Keys, append(dst.Keys, made)); err != nil {
		t.Errorf("a new master made by the run made the plan stale: %v", err)
	}
	if err := p.CheckFresh(src.Keys, append(dst.Keys, aes(201, "z", "fff", nil))); err == nil {
		t.Error("an unplanned key on the target did not make the plan stale")
	}
}

func TestBuildDataKeysRefused(t *testing.T) {
	src := inv(info("src", "L1"), "alice", hsm.RoleCryptoUser, []string{"alice"},
		aes(1, "a", "111", nil), // extractable: transferred
		aes(2, "b", "222", func(k *hsm.KeyInfo) { k.Attrs.Extractable = false }),
		aes(3, "b", "333", func(k *hsm.KeyInfo) { k.Attrs.Extractable = false; k.ID = hsm.Bytes("b2") }),
		aes(4, "d", "444", func(k *hsm.KeyInfo) { k.Class, k.Type, k.Bits = hsm.ClassPrivate, hsm.TypeRSA, 2048 }),
	)
	dst := inv(info("dst", "L2"), "tina", hsm.RoleCryptoUser, []string{"tina", "alice"})
	tests := []struct {
		name string
		dks  []DataKeys
		want string
	}{
		{"extractable", []DataKeys{{Label: "ka", In: "f"}}, "transferred with its key material"},
		{"no such label", []DataKeys{{Label: "nope", In: "f"}}, `no selected source key is labelled "nope"`},
		{"two keys", []DataKeys{{Label: "kb", In: "f"}}, "2 selected source keys are labelled"},
		{"not aes", []DataKeys{{Label: "kd", In: "f"}}, "AES secret key"},
		{"twice", []DataKeys{{Label: "ka", In: "f"}, {Label: "ka", In: "g"}}, "twice"},
		{"no file", []DataKeys{{Label: "ka"}}, "LABEL=FILE"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Build(src, dst, Options{DataKeys: tt.dks}, now)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err %v, want one containing %q", err, tt.want)
			}
		})
	}
	clones := inv(info("dst", "L1"), "tina", hsm.RoleCryptoOfficer, nil)
	if _, err := Build(src, clones, Options{DataKeys: []DataKeys{{Label: "ka", In: "f"}}}, now); err == nil || !strings.Contains(err.Error(), "clones") {
		t.Errorf("clones with --datakeys: %v", err)
	}
}

// TestBuildDataKeyTable: a data-key table is rotated where it is, and its
// rejected rows block the key with the table's words, not a file's.
func TestBuildDataKeyTable(t *testing.T) {
	nonExtractable := func(k *hsm.KeyInfo) { k.Attrs.Extractable = false; k.Attrs.Unwrap = true }
	src := inv(info("src", "L1"), "alice", hsm.RoleCryptoUser, []string{"alice"},
		aes(1, "a", "111", nonExtractable), aes(2, "b", "222", nonExtractable), aes(3, "c", "333", nonExtractable))
	dst := inv(info("dst", "L2"), "alice", hsm.RoleCryptoUser, []string{"alice"})
	addr := func(label string) string { return "postgres://app@db/prod?table=app." + label }
	tables := []DataKeys{
		{Label: "ka", In: addr("ka"), Table: true, Records: 10},
		{Label: "kb", In: addr("kb"), Table: true, Records: 10, Bad: 3, Problem: "3 under master kcv 999"},
		{Label: "kc", In: addr("kc"), Table: true},
	}
	p, err := Build(src, dst, Options{DataKeys: tables}, now)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ref    hsm.KeyRef
		action Action
		reason string
	}{
		{1, Rotate, "re-encrypted under it, in the table " + addr("ka")},
		{2, Blocked, "has 3 row(s) rotate would reject (3 under master kcv 999); fix them or narrow the address's filter"},
		{3, Blocked, "holds no data keys; check the table and the address's filter"},
	} {
		it := p.Items[tc.ref-1]
		if it.Action != tc.action || !strings.Contains(it.Reason, tc.reason) {
			t.Errorf("key %s: %s (%s), want %s with %q", it.Ref, it.Action, it.Reason, tc.action, tc.reason)
		}
	}
	if r := p.Items[0].Rotation; r == nil || r.Out != r.In || r.Route() != "in the table "+addr("ka") {
		t.Errorf("rotation %+v: want the table's own address as its output", r)
	}
}
