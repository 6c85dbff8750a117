package wrap

import (
	"crypto"
	"crypto/aes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"errors"
	"fmt"
)

// KCVSecret returns the CloudHSM key check value of an AES key (16, 24 or 32
// bytes): the first 3 bytes of AES-ECB(key, 16 zero bytes).
func KCVSecret(key []byte) ([]byte, error) {
	switch len(key) {
	case 16, 24, 32:
	default:
		return nil, fmt.Errorf("kcv of a %d-byte secret: only aes keys of 16, 24 or 32 bytes have one", len(key))
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	var blk [aes.BlockSize]byte
	b.Encrypt(blk[:], blk[:])
	kcv := make([]byte, 3)
	copy(kcv, blk[:3])
	clear(blk[:])
	return kcv, nil
}

// KCVPublic returns the CloudHSM key check value of a key pair: the first 3
// bytes of SHA-1 over the DER SubjectPublicKeyInfo of its public half.
func KCVPublic(pub crypto.PublicKey) ([]byte, error) {
	switch pub.(type) {
	case *rsa.PublicKey, *ecdsa.PublicKey, ed25519.PublicKey:
	default:
		return nil, fmt.Errorf("kcv of a %T: want an rsa or ec public key", pub)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("kcv: encoding the public key: %w", err)
	}
	sum := sha1.Sum(der)
	return sum[:3:3], nil
}

// MarshalPKCS8 encodes an RSA or EC private key as DER PKCS#8, the form HSMs
// wrap and unwrap private keys in.
func MarshalPKCS8(priv crypto.Signer) ([]byte, error) {
	switch priv.(type) {
	case *rsa.PrivateKey, *ecdsa.PrivateKey:
	default:
		return nil, fmt.Errorf("pkcs#8 of a %T: only rsa and ec private keys are supported", priv)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("encoding pkcs#8: %w", err)
	}
	return der, nil
}

// errPKCS8 is returned for DER that is not an RSA or EC PKCS#8 private key.
var errPKCS8 = errors.New("not a pkcs#8 rsa or ec private key")

// ParsePKCS8 decodes a DER PKCS#8 private key; only RSA and EC keys are
// accepted, others return a clear error.
func ParsePKCS8(der []byte) (crypto.Signer, error) {
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errPKCS8, err)
	}
	switch k := k.(type) {
	case *rsa.PrivateKey:
		return k, nil
	case *ecdsa.PrivateKey:
		return k, nil
	case ed25519.PrivateKey:
		return nil, fmt.Errorf("%w: it holds an ed25519 key", errPKCS8)
	default:
		return nil, fmt.Errorf("%w: it holds a %T", errPKCS8, k)
	}
}
