package wrap

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
)

// OAEPParams are the RSA-OAEP parameters both sides of a wrap must agree on.
type OAEPParams struct {
	// Hash hashes the label and drives the encoding; zero means SHA-256.
	Hash crypto.Hash
	// MGF1Hash is the mask generation hash; zero means the same as Hash.
	MGF1Hash crypto.Hash
	// Label is the optional OAEP label (PKCS#11 source data); usually empty.
	Label []byte
}

func (p OAEPParams) hash() crypto.Hash {
	if p.Hash == 0 {
		return crypto.SHA256
	}
	return p.Hash
}

func (p OAEPParams) mgf1Hash() crypto.Hash {
	if p.MGF1Hash == 0 {
		return p.hash()
	}
	return p.MGF1Hash
}

func (p OAEPParams) options() *rsa.OAEPOptions {
	return &rsa.OAEPOptions{Hash: p.hash(), MGFHash: p.mgf1Hash(), Label: p.Label}
}

func (p OAEPParams) valid() bool {
	return oaepHash(p.hash()) && oaepHash(p.mgf1Hash())
}

func (p OAEPParams) check() error {
	for _, h := range []crypto.Hash{p.hash(), p.mgf1Hash()} {
		if !oaepHash(h) {
			return fmt.Errorf("rsa-oaep does not support hash %s: want sha1, sha224, sha256, sha384 or sha512", HashName(h))
		}
	}
	return nil
}

// PayloadTooLargeError reports a payload that does not fit in one RSA-OAEP
// block; it matches ErrPayloadTooLarge with errors.Is.
type PayloadTooLargeError struct {
	Payload  int         // payload length in bytes
	Capacity int         // the most OAEP can carry with this key and hash
	KeyBits  int         // RSA modulus size
	Hash     crypto.Hash // the OAEP hash
}

// Error names both sizes and the mechanism that does fit.
func (e *PayloadTooLargeError) Error() string {
	return fmt.Sprintf("payload of %d bytes is too large for rsa-oaep with a %d-bit key and %s (at most %d bytes); use rsa-aes, which wraps keys of any size",
		e.Payload, e.KeyBits, HashName(e.Hash), e.Capacity)
}

// Is makes errors.Is(err, ErrPayloadTooLarge) true.
func (e *PayloadTooLargeError) Is(target error) bool { return target == ErrPayloadTooLarge }

// OAEPCapacity returns the most bytes one RSA-OAEP block can carry with pub
// and hash h: modulus bytes - 2*hash bytes - 2 (negative if none fit).
func OAEPCapacity(pub *rsa.PublicKey, h crypto.Hash) int {
	return pub.Size() - 2*h.Size() - 2
}

// WrapOAEP encrypts payload to pub with RSA-OAEP; the blob is exactly the
// modulus length. A payload that does not fit returns a *PayloadTooLargeError.
func WrapOAEP(pub *rsa.PublicKey, payload []byte, p OAEPParams) ([]byte, error) {
	if pub == nil || pub.N == nil {
		return nil, fmt.Errorf("rsa-oaep needs an rsa public key")
	}
	if err := p.check(); err != nil {
		return nil, err
	}
	if c := OAEPCapacity(pub, p.hash()); len(payload) > c {
		return nil, &PayloadTooLargeError{Payload: len(payload), Capacity: max(c, 0), KeyBits: pub.N.BitLen(), Hash: p.hash()}
	}
	out, err := rsa.EncryptOAEPWithOptions(rand.Reader, pub, payload, p.options())
	if err != nil {
		return nil, fmt.Errorf("rsa-oaep with a %d-bit key: %w", pub.N.BitLen(), err)
	}
	return out, nil
}

// UnwrapOAEP decrypts an RSA-OAEP blob with priv; every failure is ErrUnwrap.
func UnwrapOAEP(priv *rsa.PrivateKey, blob []byte, p OAEPParams) ([]byte, error) {
	if priv == nil || priv.N == nil || !p.valid() || len(blob) != priv.Size() {
		return nil, ErrUnwrap
	}
	out, err := priv.Decrypt(nil, blob, p.options())
	if err != nil {
		return nil, ErrUnwrap
	}
	return out, nil
}

// RSAAESParams are the parameters of CKM_RSA_AES_KEY_WRAP: OAEP for the
// ephemeral AES key and that key's size.
type RSAAESParams struct {
	OAEP OAEPParams
	// AESBits is the ephemeral AES key size: 128, 192 or 256; zero means 256
	// when wrapping and "any of the three" when unwrapping.
	AESBits int
}

// WrapRSAAES wraps payload for pub with PKCS#11 CKM_RSA_AES_KEY_WRAP:
// RSA-OAEP(ephemeral AES key) || AES-KWP(ephemeral key, payload). The
// ephemeral key is fresh for each call and zeroed before returning.
func WrapRSAAES(pub *rsa.PublicKey, payload []byte, p RSAAESParams) ([]byte, error) {
	bits := p.AESBits
	if bits == 0 {
		bits = 256
	}
	if bits != 128 && bits != 192 && bits != 256 {
		return nil, fmt.Errorf("rsa-aes ephemeral key of %d bits: want 128, 192 or 256", p.AESBits)
	}
	if len(payload) == 0 {
		return nil, fmt.Errorf("rsa-aes: the payload is empty")
	}
	eph := make([]byte, bits/8)
	defer clear(eph)
	if _, err := rand.Read(eph); err != nil {
		return nil, fmt.Errorf("rsa-aes: generating the ephemeral key: %w", err)
	}
	head, err := WrapOAEP(pub, eph, p.OAEP)
	if err != nil {
		return nil, fmt.Errorf("rsa-aes: wrapping the ephemeral key: %w", err)
	}
	tail, err := KeyWrapPad(eph, payload)
	if err != nil {
		return nil, fmt.Errorf("rsa-aes: %w", err)
	}
	return append(head, tail...), nil
}

// UnwrapRSAAES reverses WrapRSAAES with priv; every failure is ErrUnwrap.
func UnwrapRSAAES(priv *rsa.PrivateKey, blob []byte, p RSAAESParams) ([]byte, error) {
	if priv == nil || priv.N == nil {
		return nil, ErrUnwrap
	}
	k := priv.Size()
	if len(blob) < k+16 {
		return nil, ErrUnwrap
	}
	eph, err := UnwrapOAEP(priv, blob[:k], p.OAEP)
	if err != nil {
		return nil, ErrUnwrap
	}
	defer clear(eph)
	switch {
	case p.AESBits == 0 && (len(eph) == 16 || len(eph) == 24 || len(eph) == 32):
	case p.AESBits != 0 && len(eph)*8 == p.AESBits && (len(eph) == 16 || len(eph) == 24 || len(eph) == 32):
	default:
		return nil, ErrUnwrap
	}
	out, err := KeyUnwrapPad(eph, blob[k:])
	if err != nil {
		return nil, ErrUnwrap
	}
	return out, nil
}
