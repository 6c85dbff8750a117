package hsm

import (
	"context"
	"slices"
	"strings"
)

// Mechanism names a wrapping or encryption mechanism.
type Mechanism string

// The mechanisms of the included HSM.
const (
	MechRSAOAEP Mechanism = "rsa-oaep" // PKCS#1 v2 OAEP; hash, MGF1 hash and label in Params
	MechRSAAES  Mechanism = "rsa-aes"  // PKCS#11 CKM_RSA_AES_KEY_WRAP
	MechAESKWP  Mechanism = "aes-kwp"  // RFC 5649
	MechAESKW   Mechanism = "aes-kw"   // RFC 3394
	MechAESGCM  Mechanism = "aes-gcm"  // output IV ‖ ciphertext ‖ tag; the IV is made inside the HSM
	MechRSAPKCS Mechanism = "rsa-pkcs" // PKCS#1 v1.5: refused for key transport in FIPS mode
)

// ParseMechanism checks that s names a known mechanism.
func ParseMechanism(s string) (Mechanism, error) {
	m := Mechanism(strings.ToLower(strings.TrimSpace(s)))
	switch m {
	case MechRSAOAEP, MechRSAAES, MechAESKWP, MechAESKW, MechAESGCM, MechRSAPKCS:
		return m, nil
	}
	return "", Errorf(CodeUnsupportedMechanism, "", 0, "unknown mechanism %q: want rsa-oaep, rsa-aes, aes-kwp, aes-kw or aes-gcm", s)
}

// Params are a mechanism's parameters. Zero values mean the defaults: sha256
// for Hash, Hash for MGF1Hash, no label, a 256-bit ephemeral AES key.
type Params struct {
	Hash     string `json:"hash,omitempty"`      // rsa-oaep, rsa-aes: sha1, sha224, sha256, sha384, sha512
	MGF1Hash string `json:"mgf1-hash,omitempty"` // rsa-oaep, rsa-aes; empty = Hash
	Label    Bytes  `json:"label,omitempty"`     // rsa-oaep, rsa-aes: OAEP label
	AESBits  int    `json:"aes-bits,omitempty"`  // rsa-aes: ephemeral key size, 128/192/256
	AAD      Bytes  `json:"aad,omitempty"`       // aes-gcm: additional authenticated data
}

// WrapRequest asks the HSM to export Payload encrypted under WrappingKey.
type WrapRequest struct {
	Mechanism   Mechanism
	Params      Params
	WrappingKey KeyRef
	Payload     KeyRef
}

// UnwrapRequest asks the HSM to import Blob, decrypted with UnwrappingKey,
// as a new key described by Template.
type UnwrapRequest struct {
	Mechanism     Mechanism
	Params        Params
	UnwrappingKey KeyRef
	Blob          []byte
	Class         Class   // of the key inside the blob
	Type          KeyType // of the key inside the blob
	Template
}

// MechanismLister is implemented by backends that offer only some of
// keymig's mechanisms (a PKCS#11 token reports what C_GetMechanismList
// gives). A session without it offers every mechanism of this package.
type MechanismLister interface {
	// Mechanisms lists what the backend can do with each mechanism it
	// offers. It is read once and cached; safe to call often.
	Mechanisms(ctx context.Context) ([]MechanismInfo, error)
}

// MechanismInfo says what a backend can do with one mechanism.
type MechanismInfo struct {
	Mechanism Mechanism `json:"mechanism"`
	Wrap      bool      `json:"wrap"`
	Unwrap    bool      `json:"unwrap"`
	Encrypt   bool      `json:"encrypt"`
	Decrypt   bool      `json:"decrypt"`
	// Hashes are the OAEP hashes (with MGF1 of the same hash) the backend
	// accepts, for rsa-oaep and rsa-aes; nil means all of them.
	Hashes []string `json:"hashes,omitempty"`
	// Native is the backend's own name for it (CKM_AES_KEY_WRAP_PAD), for
	// messages.
	Native string `json:"native,omitempty"`
}

// SupportsHash reports whether the mechanism accepts OAEP hash h.
func (m MechanismInfo) SupportsHash(h string) bool {
	return m.Hashes == nil || slices.Contains(m.Hashes, h)
}
