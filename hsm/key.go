package hsm

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// KeyRef is a key handle: 64 bits, the same on every HSM of a cluster and of
// its clones. Zero is never a valid handle.
type KeyRef uint64

// String formats the handle as CloudHSM CLI does: 0x followed by 16 hex digits.
func (r KeyRef) String() string { return fmt.Sprintf("0x%016x", uint64(r)) }

// MarshalText encodes the handle as its String form.
func (r KeyRef) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText parses a handle written as 0x-prefixed hex or decimal.
func (r *KeyRef) UnmarshalText(b []byte) error {
	v, err := ParseKeyRef(string(b))
	if err != nil {
		return err
	}
	*r = v
	return nil
}

// ParseKeyRef parses a key reference such as 0x000000000000002a or 42.
func ParseKeyRef(s string) (KeyRef, error) {
	v, err := strconv.ParseUint(strings.TrimSpace(s), 0, 64)
	if err != nil || v == 0 {
		return 0, Errorf(CodeInvalidInput, "", 0, "%q is not a key reference: want a non-zero handle such as 0x000000000000002a", s)
	}
	return KeyRef(v), nil
}

// Class is a key's object class.
type Class string

// The classes of key object.
const (
	ClassSecret  Class = "secret-key"
	ClassPrivate Class = "private-key"
	ClassPublic  Class = "public-key"
)

// KeyType is a key's algorithm family.
type KeyType string

// The key types the included HSM supports.
const (
	TypeAES     KeyType = "aes"
	TypeRSA     KeyType = "rsa"
	TypeEC      KeyType = "ec"
	TypeGeneric KeyType = "generic-secret"
)

// Bytes is binary data that JSON encodes as lower-case hex, the way
// CloudHSM shows ids and check values.
type Bytes []byte

// String returns b as lower-case hex.
func (b Bytes) String() string { return hex.EncodeToString(b) }

// MarshalJSON encodes b as a hex string.
func (b Bytes) MarshalJSON() ([]byte, error) { return json.Marshal(hex.EncodeToString(b)) }

// UnmarshalJSON decodes a hex string (an optional 0x prefix is allowed).
func (b *Bytes) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return err
	}
	v, err := hex.DecodeString(strings.TrimPrefix(s, "0x"))
	if err != nil {
		return fmt.Errorf("%q is not hex: %w", s, err)
	}
	*b = v
	return nil
}

// KeyInfo describes a key as a backend lists it. It never holds key material.
type KeyInfo struct {
	Ref   KeyRef     `json:"key-reference"`
	Label string     `json:"label"`
	ID    Bytes      `json:"id"`
	Class Class      `json:"class"`
	Type  KeyType    `json:"key-type"`
	Bits  int        `json:"size-bits"`       // AES key length, RSA modulus or EC field size
	Curve string     `json:"curve,omitempty"` // EC keys: P-256 or P-384
	Attrs Attributes `json:"attributes"`
	KCV   Bytes      `json:"check-value"` // 3 bytes, see wrap.KCVSecret and wrap.KCVPublic
	// KCVFrom says how a backend that keeps no check value found KCV:
	// KCVRoundTrip, or "" when the HSM keeps or computes it itself.
	KCVFrom    string   `json:"check-value-from,omitempty"`
	Owner      string   `json:"owner"`
	SharedWith []string `json:"shared-users"`
	Coverage   Coverage `json:"coverage"`
}

// KCVRoundTrip is KeyInfo.KCVFrom of a check value found by a wrap/unwrap
// round trip inside the HSM: it keeps no check value for the key and the
// key may not encrypt, so a copy that may was made, used and destroyed.
const KCVRoundTrip = "round-trip"

// Coverage tells on which HSMs of a cluster a key exists and whether its
// copies agree.
type Coverage struct {
	HSMs         []string `json:"hsms"`                   // HSMs that hold the key
	Missing      []string `json:"missing,omitempty"`      // HSMs that answered and lack it
	Unreachable  []string `json:"unreachable,omitempty"`  // HSMs that are down: whether they hold it is not known
	Inconsistent []string `json:"inconsistent,omitempty"` // attributes or shares that differ between HSMs
}

// Full reports whether every HSM holds the key and all copies agree.
func (c Coverage) Full() bool {
	return len(c.Missing) == 0 && len(c.Unreachable) == 0 && len(c.Inconsistent) == 0
}

// Count is how many HSMs hold the key.
func (c Coverage) Count() int { return len(c.HSMs) }

// String is "full", or the HSMs that lack the key, those that are down, and
// the attributes that differ.
func (c Coverage) String() string {
	if c.Full() {
		return "full"
	}
	var parts []string
	if len(c.Missing) > 0 {
		parts = append(parts, "missing on "+strings.Join(c.Missing, ","))
	}
	if len(c.Unreachable) > 0 {
		parts = append(parts, "unreachable "+strings.Join(c.Unreachable, ","))
	}
	if len(c.Inconsistent) > 0 {
		parts = append(parts, "inconsistent "+strings.Join(c.Inconsistent, ","))
	}
	return strings.Join(parts, "; ")
}

// KeySpec says which key to generate and with which attributes.
type KeySpec struct {
	Type  KeyType `json:"key-type"`
	Bits  int     `json:"size-bits"`       // AES 128/192/256, RSA 2048-4096
	Curve string  `json:"curve,omitempty"` // EC: P-256 or P-384
	Template
}

// Template carries what a caller chooses for a new key: label, id, session
// or token, and attribute values that override CloudHSM's defaults.
type Template struct {
	Label   string        `json:"label"`
	ID      Bytes         `json:"id,omitempty"`
	Session bool          `json:"session,omitempty"` // a session key: lives on one HSM, dies with the session
	Attrs   map[Attr]bool `json:"attributes,omitempty"`
}

// Role is a user's role on the HSM.
type Role string

// The roles, as CloudHSM names them.
const (
	RoleCryptoOfficer Role = "crypto-officer"
	RoleCryptoUser    Role = "crypto-user"
)

// ParseRole accepts crypto-officer or crypto-user (and CloudHSM's short forms CO and CU).
func ParseRole(s string) (Role, error) {
	switch strings.ToLower(s) {
	case "crypto-officer", "co", "admin":
		return RoleCryptoOfficer, nil
	case "crypto-user", "cu":
		return RoleCryptoUser, nil
	}
	return "", Errorf(CodeInvalidInput, "", 0, "role %q: want crypto-officer or crypto-user", s)
}

// User is an HSM user as listed; it never carries a password or its hash.
type User struct {
	Name   string `json:"username"`
	Role   Role   `json:"role"`
	Locked bool   `json:"locked"`
	// Coverage tells which HSMs of a cluster know the user.
	Coverage Coverage `json:"coverage"`
}

// Credentials are a user name and password, as parsed from a
// "user:password" PIN. They must never be logged or written anywhere.
type Credentials struct {
	User     string
	Password string
}

// String hides the password so credentials cannot leak through a log line.
func (c Credentials) String() string { return c.User + ":<redacted>" }

// GoString hides the password from %#v as well.
func (c Credentials) GoString() string { return c.String() }

// ParsePIN splits a "user:password" PIN.
func ParsePIN(pin string) (Credentials, error) {
	pin = strings.TrimRight(pin, "\r\n")
	user, pass, ok := strings.Cut(pin, ":")
	if !ok || user == "" || pass == "" {
		return Credentials{}, Errorf(CodeInvalidInput, "", 0, "a PIN must be user:password")
	}
	return Credentials{User: user, Password: pass}, nil
}
