package hsm

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"strings"
)

// Filter selects keys the way CloudHSM CLI's --filter does: every condition
// set must hold (they are ANDed). The zero Filter selects every key.
type Filter struct {
	Ref   KeyRef        // key-reference=0x...
	Label *string       // attr.label=...
	ID    Bytes         // attr.id=... (hex)
	Class Class         // attr.class=secret-key|private-key|public-key
	Type  KeyType       // attr.key-type=aes|rsa|ec
	Attrs map[Attr]bool // attr.NAME=true|false for boolean attributes
}

// ParseFilter parses CloudHSM CLI style conditions: "key-reference=0x2a",
// "attr.label=payments", "attr.id=0a0b", "attr.class=secret-key",
// "attr.key-type=aes", "attr.extractable=false".
func ParseFilter(exprs []string) (Filter, error) {
	var f Filter
	for _, e := range exprs {
		name, val, ok := strings.Cut(e, "=")
		if !ok {
			return Filter{}, Errorf(CodeInvalidInput, "", 0, "filter %q: want key-reference=0x... or attr.NAME=VALUE", e)
		}
		name = strings.ToLower(strings.TrimSpace(name))
		switch name {
		case "key-reference", "key_reference", "handle":
			r, err := ParseKeyRef(val)
			if err != nil {
				return Filter{}, err
			}
			f.Ref = r
			continue
		}
		attr, ok := strings.CutPrefix(name, "attr.")
		if !ok {
			return Filter{}, Errorf(CodeInvalidInput, "", 0, "filter %q: want key-reference=0x... or attr.NAME=VALUE", e)
		}
		switch attr {
		case "label":
			v := val
			f.Label = &v
		case "id":
			id, err := hex.DecodeString(strings.TrimPrefix(val, "0x"))
			if err != nil {
				return Filter{}, Errorf(CodeInvalidInput, "", 0, "filter %q: the id must be hex", e)
			}
			f.ID = id
		case "class":
			switch c := Class(val); c {
			case ClassSecret, ClassPrivate, ClassPublic:
				f.Class = c
			default:
				return Filter{}, Errorf(CodeInvalidInput, "", 0, "filter %q: class must be secret-key, private-key or public-key", e)
			}
		case "key-type", "type":
			switch t := KeyType(val); t {
			case TypeAES, TypeRSA, TypeEC, TypeGeneric:
				f.Type = t
			default:
				return Filter{}, Errorf(CodeInvalidInput, "", 0, "filter %q: key-type must be aes, rsa, ec or generic-secret", e)
			}
		default:
			a, err := ParseAttr(attr)
			if err != nil {
				return Filter{}, Errorf(CodeInvalidInput, "", 0, "filter %q: %s", e, err.(*Error).Msg)
			}
			v, err := ParseBool(val)
			if err != nil {
				return Filter{}, Errorf(CodeInvalidInput, "", 0, "filter %q: %s", e, err.(*Error).Msg)
			}
			if f.Attrs == nil {
				f.Attrs = map[Attr]bool{}
			}
			f.Attrs[a] = v
		}
	}
	return f, nil
}

// Match reports whether k satisfies every condition of f.
func (f Filter) Match(k KeyInfo) bool {
	if f.Ref != 0 && k.Ref != f.Ref {
		return false
	}
	if f.Label != nil && k.Label != *f.Label {
		return false
	}
	if f.ID != nil && !bytes.Equal(f.ID, k.ID) {
		return false
	}
	if f.Class != "" && k.Class != f.Class {
		return false
	}
	if f.Type != "" && k.Type != f.Type {
		return false
	}
	for a, want := range f.Attrs {
		if got, _ := k.Attrs.Get(a); got != want {
			return false
		}
	}
	return true
}

// String renders f in the syntax ParseFilter reads, for messages.
func (f Filter) String() string {
	var parts []string
	if f.Ref != 0 {
		parts = append(parts, "key-reference="+f.Ref.String())
	}
	if f.Label != nil {
		parts = append(parts, "attr.label="+*f.Label)
	}
	if f.ID != nil {
		parts = append(parts, "attr.id="+hex.EncodeToString(f.ID))
	}
	if f.Class != "" {
		parts = append(parts, "attr.class="+string(f.Class))
	}
	if f.Type != "" {
		parts = append(parts, "attr.key-type="+string(f.Type))
	}
	for _, a := range SortedAttrs(f.Attrs) {
		parts = append(parts, fmt.Sprintf("attr.%s=%t", a, f.Attrs[a]))
	}
	if len(parts) == 0 {
		return "(all keys)"
	}
	return strings.Join(parts, " ")
}

// SelectOne returns the single key of keys that f matches. None, or more
// than one, is an error that says so and lists the candidates, as CloudHSM
// CLI does for commands that act on one key.
func SelectOne(keys []KeyInfo, f Filter) (KeyInfo, error) {
	var hits []KeyInfo
	for _, k := range keys {
		if f.Match(k) {
			hits = append(hits, k)
		}
	}
	switch len(hits) {
	case 1:
		return hits[0], nil
	case 0:
		return KeyInfo{}, Errorf(CodeNotFound, "", 0, "no key matches filter %s", f)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "filter %s matches %d keys; add conditions (e.g. key-reference=...) to select one:", f, len(hits))
	for i, k := range hits {
		if i == 10 {
			fmt.Fprintf(&b, "\n  ... and %d more", len(hits)-10)
			break
		}
		fmt.Fprintf(&b, "\n  %s label=%q id=%s class=%s", k.Ref, k.Label, k.ID, k.Class)
	}
	return KeyInfo{}, Errorf(CodeInvalidInput, "", 0, "%s", b.String())
}
