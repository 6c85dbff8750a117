package plan

import (
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/clonediff"
)

// AutoSessionKEKThreshold is how many transfers make auto choose
// session-kek: from here on, one RSA operation per run beats one per key.
const AutoSessionKEKThreshold = 20

// Identity is how a key is recognised on the target without its handle:
// by id, class and KCV (the halves of a key pair share id and KCV), or, for
// a key without an id, by label, class, type and KCV. A migration looks for
// it before unwrapping again after a crash.
func Identity(id hsm.Bytes, label string, class hsm.Class, typ hsm.KeyType, kcv hsm.Bytes) string {
	if len(id) > 0 {
		return "id:" + hex.EncodeToString(id) + "/" + string(class) + "/kcv:" + hex.EncodeToString(kcv)
	}
	return fmt.Sprintf("label:%q/%s/%s/kcv:%x", label, class, typ, []byte(kcv))
}

// Identity is the item's identity on the target.
func (it Item) Identity() string { return Identity(it.ID, it.Label, it.Class, it.Type, it.KCV) }

func keyIdentity(k hsm.KeyInfo) string { return Identity(k.ID, k.Label, k.Class, k.Type, k.KCV) }

// newMasterKey is how the new master of a rotate item is recognised on
// the target: the old key's label, id, class and type. Its check value is
// not known in advance, since its key material is new.
func newMasterKey(label string, id hsm.Bytes, class hsm.Class, typ hsm.KeyType) string {
	return fmt.Sprintf("%q/%x/%s/%s", label, []byte(id), class, typ)
}

// IsNewMaster reports whether k, owned by owner, is the new master a
// rotate item makes on the target: same label, id, class and type as the
// old key, owned by the target user, and another check value.
func (it Item) IsNewMaster(k hsm.KeyInfo, owner string) bool {
	return it.Action == Rotate && k.Owner == owner && !slices.Equal(k.KCV, it.KCV) &&
		newMasterKey(k.Label, k.ID, k.Class, k.Type) == newMasterKey(it.Label, it.ID, it.Class, it.Type)
}

// TargetDigest is the target inventory digest: every target key except
// those that are a planned key (same identity, or the new master of a
// rotate item), so that the keys a run makes do not make its own plan
// stale.
func TargetDigest(keys []hsm.KeyInfo, items []Item) string {
	planned := make(map[string]bool, len(items))
	masters := map[string]bool{}
	for _, it := range items {
		planned[it.Identity()] = true
		if it.Action == Rotate {
			masters[newMasterKey(it.Label, it.ID, it.Class, it.Type)] = true
		}
	}
	var rest []hsm.KeyInfo
	for _, k := range keys {
		if !planned[keyIdentity(k)] && !masters[newMasterKey(k.Label, k.ID, k.Class, k.Type)] {
			rest = append(rest, k)
		}
	}
	return InventoryDigest(rest)
}

// Build classifies every source key opts selects. It is pure: inventories
// in, plan out.
func Build(src, dst hsm.Inventory, opts Options, now time.Time) (*Plan, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	opts = opts.withDefaults()
	filter, _ := hsm.ParseFilter(opts.Filter)
	dataKeys, err := dataKeysByLabel(opts.DataKeys)
	if err != nil {
		return nil, err
	}
	// Clones exchange masked objects; a backend without them (a PKCS#11
	// token) is never one end of a clone pair, whatever it says.
	clones := src.Info.Lineage != "" && src.Info.Lineage == dst.Info.Lineage && src.Can.Masked && dst.Can.Masked
	var cmp *clonediff.Comparer
	if clones {
		cmp = clonediff.NewComparer(src, dst)
	}
	if src.Info.ID != "" && src.Info.ID == dst.Info.ID {
		return nil, fmt.Errorf("source and target are the same cluster (%s): nothing can move", src.Info.ID)
	}

	p := &Plan{
		Format:  FormatVersion,
		Created: now.UTC().Truncate(time.Second),
		Source:  side(src),
		Target:  side(dst),
		Options: opts,
	}

	users := map[string]bool{}
	for _, u := range dst.Users {
		users[u] = true
	}
	byIdentity := map[string]hsm.KeyInfo{}
	byOwnerID := map[string]hsm.KeyInfo{}
	for _, k := range dst.Keys {
		if strings.HasPrefix(k.Label, TransportLabelPrefix) {
			continue
		}
		byIdentity[keyIdentity(k)] = k
		if len(k.ID) > 0 {
			byOwnerID[k.Owner+"/"+string(k.Class)+"/"+hex.EncodeToString(k.ID)] = k
		}
	}
	srcIdentities := map[string]int{}
	var selected []hsm.KeyInfo
	for _, k := range src.Keys {
		if strings.HasPrefix(k.Label, TransportLabelPrefix) || !filter.Match(k) {
			continue
		}
		selected = append(selected, k)
		srcIdentities[keyIdentity(k)]++
	}
	sort.Slice(selected, func(i, j int) bool { return selected[i].Ref < selected[j].Ref })
	if err := checkDataKeyLabels(dataKeys, selected, clones); err != nil {
		return nil, err
	}

	free := dst.Info.Policy.KeyCapacity - dst.Info.Keys
	for _, k := range selected {
		it := Item{
			Ref: k.Ref, Label: k.Label, ID: k.ID, Class: k.Class, Type: k.Type, Bits: k.Bits,
			Curve: k.Curve, Attrs: k.Attrs, KCV: k.KCV, Owner: k.Owner, Shares: sortedCopy(k.SharedWith),
		}
		block := func(code, format string, args ...any) {
			it.Action, it.Method, it.ReasonCode, it.Reason = Blocked, "", code, fmt.Sprintf(format, args...)
		}
		switch {
		case clones:
			// Between clones, plan and synckey judge a key by the same rules.
			switch r := cmp.Key(k); r.Mark {
			case clonediff.MarkSame:
				it.Action, it.TargetRef = Skip, k.Ref
				it.Reason = "already on the target clone: same handle, check value, attributes and shares"
			case clonediff.MarkSource:
				it.Action, it.Method = Sync, MethodMasked
			default:
				block(r.Reason, "%s", r.Detail)
			}
		default:
			if t, ok := byIdentity[keyIdentity(k)]; ok {
				it.Action, it.TargetRef = Skip, t.Ref
				it.Reason = fmt.Sprintf("already on the target as %s with the same id and KCV", t.Ref)
			} else {
				it.Action = Transfer
			}
		}
		if it.Action == Skip || it.Action == Blocked {
			p.Items = append(p.Items, it)
			continue
		}
		// Rules that block a key whichever way it would move.
		switch {
		case !k.Attrs.Token:
			block(ReasonSessionKey, "a session key: it lives only in the session that made it; make a token copy to migrate it")
		case srcIdentities[keyIdentity(k)] > 1:
			block(ReasonNoID, "another source key has the same %s; give each key a distinct id (attr.id) so a resumed run can tell them apart", identityWords(k))
		case len(k.KCV) == 0 && k.Class != hsm.ClassPublic:
			block(ReasonNoKCV, "its check value cannot be known: %s keeps none for it, the key may not encrypt and a round trip inside it failed, so its arrival could not be verified; let it encrypt (CKA_ENCRYPT) or give it a CKA_CHECK_VALUE, then re-plan", src.Name)
		case dst.Info.Policy.FIPS && !fipsAllowed(k):
			block(ReasonNotFIPS, "%s is not allowed on the FIPS-mode target; replace it with an RSA 2048–4096 or EC P-256/P-384 key", sizeWords(k))
		}
		if it.Action == Blocked {
			p.Items = append(p.Items, it)
			continue
		}
		if it.Action != Sync {
			switch {
			case k.Owner != src.User.Name && k.Class != hsm.ClassPublic:
				block(ReasonNotOwner, "owned by %s, shared with %s: only the owner can wrap it; plan again logged in as %s", k.Owner, src.User.Name, k.Owner)
			case !k.Attrs.Extractable && k.Class != hsm.ClassPublic:
				block(ReasonNotExtractable, "not extractable: it cannot leave its HSM; %s", opts.advise(ReasonNotExtractable, it,
					"give its data-key file when planning, to have migrate re-encrypt its data keys under a new key on the target, or restore a backup into a clone and sync it"))
			case k.Attrs.WrapWithTrusted:
				block(ReasonWrapWithTrusted, "wrap-with-trusted: only a trusted key may wrap it and keymig's transport key is not trusted; migrate it by a clone and sync")
			case len(k.ID) > 0 && byOwnerID[dst.User.Name+"/"+string(k.Class)+"/"+hex.EncodeToString(k.ID)].Ref != 0:
				t := byOwnerID[dst.User.Name+"/"+string(k.Class)+"/"+hex.EncodeToString(k.ID)]
				block(ReasonConflict, "id %s is already used on the target by %s with another KCV (%s there, %s here); keymig never overwrites a key", k.ID, t.Ref, t.KCV, k.KCV)
			case dst.Can.Users:
				if missing := missingUsers(k.SharedWith, users); len(missing) > 0 {
					block(ReasonUserMissing, "shared with %s, who does not exist on the target; create the user there (keymig hsm user create) and re-plan", strings.Join(missing, ", "))
				}
			}
			if dk, ok := dataKeys[k.Label]; ok {
				if err := classifyRotate(&it, k, dk, dst, users); err != nil {
					return nil, err
				}
			}
		}
		if it.Action != Blocked && (it.Action != Rotate || it.TargetRef == 0) {
			if free <= 0 {
				block(ReasonCapacity, "the target cluster is full (%d of %d keys); delete keys there or raise its capacity, then re-plan", dst.Info.Keys, dst.Info.Policy.KeyCapacity)
			} else {
				free--
			}
		}
		p.Items = append(p.Items, it)
	}

	if !dst.Can.Share {
		for i := range p.Items {
			if it := &p.Items[i]; len(it.Shares) > 0 && (it.Action == Transfer || it.Action == Rotate) {
				it.NotPreserved = fmt.Sprintf("shared with %s on the source; shares are not carried over: the target %s cannot share keys", strings.Join(it.Shares, ", "), dst.Name)
				it.Shares = nil
			}
		}
	}
	kcvFrom := map[hsm.KeyRef]string{}
	for _, k := range selected {
		if k.KCVFrom != "" {
			kcvFrom[k.Ref] = k.KCVFrom
		}
	}
	if p.Transport, err = chooseTransport(p.Items, opts, src, dst); err != nil {
		return nil, err
	}
	hashBytes := hashSizes[p.Transport.Hash]
	oaepFits := func(k hsm.KeyInfo) bool {
		return k.Class == hsm.ClassSecret && k.Bits/8 <= opts.TransportBits/8-2*hashBytes-2
	}
	for i := range p.Items {
		it := &p.Items[i]
		if it.Action != Transfer {
			continue
		}
		switch {
		case it.Class == hsm.ClassPublic:
			it.Method = MethodPublic
		case p.Transport.Method == MethodRSAOAEP && !oaepFits(hsm.KeyInfo{Class: it.Class, Bits: it.Bits}):
			it.Method = MethodRSAAES
			it.Reason = fmt.Sprintf("does not fit in one RSA-OAEP block of a %d-bit transport key with %s; sent by rsa-aes", opts.TransportBits, p.Transport.Hash)
		default:
			it.Method = p.Transport.Method
		}
		if src.Keys != nil && it.Reason == "" {
			if k, ok := kcvFrom[it.Ref]; ok && k == hsm.KCVRoundTrip {
				it.Reason = fmt.Sprintf("%s keeps no check value for it and it may not encrypt: its KCV was found by a wrap/unwrap round trip inside the source, and its arrival is verified against that", src.Name)
			}
		}
	}
	p.Source.Inventory = InventoryDigest(selected)
	p.Target.Inventory = TargetDigest(dst.Keys, p.Items)
	return p, p.Seal()
}

// dataKeysByLabel indexes the --datakeys files by master label.
func dataKeysByLabel(dks []DataKeys) (map[string]DataKeys, error) {
	out := make(map[string]DataKeys, len(dks))
	for _, dk := range dks {
		if dk.Label == "" || dk.In == "" {
			return nil, &OptionError{"datakeys", dk.Label + "=" + dk.In, "want LABEL=FILE, the master key's label and its data-key file"}
		}
		if prev, ok := out[dk.Label]; ok {
			return nil, &OptionError{"datakeys", dk.Label + "=" + dk.In, fmt.Sprintf("label %q is named twice (%s and %s): give one data-key file per master key", dk.Label, prev.In, dk.In)}
		}
		out[dk.Label] = dk
	}
	return out, nil
}

// checkDataKeyLabels makes sure each --datakeys label names exactly one
// selected source key, of the kind a data-key file can belong to.
func checkDataKeyLabels(dataKeys map[string]DataKeys, selected []hsm.KeyInfo, clones bool) error {
	if len(dataKeys) == 0 {
		return nil
	}
	if clones {
		return &OptionError{"datakeys", "", "the clusters are clones, so every key is copied as it is, non-extractable ones included, and its data keys stay valid; give no data-key files"}
	}
	byLabel := map[string][]hsm.KeyInfo{}
	for _, k := range selected {
		if _, ok := dataKeys[k.Label]; ok {
			byLabel[k.Label] = append(byLabel[k.Label], k)
		}
	}
	for _, label := range sortedLabels(dataKeys) {
		switch ks := byLabel[label]; len(ks) {
		case 0:
			return &OptionError{"datakeys", label + "=" + dataKeys[label].In, fmt.Sprintf("no selected source key is labelled %q; check the label (keymig hsm key list) and the filter", label)}
		case 1:
			if k := ks[0]; k.Class != hsm.ClassSecret || k.Type != hsm.TypeAES {
				return &OptionError{"datakeys", label + "=" + dataKeys[label].In, fmt.Sprintf("key %s labelled %q is an %s %s key; a master key of data keys is an AES secret key", k.Ref, label, k.Type, k.Class)}
			}
		default:
			refs := make([]string, len(ks))
			for i, k := range ks {
				refs[i] = k.Ref.String()
			}
			return &OptionError{"datakeys", label + "=" + dataKeys[label].In, fmt.Sprintf("%d selected source keys are labelled %q (%s); narrow the filter to the master key of these data keys", len(ks), label, strings.Join(refs, ", "))}
		}
	}
	return nil
}

func sortedLabels(m map[string]DataKeys) []string {
	out := make([]string, 0, len(m))
	for l := range m {
		out = append(out, l)
	}
	sort.Strings(out)
	return out
}

// classifyRotate decides a key given data keys: rotated if it cannot
// leave its HSM, blocked if its data keys cannot be rotated as they are.
// A key that would transfer is an error: its data keys stay valid as they
// are, and rotating them anyway is a separate decision (keymig rotate).
func classifyRotate(it *Item, k hsm.KeyInfo, dk DataKeys, dst hsm.Inventory, users map[string]bool) error {
	if it.Action == Transfer {
		return &OptionError{"datakeys", dk.Label + "=" + dk.In, fmt.Sprintf("key %s is transferred with its key material, so its data keys stay valid as they are; give no data-key file for it (or rotate them on their own with keymig rotate)", k.Ref)}
	}
	switch it.ReasonCode {
	case ReasonNotExtractable, ReasonWrapWithTrusted, ReasonNotOwner:
	default:
		return nil // blocked for a reason a new master would not cure
	}
	switch {
	case dk.Table:
		dk.Out = dk.In
	case dk.Out == "":
		dk.Out = dk.In + ".rotated"
	}
	why := map[string]string{
		ReasonNotExtractable:  "not extractable",
		ReasonWrapWithTrusted: "wrap-with-trusted",
		ReasonNotOwner:        "owned by " + k.Owner + ", so the source user cannot wrap it",
	}[it.ReasonCode]
	it.Action, it.Method, it.ReasonCode, it.TargetRef, it.Rotation = Rotate, "", "", 0, &dk
	it.Reason = fmt.Sprintf("cannot leave its HSM (%s): a new key with its label, id and attributes is made on the target and its %d data keys are re-encrypted under it, %s", why, dk.Records, dk.Route())
	block := func(format string, args ...any) {
		it.Action, it.ReasonCode, it.Reason = Blocked, ReasonDataKeys, fmt.Sprintf(format, args...)
	}
	switch {
	case !k.Attrs.Unwrap:
		block("its data keys cannot be unwrapped: the key has unwrap=false; its owner %s can set unwrap=true if it is modifiable, then re-plan", k.Owner)
	case dk.Bad > 0:
		if dk.Table {
			block("%s has %d row(s) rotate would reject (%s); fix them or narrow the address's filter, then re-plan", dk.In, dk.Bad, dk.Problem)
		} else {
			block("%s has %d bad line(s) (first: %s); fix or remove them, then re-plan", dk.In, dk.Bad, dk.Problem)
		}
	case dk.Records == 0:
		what := "the file"
		if dk.Table {
			what = "the table and the address's filter"
		}
		block("%s holds no data keys; check %s, or give none and the key stays where it is", dk.In, what)
	case dst.Can.Users:
		if missing := missingUsers(k.SharedWith, users); len(missing) > 0 {
			block("shared with %s, who does not exist on the target; create the user there (keymig hsm user create) and re-plan", strings.Join(missing, ", "))
		}
	}
	if it.Action != Rotate {
		return nil
	}
	// A new master made by an earlier run is taken up; any other key
	// holding the id is a conflict.
	for _, t := range dst.Keys {
		switch {
		case it.IsNewMaster(t, dst.User.Name):
			it.TargetRef = t.Ref
		case len(k.ID) > 0 && t.Owner == dst.User.Name && t.Class == k.Class && slices.Equal(t.ID, k.ID):
			block("id %s is already used on the target by %s (label %q); keymig never overwrites a key", k.ID, t.Ref, t.Label)
			return nil
		}
	}
	return nil
}

// chooseTransport picks the run's transport among those both sides offer
// (hsm.Inventory.Mechanisms; a backend that lists none offers all), and
// says why. With nothing to wrap it picks nothing that needs a mechanism;
// with no transport both sides offer it is an error naming what is missing.
func chooseTransport(items []Item, opts Options, src, dst hsm.Inventory) (Transport, error) {
	t := Transport{Hash: opts.Hash, Bits: opts.TransportBits}
	n := 0
	for _, it := range items {
		if it.Action == Transfer && it.Class != hsm.ClassPublic {
			n++
		}
	}
	var methods []Method
	var why string
	switch opts.Transport {
	case "auto":
		if n >= AutoSessionKEKThreshold {
			methods = []Method{MethodSessionKEK, MethodRSAAES}
			why = fmt.Sprintf("auto: %d keys to transfer (≥ %d), so ", n, AutoSessionKEKThreshold)
		} else {
			methods = []Method{MethodRSAAES, MethodSessionKEK}
			why = fmt.Sprintf("auto: %d keys to transfer (< %d), so ", n, AutoSessionKEKThreshold)
		}
	default:
		methods = []Method{Method(opts.Transport)}
		why = "chosen by the plan's transport option: "
	}
	if n == 0 {
		t.Method, t.Why = methods[0], why+methodWords[methods[0]]
		if t.Hash == "" {
			t.Hash = "sha256"
		}
		return t, nil
	}
	hashes := []string{opts.Hash}
	if opts.Hash == "" {
		hashes = []string{"sha256", "sha384", "sha512", "sha224", "sha1"}
	}
	var missing []string
	for i, m := range methods {
		var lacks []string
		for _, h := range hashes {
			if lacks = transportLacks(m, h, src, dst); len(lacks) == 0 {
				t.Method, t.Hash, t.Why = m, h, why+methodWords[m]
				if i > 0 {
					t.Why = fmt.Sprintf("auto: %s is not possible (%s), so %s", methods[0], missing[0], methodWords[m])
				}
				if h != hashes[0] {
					t.Why += fmt.Sprintf("; OAEP hash %s, since %s", h, strings.Join(transportLacks(m, hashes[0], src, dst), " and "))
				}
				return t, nil
			}
		}
		if len(hashes) > 1 {
			lacks = transportLacks(m, "", src, dst)
			if len(lacks) == 0 {
				lacks = []string{"no OAEP hash is taken by both sides"}
			}
		}
		missing = append(missing, strings.Join(lacks, " and "))
	}
	var b strings.Builder
	for i, m := range methods {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s: %s", m, missing[i])
	}
	return t, fmt.Errorf("no transport that both %s and %s offer can move the %d keys (%s); nothing was planned", src.Name, dst.Name, n, b.String())
}

// methodWords say how each method moves keys.
var methodWords = map[Method]string{
	MethodSessionKEK: "one RSA-OAEP operation moves an AES-256 session key and each key is wrapped with AES-KWP under it",
	MethodRSAAES:     "each is wrapped by rsa-aes (CKM_RSA_AES_KEY_WRAP), which carries any key size",
	MethodRSAOAEP:    "each is wrapped by RSA-OAEP under the transport key",
}

// nativeNames are the PKCS#11 names of the mechanisms, for messages.
var nativeNames = map[hsm.Mechanism]string{
	hsm.MechRSAOAEP: "CKM_RSA_PKCS_OAEP", hsm.MechRSAAES: "CKM_RSA_AES_KEY_WRAP",
	hsm.MechAESKWP: "CKM_AES_KEY_WRAP_PAD", hsm.MechAESKW: "CKM_AES_KEY_WRAP",
}

// transportLacks lists what method m with OAEP hash h ("" for any) needs
// that a side does not offer, in words naming the side and the mechanism.
func transportLacks(m Method, h string, src, dst hsm.Inventory) []string {
	type need struct {
		inv  hsm.Inventory
		side string
		mech hsm.Mechanism
		wrap bool
		hash bool
	}
	var needs []need
	switch m {
	case MethodSessionKEK:
		needs = []need{{src, "source", hsm.MechRSAOAEP, true, true}, {src, "source", hsm.MechAESKWP, true, false},
			{dst, "target", hsm.MechRSAOAEP, false, true}, {dst, "target", hsm.MechAESKWP, false, false}}
	case MethodRSAAES:
		needs = []need{{src, "source", hsm.MechRSAAES, true, true}, {dst, "target", hsm.MechRSAAES, false, true}}
	case MethodRSAOAEP:
		needs = []need{{src, "source", hsm.MechRSAOAEP, true, true}, {dst, "target", hsm.MechRSAOAEP, false, true}}
	}
	var out []string
	for _, n := range needs {
		if n.inv.Mechanisms == nil {
			continue
		}
		op := "unwrap"
		if n.wrap {
			op = "wrap"
		}
		var found *hsm.MechanismInfo
		for i, mi := range n.inv.Mechanisms {
			if mi.Mechanism == n.mech && (n.wrap && mi.Wrap || !n.wrap && mi.Unwrap) {
				found = &n.inv.Mechanisms[i]
			}
		}
		switch {
		case found == nil:
			out = append(out, fmt.Sprintf("the %s %s does not offer %s (%s) to %s", n.side, n.inv.Name, nativeNames[n.mech], n.mech, op))
		case n.hash && h != "" && !found.SupportsHash(h):
			out = append(out, fmt.Sprintf("the %s %s takes %s only with %s, not %s", n.side, n.inv.Name, nativeNames[n.mech], strings.Join(found.Hashes, ", "), h))
		}
	}
	return out
}

func side(inv hsm.Inventory) Cluster {
	return Cluster{
		Dir: inv.Name, ID: inv.Info.ID, Region: inv.Info.Region, Lineage: inv.Info.Lineage,
		User: inv.User.Name, FIPS: inv.Info.Policy.FIPS, Capacity: inv.Info.Policy.KeyCapacity, Keys: inv.Info.Keys,
	}
}

func fipsAllowed(k hsm.KeyInfo) bool {
	switch k.Type {
	case hsm.TypeRSA:
		return k.Bits >= 2048 && k.Bits <= 4096
	case hsm.TypeEC:
		return k.Curve == "P-256" || k.Curve == "P-384"
	case hsm.TypeAES:
		return k.Bits == 128 || k.Bits == 192 || k.Bits == 256
	}
	return false
}

func sizeWords(k hsm.KeyInfo) string {
	if k.Type == hsm.TypeEC {
		return "EC curve " + k.Curve
	}
	return fmt.Sprintf("%s-%d", strings.ToUpper(string(k.Type)), k.Bits)
}

func identityWords(k hsm.KeyInfo) string {
	if len(k.ID) > 0 {
		return fmt.Sprintf("id %s and KCV %s", k.ID, k.KCV)
	}
	return fmt.Sprintf("label %q and KCV %s (and no id)", k.Label, k.KCV)
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

func sortedCopy(s []string) []string {
	out := append([]string{}, s...)
	sort.Strings(out)
	return out
}
