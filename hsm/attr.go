package hsm

import (
	"sort"
	"strconv"
	"strings"
)

// Attr is the CloudHSM CLI name of a boolean key attribute.
type Attr string

// The boolean key attributes, named as in CloudHSM CLI.
const (
	AttrToken            Attr = "token"
	AttrPrivate          Attr = "private"
	AttrExtractable      Attr = "extractable"
	AttrNeverExtractable Attr = "never-extractable"
	AttrSensitive        Attr = "sensitive"
	AttrAlwaysSensitive  Attr = "always-sensitive"
	AttrLocal            Attr = "local"
	AttrEncrypt          Attr = "encrypt"
	AttrDecrypt          Attr = "decrypt"
	AttrWrap             Attr = "wrap"
	AttrUnwrap           Attr = "unwrap"
	AttrSign             Attr = "sign"
	AttrVerify           Attr = "verify"
	AttrDerive           Attr = "derive"
	AttrTrusted          Attr = "trusted"
	AttrWrapWithTrusted  Attr = "wrap-with-trusted"
	AttrModifiable       Attr = "modifiable"
	AttrDestroyable      Attr = "destroyable"
)

// Attributes holds a key's boolean attributes. The check value is not here:
// it is KeyInfo.KCV, computed by the HSM and never set by hand.
type Attributes struct {
	Token            bool `json:"token"`
	Private          bool `json:"private"`
	Extractable      bool `json:"extractable"`
	NeverExtractable bool `json:"never-extractable"`
	Sensitive        bool `json:"sensitive"`
	AlwaysSensitive  bool `json:"always-sensitive"`
	Local            bool `json:"local"`
	Encrypt          bool `json:"encrypt"`
	Decrypt          bool `json:"decrypt"`
	Wrap             bool `json:"wrap"`
	Unwrap           bool `json:"unwrap"`
	Sign             bool `json:"sign"`
	Verify           bool `json:"verify"`
	Derive           bool `json:"derive"`
	Trusted          bool `json:"trusted"`
	WrapWithTrusted  bool `json:"wrap-with-trusted"`
	Modifiable       bool `json:"modifiable"`
	Destroyable      bool `json:"destroyable"`
}

// field returns a pointer to the attribute named a, or nil if a is unknown.
func (at *Attributes) field(a Attr) *bool {
	switch a {
	case AttrToken:
		return &at.Token
	case AttrPrivate:
		return &at.Private
	case AttrExtractable:
		return &at.Extractable
	case AttrNeverExtractable:
		return &at.NeverExtractable
	case AttrSensitive:
		return &at.Sensitive
	case AttrAlwaysSensitive:
		return &at.AlwaysSensitive
	case AttrLocal:
		return &at.Local
	case AttrEncrypt:
		return &at.Encrypt
	case AttrDecrypt:
		return &at.Decrypt
	case AttrWrap:
		return &at.Wrap
	case AttrUnwrap:
		return &at.Unwrap
	case AttrSign:
		return &at.Sign
	case AttrVerify:
		return &at.Verify
	case AttrDerive:
		return &at.Derive
	case AttrTrusted:
		return &at.Trusted
	case AttrWrapWithTrusted:
		return &at.WrapWithTrusted
	case AttrModifiable:
		return &at.Modifiable
	case AttrDestroyable:
		return &at.Destroyable
	}
	return nil
}

// AllAttrs lists every boolean attribute in CloudHSM CLI's display order.
var AllAttrs = []Attr{
	AttrToken, AttrPrivate, AttrExtractable, AttrNeverExtractable, AttrSensitive,
	AttrAlwaysSensitive, AttrLocal, AttrEncrypt, AttrDecrypt, AttrWrap, AttrUnwrap,
	AttrSign, AttrVerify, AttrDerive, AttrTrusted, AttrWrapWithTrusted,
	AttrModifiable, AttrDestroyable,
}

// Get returns the value of attribute a and whether a is a known attribute.
func (at Attributes) Get(a Attr) (value, ok bool) {
	p := at.field(a)
	if p == nil {
		return false, false
	}
	return *p, true
}

// Set changes attribute a; it reports false if a is unknown. It enforces no
// policy: that is the HSM's job.
func (at *Attributes) Set(a Attr, v bool) bool {
	p := at.field(a)
	if p == nil {
		return false
	}
	*p = v
	return true
}

// Diff lists the attributes whose values differ between at and other.
func (at Attributes) Diff(other Attributes) []Attr {
	var d []Attr
	for _, a := range AllAttrs {
		x, _ := at.Get(a)
		y, _ := other.Get(a)
		if x != y {
			d = append(d, a)
		}
	}
	return d
}

// ParseAttr checks that name is a known boolean attribute.
func ParseAttr(name string) (Attr, error) {
	a := Attr(strings.ToLower(strings.TrimSpace(name)))
	if (&Attributes{}).field(a) == nil {
		names := make([]string, len(AllAttrs))
		for i, x := range AllAttrs {
			names[i] = string(x)
		}
		return "", Errorf(CodeInvalidInput, "", 0, "unknown attribute %q: want one of %s", name, strings.Join(names, ", "))
	}
	return a, nil
}

// ParseBool accepts true/false, 1/0, yes/no (case-insensitive).
func ParseBool(s string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "true", "1", "yes":
		return true, nil
	case "false", "0", "no":
		return false, nil
	}
	_, err := strconv.ParseBool(s)
	return false, Errorf(CodeInvalidInput, "", 0, "%q is not a boolean (want true or false): %v", s, err)
}

// ParseAttrAssignments parses NAME=VALUE pairs such as "extractable=false"
// into a template's attribute overrides.
func ParseAttrAssignments(pairs []string) (map[Attr]bool, error) {
	m := make(map[Attr]bool, len(pairs))
	for _, p := range pairs {
		name, val, ok := strings.Cut(p, "=")
		if !ok {
			return nil, Errorf(CodeInvalidInput, "", 0, "attribute %q: want NAME=VALUE, e.g. extractable=false", p)
		}
		a, err := ParseAttr(name)
		if err != nil {
			return nil, err
		}
		v, err := ParseBool(val)
		if err != nil {
			return nil, err
		}
		m[a] = v
	}
	return m, nil
}

// SortedAttrs returns the keys of m in a stable order, for printing.
func SortedAttrs(m map[Attr]bool) []Attr {
	out := make([]Attr, 0, len(m))
	for a := range m {
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}
