package plan

import (
	"encoding/hex"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/keymig/keymig/hsm"
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

// TargetDigest is the target inventory digest: every target key except
// those that are a planned key (same identity), so that the keys a run
// makes do not make its own plan stale.
func TargetDigest(keys []hsm.KeyInfo, items []Item) string {
	planned := make(map[string]bool, len(items))
	for _, it := range items {
		planned[it.Identity()] = true
	}
	var rest []hsm.KeyInfo
	for _, k := range keys {
		if !planned[keyIdentity(k)] {
			rest = append(rest, k)
		}
	}
	return InventoryDigest(rest)
}

// Build classifies every source key opts selects. It is pure: inventories
// in, plan out.
func Build(src, dst Inventory, opts Options, now time.Time) (*Plan, error) {
	filter, err := hsm.ParseFilter(opts.Filter)
	if err != nil {
		return nil, err
	}
	if opts.Hash == "" {
		opts.Hash = "sha256"
	}
	if opts.TransportBits == 0 {
		opts.TransportBits = 3072
	}
	if opts.Transport == "" {
		opts.Transport = "auto"
	}
	switch opts.Transport {
	case "auto", string(MethodRSAAES), string(MethodRSAOAEP), string(MethodSessionKEK):
	default:
		return nil, fmt.Errorf("--transport %q: want auto, rsa-aes, rsa-oaep or session-kek", opts.Transport)
	}
	if opts.TransportBits < 2048 || opts.TransportBits > 4096 || opts.TransportBits%1024 != 0 {
		return nil, fmt.Errorf("--transport-bits %d: want 2048, 3072 or 4096", opts.TransportBits)
	}
	hashBytes, ok := map[string]int{"sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}[opts.Hash]
	if !ok {
		return nil, fmt.Errorf("--hash %q: want sha1, sha224, sha256, sha384 or sha512", opts.Hash)
	}
	clones := src.Info.Lineage != "" && src.Info.Lineage == dst.Info.Lineage
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
	byRef := map[hsm.KeyRef]hsm.KeyInfo{}
	for _, k := range dst.Keys {
		if strings.HasPrefix(k.Label, TransportLabelPrefix) {
			continue
		}
		byIdentity[keyIdentity(k)] = k
		byRef[k.Ref] = k
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

	oaepFits := func(k hsm.KeyInfo) bool {
		return k.Class == hsm.ClassSecret && k.Bits/8 <= opts.TransportBits/8-2*hashBytes-2
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
			it.Action, it.Method = Sync, MethodMasked
			if t, ok := byRef[k.Ref]; ok {
				if slices.Equal(t.KCV, k.KCV) {
					it.Action, it.Method, it.TargetRef = Skip, "", t.Ref
					it.Reason = "already on the target clone with the same handle and KCV"
				} else {
					block(ReasonConflict, "handle %s holds a different key on the target (KCV %s there, %s here); keymig never overwrites a key — delete one side's copy if you are sure which is right", k.Ref, t.KCV, k.KCV)
				}
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
		case dst.Info.Policy.FIPS && !fipsAllowed(k):
			block(ReasonNotFIPS, "%s is not allowed on the FIPS-mode target; replace it with an RSA 2048–4096 or EC P-256/P-384 key", sizeWords(k))
		}
		if it.Action == Blocked {
			p.Items = append(p.Items, it)
			continue
		}
		if it.Action == Sync {
			if c := k.Coverage; len(c.Missing) > 0 || len(c.Inconsistent) > 0 {
				block(ReasonUnsynced, "not synchronised across the source cluster (%s); run keymig hsm sync on the source first", c)
			} else if missing := missingUsers(append([]string{k.Owner}, k.SharedWith...), users); len(missing) > 0 {
				block(ReasonUserMissing, "user %s does not exist on the target; create it there (keymig hsm user create) and re-plan", strings.Join(missing, ", "))
			} else if dst.User.Role != hsm.RoleCryptoOfficer && dst.User.Name != k.Owner {
				block(ReasonNotOwner, "owned by %s: only %s or a crypto officer can insert it on the target; log in to the target as one of them", k.Owner, k.Owner)
			}
		} else {
			switch {
			case k.Owner != src.User.Name && k.Class != hsm.ClassPublic:
				block(ReasonNotOwner, "owned by %s, shared with %s: only the owner can wrap it; plan again logged in as %s", k.Owner, src.User.Name, k.Owner)
			case !k.Attrs.Extractable && k.Class != hsm.ClassPublic:
				block(ReasonNotExtractable, "not extractable: it cannot leave its HSM; rotate its data keys under a new key (keymig rotate), or restore a backup into a clone and sync it")
			case k.Attrs.WrapWithTrusted:
				block(ReasonWrapWithTrusted, "wrap-with-trusted: only a trusted key may wrap it and keymig's transport key is not trusted; migrate it by a clone and sync")
			case len(k.ID) > 0 && byOwnerID[dst.User.Name+"/"+string(k.Class)+"/"+hex.EncodeToString(k.ID)].Ref != 0:
				t := byOwnerID[dst.User.Name+"/"+string(k.Class)+"/"+hex.EncodeToString(k.ID)]
				block(ReasonConflict, "id %s is already used on the target by %s with another KCV (%s there, %s here); keymig never overwrites a key", k.ID, t.Ref, t.KCV, k.KCV)
			default:
				if missing := missingUsers(k.SharedWith, users); len(missing) > 0 {
					block(ReasonUserMissing, "shared with %s, who does not exist on the target; create the user there (keymig hsm user create) and re-plan", strings.Join(missing, ", "))
				}
			}
		}
		if it.Action != Blocked {
			if free <= 0 {
				block(ReasonCapacity, "the target cluster is full (%d of %d keys); delete keys there or raise its capacity, then re-plan", dst.Info.Keys, dst.Info.Policy.KeyCapacity)
			} else {
				free--
			}
		}
		p.Items = append(p.Items, it)
	}

	p.Transport = chooseTransport(p.Items, opts)
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
			it.Reason = fmt.Sprintf("does not fit in one RSA-OAEP block of a %d-bit transport key with %s; sent by rsa-aes", opts.TransportBits, opts.Hash)
		default:
			it.Method = p.Transport.Method
		}
	}
	p.Source.Inventory = InventoryDigest(selected)
	p.Target.Inventory = TargetDigest(dst.Keys, p.Items)
	return p, p.Seal()
}

func chooseTransport(items []Item, opts Options) Transport {
	t := Transport{Hash: opts.Hash, Bits: opts.TransportBits}
	n := 0
	for _, it := range items {
		if it.Action == Transfer && it.Class != hsm.ClassPublic {
			n++
		}
	}
	switch opts.Transport {
	case "auto":
		if n >= AutoSessionKEKThreshold {
			t.Method = MethodSessionKEK
			t.Why = fmt.Sprintf("auto: %d keys to transfer (≥ %d), so one RSA-OAEP operation moves an AES-256 session key and each key is wrapped with AES-KWP under it", n, AutoSessionKEKThreshold)
		} else {
			t.Method = MethodRSAAES
			t.Why = fmt.Sprintf("auto: %d keys to transfer (< %d), so each is wrapped by rsa-aes (CKM_RSA_AES_KEY_WRAP), which carries any key size", n, AutoSessionKEKThreshold)
		}
	default:
		t.Method = Method(opts.Transport)
		t.Why = "chosen with --transport"
	}
	return t
}

func side(inv Inventory) Cluster {
	return Cluster{
		Dir: inv.Dir, ID: inv.Info.ID, Region: inv.Info.Region, Lineage: inv.Info.Lineage,
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
