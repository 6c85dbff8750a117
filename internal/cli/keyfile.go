package cli

// Key files: keymig detects a file's format instead of asking for it, because
// users get keys from openssl, cloud consoles and HSM tools in every encoding.
//
//   - RSA public keys: SubjectPublicKeyInfo (PEM "PUBLIC KEY" or DER), PKCS#1
//     (PEM "RSA PUBLIC KEY" or DER), an X.509 certificate (PEM or DER), or a
//     private key, whose public half is used.
//   - RSA private keys: PKCS#8 or PKCS#1, PEM or DER.
//   - AES keys: the raw 16, 24 or 32 bytes.

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
)

// maxKeyFile bounds what keymig reads as a key file, so a wrong path (a disk
// image, /dev/zero) fails fast instead of filling memory.
const maxKeyFile = 1 << 20

// maxPayloadFile bounds a payload or blob file: far above any key, far below
// the 4 GiB AES-KWP limit.
const maxPayloadFile = 64 << 20

// readBounded reads at most limit bytes of path; role names the file in
// errors ("wrapping key", "blob", ...).
func readBounded(role, path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read %s: %w", role, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("cannot read %s %s: %w", role, path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s %s is larger than %d bytes; is it the right file?", role, path, limit)
	}
	if len(data) == 0 {
		return nil, fmt.Errorf("%s %s is empty", role, path)
	}
	return data, nil
}

// parsedKey is a key found in a file: one of *rsa.PublicKey, *rsa.PrivateKey,
// *ecdsa.PublicKey, *ecdsa.PrivateKey, ed25519 keys or *ecdh keys.
type parsedKey struct {
	key    any
	format string // how it was encoded, for messages: "PKCS#8 PEM", ...
}

// isPEM reports whether data starts (after blank space) like a PEM file.
func isPEM(data []byte) bool {
	return bytes.HasPrefix(bytes.TrimLeft(data, " \t\r\n"), []byte("-----BEGIN "))
}

// parseAsymmetricKey detects and decodes a public or private key, PEM or DER.
func parseAsymmetricKey(data []byte) (parsedKey, error) {
	if isPEM(data) {
		blk, rest := pem.Decode(data)
		// `openssl ecparam -genkey` writes the curve parameters first.
		for blk != nil && blk.Type == "EC PARAMETERS" {
			blk, rest = pem.Decode(rest)
		}
		if blk == nil {
			return parsedKey{}, errors.New("is not valid PEM")
		}
		if _, encrypted := blk.Headers["DEK-Info"]; encrypted {
			return parsedKey{}, errors.New("is an encrypted PEM key; decrypt it first, e.g. with `openssl pkey -in FILE -out PLAIN.pem`")
		}
		var k any
		var err error
		switch blk.Type {
		case "PUBLIC KEY":
			k, err = x509.ParsePKIXPublicKey(blk.Bytes)
		case "RSA PUBLIC KEY":
			k, err = x509.ParsePKCS1PublicKey(blk.Bytes)
		case "CERTIFICATE":
			var c *x509.Certificate
			if c, err = x509.ParseCertificate(blk.Bytes); err == nil {
				k = c.PublicKey
			}
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(blk.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return parsedKey{}, errors.New("is an encrypted PKCS#8 key; decrypt it first, e.g. with `openssl pkey -in FILE -out PLAIN.pem`")
		default:
			return parsedKey{}, fmt.Errorf("holds a PEM %q block; want a public key, a certificate or a private key", blk.Type)
		}
		if err != nil {
			return parsedKey{}, fmt.Errorf("holds a PEM %q block that does not parse: %w", blk.Type, err)
		}
		return parsedKey{key: k, format: "PEM " + blk.Type}, nil
	}

	// DER: try each structure; they are distinct ASN.1 shapes, so at most one
	// succeeds.
	if k, err := x509.ParsePKIXPublicKey(data); err == nil {
		return parsedKey{k, "DER SubjectPublicKeyInfo"}, nil
	}
	if c, err := x509.ParseCertificate(data); err == nil {
		return parsedKey{c.PublicKey, "DER certificate"}, nil
	}
	if k, err := x509.ParsePKCS8PrivateKey(data); err == nil {
		return parsedKey{k, "DER PKCS#8"}, nil
	}
	if k, err := x509.ParsePKCS1PrivateKey(data); err == nil {
		return parsedKey{k, "DER PKCS#1 private key"}, nil
	}
	if k, err := x509.ParsePKCS1PublicKey(data); err == nil {
		return parsedKey{k, "DER PKCS#1 public key"}, nil
	}
	if k, err := x509.ParseECPrivateKey(data); err == nil {
		return parsedKey{k, "DER EC private key"}, nil
	}
	return parsedKey{}, errors.New("is not a key keymig recognises (want PEM or DER: SubjectPublicKeyInfo, PKCS#1, PKCS#8 or an X.509 certificate)")
}

// describeKey names a key's kind for error messages.
func describeKey(k any) string {
	switch k.(type) {
	case *rsa.PublicKey:
		return "an RSA public key"
	case *rsa.PrivateKey:
		return "an RSA private key"
	case *ecdsa.PublicKey, *ecdsa.PrivateKey:
		return "an EC key"
	case ed25519.PublicKey, ed25519.PrivateKey:
		return "an Ed25519 key"
	case *ecdh.PublicKey, *ecdh.PrivateKey:
		return "an X25519 key"
	default:
		return fmt.Sprintf("a %T", k)
	}
}

// loadRSAPublicKey reads an RSA public key for wrapping from any format
// keymig detects; a private key file gives its public half. role and mech
// make the error say what was expected ("wrapping key", "rsa-aes").
func loadRSAPublicKey(role, path, mech string) (*rsa.PublicKey, error) {
	data, err := readBounded(role, path, maxKeyFile)
	if err != nil {
		return nil, err
	}
	pk, err := parseAsymmetricKey(data)
	if err != nil {
		if len(data) == 16 || len(data) == 24 || len(data) == 32 {
			return nil, fmt.Errorf("%s %s looks like a raw AES key; %s needs an RSA public key (for an AES key use aes-kwp)", role, path, mech)
		}
		return nil, fmt.Errorf("%s %s %w", role, path, err)
	}
	switch k := pk.key.(type) {
	case *rsa.PublicKey:
		return k, nil
	case *rsa.PrivateKey:
		return &k.PublicKey, nil
	default:
		return nil, fmt.Errorf("%s %s is %s; %s needs an RSA public key", role, path, describeKey(k), mech)
	}
}

// loadRSAPrivateKey reads an RSA private key for unwrapping: PKCS#8 or
// PKCS#1, PEM or DER.
func loadRSAPrivateKey(role, path, mech string) (*rsa.PrivateKey, error) {
	data, err := readBounded(role, path, maxKeyFile)
	if err != nil {
		return nil, err
	}
	pk, err := parseAsymmetricKey(data)
	if err != nil {
		if len(data) == 16 || len(data) == 24 || len(data) == 32 {
			return nil, fmt.Errorf("%s %s looks like a raw AES key; %s needs an RSA private key (for an AES key use aes-kwp)", role, path, mech)
		}
		return nil, fmt.Errorf("%s %s %w", role, path, err)
	}
	switch k := pk.key.(type) {
	case *rsa.PrivateKey:
		return k, nil
	case *rsa.PublicKey:
		return nil, fmt.Errorf("%s %s is an RSA public key (%s); %s unwrap needs the RSA private key (PKCS#8 or PKCS#1, PEM or DER)", role, path, pk.format, mech)
	default:
		return nil, fmt.Errorf("%s %s is %s; %s needs an RSA private key", role, path, describeKey(k), mech)
	}
}

// loadAESKey reads a raw AES key of 16, 24 or 32 bytes.
func loadAESKey(role, path, mech string) ([]byte, error) {
	data, err := readBounded(role, path, maxKeyFile)
	if err != nil {
		return nil, err
	}
	switch len(data) {
	case 16, 24, 32:
		return data, nil
	}
	defer clear(data)
	if isPEM(data) {
		return nil, fmt.Errorf("%s %s is a PEM file; %s needs a raw 16, 24 or 32-byte AES key (use rsa-aes or rsa-oaep for RSA keys)", role, path, mech)
	}
	if t := bytes.TrimSpace(data); len(t) == 32 || len(t) == 48 || len(t) == 64 {
		if _, err := hex.DecodeString(string(t)); err == nil {
			return nil, fmt.Errorf("%s %s holds hex text; %s needs the raw key bytes: convert it with `xxd -r -p %s > key.bin`", role, path, mech, path)
		}
	}
	return nil, fmt.Errorf("%s %s is %d bytes; %s needs a raw AES key of 16, 24 or 32 bytes", role, path, len(data), mech)
}
