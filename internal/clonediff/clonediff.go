// Package clonediff compares the inventories of two clones of one cluster
// key by key, rclone check style: the same on both (=), on the source only
// (+), on the target only (-), on both but different (*), or not
// synchronisable and why (!). synckey copies by it and plan classifies
// clone keys by it, so both judge a key by the same rules. It reads
// inventories only; it calls no HSM.
package clonediff

import (
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/keymig/keymig/hsm"
)

// The marks of a row, as rclone check prints them.
const (
	MarkSame   = "="
	MarkSource = "+"
	MarkTarget = "-"
	MarkDiffer = "*"
	MarkError  = "!"
)

// Reason codes of ! and * rows; the same codes as plan's blocked keys
// where the cause is the same.
const (
	ReasonUnsynced    = "not-synchronised"
	ReasonUserMissing = "user-missing"
	ReasonNotOwner    = "not-owner"
	ReasonSessionKey  = "session-key"
	ReasonCapacity    = "target-capacity"
	ReasonConflict    = "id-conflict"
	ReasonDiffers     = "differs"
	ReasonOtherKey    = "other-key"
)

// Row is one key of a diff.
type Row struct {
	Mark   string     `json:"mark"`
	Ref    hsm.KeyRef `json:"key-reference"`
	Label  string     `json:"label"`
	Class  hsm.Class  `json:"class"`
	Reason string     `json:"reason,omitempty"` // a stable code for ! and * rows
	Detail string     `json:"detail"`
}

// CheckClones refuses two clusters that are not clones of each other (a
// different lineage: their masking keys differ), or one cluster twice.
func CheckClones(src, dst hsm.ClusterInfo, srcDir, dstDir string) error {
	if src.ID != "" && src.ID == dst.ID {
		return fmt.Errorf("source %s and target %s are the same cluster (%s): name a clone as the target", srcDir, dstDir, src.ID)
	}
	if src.Lineage == "" || src.Lineage != dst.Lineage {
		return fmt.Errorf("source cluster %s (%s, lineage %s) and target cluster %s (%s, lineage %s) are not clones of each other, so no masked object can move between them; "+
			"make the target a clone of the source: keymig hsm backup create --cluster %s --out src.backup, then keymig hsm restore --backup src.backup --dir NEWDIR --region REGION "+
			"(to move keys between unrelated clusters use keymig plan and keymig migrate)",
			srcDir, src.ID, orNone(src.Lineage), dstDir, dst.ID, orNone(dst.Lineage), srcDir)
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// Diff is the comparison of two clones.
type Diff struct {
	Rows  []Row         // every key of either side that the filter selects, by handle
	Copy  []hsm.KeyInfo // the + keys, by handle
	Prune []hsm.KeyInfo // the - keys, by handle
}

// Counts is the number of rows of each mark.
func (d *Diff) Counts() map[string]int {
	c := map[string]int{MarkSame: 0, MarkSource: 0, MarkTarget: 0, MarkDiffer: 0, MarkError: 0}
	for _, r := range d.Rows {
		c[r.Mark]++
	}
	return c
}

// Comparer classifies source keys against one target inventory. Build it
// once with NewComparer; Key is then a map lookup per key, so a plan can
// classify its clone keys with the same rules as synckey.
type Comparer struct {
	src, dst hsm.Inventory
	byRef    map[hsm.KeyRef]hsm.KeyInfo
	byID     map[string]hsm.KeyRef // owner/class/id → handle on the target
	users    map[string]bool
	free     int
}

// NewComparer indexes the target side.
func NewComparer(src, dst hsm.Inventory) *Comparer {
	c := &Comparer{
		src: src, dst: dst,
		byRef: make(map[hsm.KeyRef]hsm.KeyInfo, len(dst.Keys)),
		byID:  make(map[string]hsm.KeyRef, len(dst.Keys)),
		users: make(map[string]bool, len(dst.Users)),
		free:  dst.Info.Policy.KeyCapacity - dst.Info.Keys,
	}
	for _, k := range dst.Keys {
		c.byRef[k.Ref] = k
		if len(k.ID) > 0 {
			c.byID[idKey(k)] = k.Ref
		}
	}
	for _, u := range dst.Users {
		c.users[u] = true
	}
	if dst.Info.Policy.KeyCapacity <= 0 {
		c.free = int(^uint(0) >> 1)
	}
	return c
}

func idKey(k hsm.KeyInfo) string {
	return k.Owner + "/" + string(k.Class) + "/" + hex.EncodeToString(k.ID)
}

// Target returns the target key with the handle ref, if there is one.
func (c *Comparer) Target(ref hsm.KeyRef) (hsm.KeyInfo, bool) {
	k, ok := c.byRef[ref]
	return k, ok
}

// Key classifies one source key: =, +, * or !. It does not count target
// capacity; Compare does, since that depends on every other key.
func (c *Comparer) Key(k hsm.KeyInfo) Row {
	r := Row{Ref: k.Ref, Label: k.Label, Class: k.Class}
	if t, ok := c.byRef[k.Ref]; ok {
		if t.Class != k.Class || !slices.Equal(t.KCV, k.KCV) {
			r.Mark, r.Reason = MarkDiffer, ReasonOtherKey
			r.Detail = fmt.Sprintf("handle %s holds another key on the target (%s, check value %s there; %s, %s on the source); it is never overwritten: delete the copy that is wrong, then sync again",
				k.Ref, t.Class, t.KCV, k.Class, k.KCV)
			return r
		}
		if d := differences(k, t); len(d) > 0 {
			r.Mark, r.Reason = MarkDiffer, ReasonDiffers
			r.Detail = "inconsistent: " + strings.Join(d, "; ") + "; never overwritten: change one side (keymig hsm key set-attribute, share, unshare) to match the other"
			if !k.Coverage.Full() {
				r.Detail += fmt.Sprintf(" (the source key is not synchronised across its cluster either: %s)", k.Coverage)
			}
			return r
		}
		r.Mark, r.Detail = MarkSame, "check value "+k.KCV.String()
		return r
	}
	block := func(code, format string, args ...any) Row {
		r.Mark, r.Reason, r.Detail = MarkError, code, fmt.Sprintf(format, args...)
		return r
	}
	switch {
	case !k.Attrs.Token:
		return block(ReasonSessionKey, "a session key: it lives only in the session that made it and is never synchronised")
	case len(k.Coverage.Missing) > 0 || len(k.Coverage.Inconsistent) > 0:
		return block(ReasonUnsynced, "not synchronised across the source cluster (%s); run keymig hsm sync --cluster %s first", k.Coverage, c.src.Name)
	}
	if missing := missingUsers(append([]string{k.Owner}, k.SharedWith...), c.users); len(missing) > 0 {
		what := "user"
		if len(missing) > 1 {
			what = "users"
		}
		return block(ReasonUserMissing, "%s %s does not exist on the target; create it there (keymig hsm user create --cluster %s) and sync again", what, strings.Join(missing, ", "), c.dst.Name)
	}
	if u := c.src.User; u.Role != hsm.RoleCryptoOfficer && u.Name != k.Owner {
		return block(ReasonNotOwner, "owned by %s: only %s or a crypto officer may export it masked from the source; log in to the source as one of them", k.Owner, k.Owner)
	}
	if u := c.dst.User; u.Role != hsm.RoleCryptoOfficer && u.Name != k.Owner {
		return block(ReasonNotOwner, "owned by %s: only %s or a crypto officer may insert it into the target; log in to the target as one of them", k.Owner, k.Owner)
	}
	if len(k.ID) > 0 {
		if other, ok := c.byID[idKey(k)]; ok {
			return block(ReasonConflict, "%s already has a %s with id %s on the target (key %s), so this key cannot be inserted there; delete or re-id one of them", k.Owner, k.Class, k.ID, other)
		}
	}
	r.Mark, r.Detail = MarkSource, "on the source only: to copy"
	return r
}

// differences lists what differs between two copies of one key, saying on
// which side, as CloudHSM's "inconsistent" does.
func differences(s, t hsm.KeyInfo) []string {
	var d []string
	for _, a := range s.Attrs.Diff(t.Attrs) {
		sv, _ := s.Attrs.Get(a)
		tv, _ := t.Attrs.Get(a)
		d = append(d, fmt.Sprintf("%s is %t on the source, %t on the target", a, sv, tv))
	}
	if s.Label != t.Label {
		d = append(d, fmt.Sprintf("label %q on the source, %q on the target", s.Label, t.Label))
	}
	if !slices.Equal(s.ID, t.ID) {
		d = append(d, fmt.Sprintf("id %s on the source, %s on the target", orNone(s.ID.String()), orNone(t.ID.String())))
	}
	if s.Owner != t.Owner {
		d = append(d, fmt.Sprintf("owner %s on the source, %s on the target", s.Owner, t.Owner))
	}
	srcOnly, dstOnly := setDiff(s.SharedWith, t.SharedWith), setDiff(t.SharedWith, s.SharedWith)
	if len(srcOnly) > 0 {
		d = append(d, "shared with "+strings.Join(srcOnly, ", ")+" on the source only")
	}
	if len(dstOnly) > 0 {
		d = append(d, "shared with "+strings.Join(dstOnly, ", ")+" on the target only")
	}
	return d
}

// setDiff is the sorted elements of a not in b.
func setDiff(a, b []string) []string {
	var out []string
	for _, x := range a {
		if !slices.Contains(b, x) && !slices.Contains(out, x) {
			out = append(out, x)
		}
	}
	sort.Strings(out)
	return out
}

func missingUsers(names []string, have map[string]bool) []string {
	var out []string
	for _, n := range names {
		if !have[n] && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// Compare diffs two clones' inventories, keeping the keys f selects on
// either side. prune only changes the wording of - rows.
func Compare(src, dst hsm.Inventory, f hsm.Filter, prune bool) *Diff {
	c := NewComparer(src, dst)
	d := &Diff{Rows: make([]Row, 0, len(src.Keys))}
	onSource := make(map[hsm.KeyRef]bool, len(src.Keys))
	free := c.free
	for _, k := range src.Keys {
		onSource[k.Ref] = true
		if !f.Match(k) {
			continue
		}
		r := c.Key(k)
		if r.Mark == MarkSource {
			if free <= 0 {
				r.Mark, r.Reason = MarkError, ReasonCapacity
				r.Detail = fmt.Sprintf("the target cluster is full (%d of %d keys); delete keys there or raise its capacity, then sync again", dst.Info.Keys, dst.Info.Policy.KeyCapacity)
			} else {
				free--
				d.Copy = append(d.Copy, k)
			}
		}
		d.Rows = append(d.Rows, r)
	}
	for _, t := range dst.Keys {
		// A key on both sides was classified above (or not selected on the
		// source); session keys are never synchronised.
		if onSource[t.Ref] || !t.Attrs.Token || !f.Match(t) {
			continue
		}
		r := Row{Mark: MarkTarget, Ref: t.Ref, Label: t.Label, Class: t.Class, Detail: "on the target only; kept (delete it with --prune --yes)"}
		if prune {
			r.Detail = "on the target only; --prune deletes it (with --yes)"
			if dst.User.Name != t.Owner {
				r.Detail += fmt.Sprintf(", but only its owner %s may: prune logged in to the target as %s", t.Owner, t.Owner)
			}
		}
		d.Prune = append(d.Prune, t)
		d.Rows = append(d.Rows, r)
	}
	sort.Slice(d.Rows, func(i, j int) bool { return d.Rows[i].Ref < d.Rows[j].Ref })
	sort.Slice(d.Copy, func(i, j int) bool { return d.Copy[i].Ref < d.Copy[j].Ref })
	sort.Slice(d.Prune, func(i, j int) bool { return d.Prune[i].Ref < d.Prune[j].Ref })
	return d
}
