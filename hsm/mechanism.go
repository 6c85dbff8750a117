package hsm

import "strings"

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
