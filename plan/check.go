package plan

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/keymig/keymig/hsm"
)

// ErrStale reports a plan made from inventories that have since changed.
var ErrStale = errors.New("plan is stale")

// CheckFresh compares the inventories p was made from with the clusters'
// keys now. Keys a run of p has already made on the target, and keymig's
// own transport keys, do not count as changes. The error names what
// changed and says how to re-plan.
func (p *Plan) CheckFresh(srcKeys, dstKeys []hsm.KeyInfo) error {
	filter, err := hsm.ParseFilter(p.Options.Filter)
	if err != nil {
		return err
	}
	var selected []hsm.KeyInfo
	for _, k := range srcKeys {
		if !strings.HasPrefix(k.Label, TransportLabelPrefix) && filter.Match(k) {
			selected = append(selected, k)
		}
	}
	var problems []string
	if InventoryDigest(selected) != p.Source.Inventory {
		problems = append(problems, "source "+describeSourceChange(p.Items, selected))
	}
	if TargetDigest(dstKeys, p.Items) != p.Target.Inventory {
		problems = append(problems, "target: keys other than the planned ones were added, removed or changed since planning")
	}
	if len(problems) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s; run keymig plan again to see the clusters as they are now", ErrStale, strings.Join(problems, "; "))
}

// describeSourceChange lists, briefly, how the source keys differ from the
// planned items.
func describeSourceChange(items []Item, now []hsm.KeyInfo) string {
	planned := make(map[hsm.KeyRef]Item, len(items))
	for _, it := range items {
		planned[it.Ref] = it
	}
	var added, removed, changed []string
	seen := map[hsm.KeyRef]bool{}
	for _, k := range now {
		seen[k.Ref] = true
		it, ok := planned[k.Ref]
		switch {
		case !ok:
			added = append(added, k.Ref.String())
		case !slices.Equal(it.KCV, k.KCV) || it.Label != k.Label || !slices.Equal(it.ID, k.ID) ||
			it.Attrs != k.Attrs || it.Owner != k.Owner || !slices.Equal(it.Shares, sortedCopy(k.SharedWith)):
			changed = append(changed, k.Ref.String())
		}
	}
	for _, it := range items {
		if !seen[it.Ref] {
			removed = append(removed, it.Ref.String())
		}
	}
	var parts []string
	for _, x := range []struct {
		what string
		refs []string
	}{{"added", added}, {"removed", removed}, {"changed", changed}} {
		if len(x.refs) > 0 {
			parts = append(parts, fmt.Sprintf("%d %s (%s)", len(x.refs), x.what, abbreviate(x.refs, 5)))
		}
	}
	if len(parts) == 0 {
		return "keys changed since planning"
	}
	return "keys since planning: " + strings.Join(parts, ", ")
}

func abbreviate(s []string, n int) string {
	if len(s) <= n {
		return strings.Join(s, " ")
	}
	return strings.Join(s[:n], " ") + fmt.Sprintf(" and %d more", len(s)-n)
}
