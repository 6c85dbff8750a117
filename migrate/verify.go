package migrate

import (
	"fmt"
	"os"
	"slices"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/rotate"
)

// Row is one line of a verify or dry-run report, in rclone check style.
type Row struct {
	Mark   string     `json:"mark"` // = same, + only on source, - only on target, * differs, ! error
	Ref    hsm.KeyRef `json:"key-reference"`
	Label  string     `json:"label"`
	Target hsm.KeyRef `json:"target-key-reference,omitempty"`
	Detail string     `json:"detail"`
}

// The marks.
const (
	MarkSame   = "="
	MarkSource = "+"
	MarkTarget = "-"
	MarkDiffer = "*"
	MarkError  = "!"
)

// Verify compares the planned keys with the clusters now: each planned key
// (transfer, sync or skip) should be on the target exactly once, with the
// source's check value, on at least need HSMs. Blocked keys are reported
// with their reason. srcKeys and dstKeys are each cluster's listing.
func Verify(p *plan.Plan, srcKeys, dstKeys []hsm.KeyInfo, dstUser string, need int) []Row {
	src := make(map[hsm.KeyRef]hsm.KeyInfo, len(srcKeys))
	for _, k := range srcKeys {
		src[k.Ref] = k
	}
	byIdentity := map[string][]hsm.KeyInfo{}
	byRef := map[hsm.KeyRef]hsm.KeyInfo{}
	byID := map[string][]hsm.KeyInfo{}
	for _, k := range dstKeys {
		byRef[k.Ref] = k
		byIdentity[plan.Identity(k.ID, k.Label, k.Class, k.Type, k.KCV)] = append(byIdentity[plan.Identity(k.ID, k.Label, k.Class, k.Type, k.KCV)], k)
		if len(k.ID) > 0 {
			byID[string(k.ID)] = append(byID[string(k.ID)], k)
		}
	}
	rows := make([]Row, 0, len(p.Items))
	for _, it := range p.Items {
		r := Row{Ref: it.Ref, Label: it.Label}
		if it.Action == plan.Blocked {
			r.Mark, r.Detail = MarkError, "blocked: "+it.Reason
			rows = append(rows, r)
			continue
		}
		if it.Action == plan.Rotate {
			rows = append(rows, verifyRotate(it, dstKeys, dstUser, need))
			continue
		}
		var hits []hsm.KeyInfo
		if it.Method == plan.MethodMasked || (it.Action == plan.Skip && p.Source.Lineage == p.Target.Lineage) {
			if k, ok := byRef[it.Ref]; ok {
				hits = []hsm.KeyInfo{k}
			}
		} else {
			for _, k := range byIdentity[it.Identity()] {
				if k.Owner == dstUser || it.Action == plan.Skip {
					hits = append(hits, k)
				}
			}
		}
		s, onSource := src[it.Ref]
		switch {
		case len(hits) > 1:
			r.Mark, r.Detail = MarkError, fmt.Sprintf("on the target %d times (%s): a key must be there exactly once", len(hits), refs(hits))
		case len(hits) == 1:
			t := hits[0]
			r.Target = t.Ref
			switch {
			case onSource && !slices.Equal(s.KCV, t.KCV):
				r.Mark, r.Detail = MarkDiffer, fmt.Sprintf("check value %s on the source, %s on the target", s.KCV, t.KCV)
			case t.Coverage.Count() < need && len(t.Coverage.HSMs) > 0:
				r.Mark, r.Detail = MarkError, fmt.Sprintf("on %d HSM(s) of the target, fewer than %d (%s)", t.Coverage.Count(), need, t.Coverage)
			case !onSource:
				r.Mark, r.Detail = MarkTarget, "on the target only: the source key is gone"
			default:
				r.Mark, r.Detail = MarkSame, "check value "+t.KCV.String()
			}
		default:
			switch {
			case !onSource:
				r.Mark, r.Detail = MarkError, "on neither cluster"
			case len(it.ID) > 0 && len(byID[string(it.ID)]) > 0:
				r.Mark, r.Detail = MarkDiffer, fmt.Sprintf("id %s on the target holds another key (%s)", it.ID, refs(byID[string(it.ID)]))
			default:
				r.Mark, r.Detail = MarkSource, "on the source only: not migrated yet"
			}
		}
		rows = append(rows, r)
	}
	return rows
}

// verifyRotate checks a rotate item's new master: on the target once,
// owned by the target user, with the old key's label, id and attributes,
// on enough HSMs. Its data-key file is checked by CheckRotated.
func verifyRotate(it plan.Item, dstKeys []hsm.KeyInfo, dstUser string, need int) Row {
	r := Row{Ref: it.Ref, Label: it.Label}
	var hits []hsm.KeyInfo
	for _, k := range dstKeys {
		if it.IsNewMaster(k, dstUser) {
			hits = append(hits, k)
		}
	}
	switch len(hits) {
	case 0:
		r.Mark, r.Detail = MarkSource, "not rotated yet: no new master on the target"
		return r
	case 1:
	default:
		r.Mark, r.Detail = MarkError, fmt.Sprintf("%d candidate new masters on the target (%s): there must be one", len(hits), refs(hits))
		return r
	}
	t := hits[0]
	r.Target = t.Ref
	want := template(it).Attrs
	for a, v := range want {
		if got, _ := t.Attrs.Get(a); got != v {
			r.Mark, r.Detail = MarkDiffer, fmt.Sprintf("the new master %s has %s=%v, the old key %v", t.Ref, a, got, v)
			return r
		}
	}
	if t.Coverage.Count() < need && len(t.Coverage.HSMs) > 0 {
		r.Mark, r.Detail = MarkError, fmt.Sprintf("the new master %s is on %d HSM(s) of the target, fewer than %d (%s)", t.Ref, t.Coverage.Count(), need, t.Coverage)
		return r
	}
	r.Mark, r.Detail = MarkSame, fmt.Sprintf("rotated: new master with check value %s; data keys in %s", t.KCV, it.Rotation.Out)
	return r
}

// CheckRotated checks the rotated data-key file of a rotate item whose new
// master is target: every record of the planned input is in it, in order,
// with only master, alg and ciphertext changed, and names the new master.
// (keymig datakeys verify goes further and compares each data key inside
// the HSMs.)
func CheckRotated(it plan.Item, target hsm.KeyInfo) error {
	dk := it.Rotation
	if _, err := os.Stat(dk.Out); err != nil {
		return fmt.Errorf("the new master %s is made, but %s is missing: run keymig migrate again to finish re-encrypting the data keys", target.Ref, dk.Out)
	}
	if err := rotate.CheckOutput(dk.In, dk.Out, RejectsPath(dk), target, dk.Records); err != nil {
		return fmt.Errorf("%s: %w", dk.Out, err)
	}
	return nil
}

// RejectsPath is where a rotation in a migration writes the data keys it
// sets aside under --datakeys-on-error skip: beside the rotated file, or
// for a table, LABEL.datakeys.rejects in the working directory.
func RejectsPath(dk *plan.DataKeys) string {
	if dk.Table {
		return dk.Label + ".datakeys.rejects"
	}
	return dk.Out + ".rejects"
}

// DryRun says what a migration would do now, from the clusters' listings
// and the journal's states (nil for a run that has not started). It
// changes nothing anywhere.
func DryRun(p *plan.Plan, srcKeys, dstKeys []hsm.KeyInfo, dstUser string, states map[string]string) []Row {
	now := Verify(p, srcKeys, dstKeys, dstUser, 0)
	rows := make([]Row, len(now))
	for i, r := range now {
		it := p.Items[i]
		rows[i] = r
		st := states[it.Key()]
		switch {
		case it.Action == plan.Blocked:
		case it.Action == plan.Skip:
			rows[i].Detail = "would skip: " + it.Reason
		case st == "done":
			rows[i].Detail = "already done by an earlier run"
		case it.Action == plan.Rotate && r.Mark == MarkSame:
			rows[i].Detail = fmt.Sprintf("would take up the new master %s and finish re-encrypting %d data keys %s", r.Target, it.Rotation.Records, it.Rotation.Route())
		case it.Action == plan.Rotate && r.Mark == MarkSource:
			rows[i].Detail = fmt.Sprintf("would make a new master on the target and re-encrypt %d data keys %s", it.Rotation.Records, it.Rotation.Route())
		case r.Mark == MarkSame:
			rows[i].Detail = "would adopt the key already on the target as " + r.Target.String()
		case r.Mark == MarkSource:
			rows[i].Detail = fmt.Sprintf("would %s by %s", it.Action, it.Method)
		}
	}
	return rows
}

func refs(ks []hsm.KeyInfo) string {
	s := ""
	for i, k := range ks {
		if i > 0 {
			s += ", "
		}
		s += k.Ref.String()
	}
	return s
}
