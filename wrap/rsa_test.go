package wrap

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestRSAAESRoundTripAllLengths(t *testing.T) {
	priv := rsaKey(t, 2048)
	for _, bits := range []int{128, 192, 256} {
		t.Run(fmt.Sprintf("aes%d", bits), func(t *testing.T) {
			t.Parallel()
			p := RSAAESParams{OAEP: OAEPParams{Hash: crypto.SHA256, MGF1Hash: crypto.SHA1}, AESBits: bits}
			step := 13 // every length for AES-256, the default; a sample for the others
			if bits == 256 {
				step = 1
			}
			for n := 1; n <= 1300; n += step {
				payload := seq(n)
				blob, err := WrapRSAAES(&priv.PublicKey, payload, p)
				if err != nil {
					t.Fatalf("wrap %d bytes: %v", n, err)
				}
				if want := priv.Size() + (n+7)/8*8 + 8; len(blob) != want {
					t.Fatalf("blob for %d bytes is %d bytes, want %d", n, len(blob), want)
				}
				got, err := UnwrapRSAAES(priv, blob, p)
				if err != nil || !bytes.Equal(got, payload) {
					t.Fatalf("unwrap %d bytes = %x, %v", n, got, err)
				}
				// AESBits 0 accepts every ephemeral size.
				if got, err := UnwrapRSAAES(priv, blob, RSAAESParams{OAEP: p.OAEP}); err != nil || !bytes.Equal(got, payload) {
					t.Fatalf("unwrap %d bytes with AESBits 0 = %x, %v", n, got, err)
				}
			}
		})
	}
}

func TestRSAAESSizesAndHashes(t *testing.T) {
	pkcs8, err := MarshalPKCS8(rsaKey(t, 2048))
	if err != nil {
		t.Fatal(err)
	}
	for _, bits := range testKeyBits {
		priv := rsaKey(t, bits)
		for _, h := range []crypto.Hash{crypto.SHA1, crypto.SHA256, crypto.SHA384, crypto.SHA512} {
			for _, payload := range [][]byte{seq(16), seq(32), pkcs8} {
				p := RSAAESParams{OAEP: OAEPParams{Hash: h}}
				blob, err := WrapRSAAES(&priv.PublicKey, payload, p)
				if err != nil {
					t.Fatalf("RSA-%d %v %d bytes: %v", bits, h, len(payload), err)
				}
				got, err := UnwrapRSAAES(priv, blob, p)
				if err != nil || !bytes.Equal(got, payload) {
					t.Fatalf("RSA-%d %v %d bytes: unwrap = %v", bits, h, len(payload), err)
				}
			}
		}
	}
}

// OAEP carries exactly k - 2*hLen - 2 bytes; one more is the typed error.
func TestOAEPCapacity(t *testing.T) {
	for _, bits := range testKeyBits {
		priv := rsaKey(t, bits)
		for _, h := range []crypto.Hash{crypto.SHA1, crypto.SHA224, crypto.SHA256, crypto.SHA384, crypto.SHA512} {
			c := OAEPCapacity(&priv.PublicKey, h)
			if want := bits/8 - 2*h.Size() - 2; c != want {
				t.Fatalf("OAEPCapacity(RSA-%d, %v) = %d, want %d", bits, h, c, want)
			}
			// The MGF1 hash does not change the capacity.
			p := OAEPParams{Hash: h, MGF1Hash: crypto.SHA1}
			blob, err := WrapOAEP(&priv.PublicKey, seq(c), p)
			if err != nil {
				t.Fatalf("RSA-%d %v: wrapping %d bytes: %v", bits, h, c, err)
			}
			if len(blob) != priv.Size() {
				t.Fatalf("blob is %d bytes, want the modulus size %d", len(blob), priv.Size())
			}
			if got, err := UnwrapOAEP(priv, blob, p); err != nil || !bytes.Equal(got, seq(c)) {
				t.Fatalf("RSA-%d %v: unwrap at capacity = %v", bits, h, err)
			}
			_, err = WrapOAEP(&priv.PublicKey, seq(c+1), p)
			var tooLarge *PayloadTooLargeError
			if !errors.Is(err, ErrPayloadTooLarge) || !errors.As(err, &tooLarge) {
				t.Fatalf("RSA-%d %v: wrapping %d bytes: err = %v, want ErrPayloadTooLarge", bits, h, c+1, err)
			}
			msg := err.Error()
			for _, want := range []string{fmt.Sprint(c + 1), fmt.Sprint(c), "rsa-aes"} {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q does not mention %q", msg, want)
				}
			}
		}
	}
}

// Every way an unwrap can be wrong must give the same error and message.
func TestUnwrapRSAFailuresAreUniform(t *testing.T) {
	priv := rsaKey(t, 2048)
	other := rsaKey(t, 3072)
	good := RSAAESParams{OAEP: OAEPParams{Hash: crypto.SHA256, MGF1Hash: crypto.SHA1, Label: []byte("keymig")}}
	payload := seq(32)

	oaepBlob, err := WrapOAEP(&priv.PublicKey, payload, good.OAEP)
	if err != nil {
		t.Fatal(err)
	}
	aesBlob, err := WrapRSAAES(&priv.PublicKey, payload, good)
	if err != nil {
		t.Fatal(err)
	}
	withOAEP := func(f func(*OAEPParams)) RSAAESParams {
		p := good
		p.OAEP.Label = bytes.Clone(good.OAEP.Label)
		f(&p.OAEP)
		return p
	}
	wrongParams := map[string]RSAAESParams{
		"wrong hash":      withOAEP(func(o *OAEPParams) { o.Hash = crypto.SHA1 }),
		"wrong mgf1 hash": withOAEP(func(o *OAEPParams) { o.MGF1Hash = crypto.SHA256 }),
		"wrong label":     withOAEP(func(o *OAEPParams) { o.Label = []byte("keymiG") }),
		"no label":        withOAEP(func(o *OAEPParams) { o.Label = nil }),
		"unusable hash":   withOAEP(func(o *OAEPParams) { o.Hash = crypto.MD5 }),
		"aes-128 only":    {OAEP: good.OAEP, AESBits: 128},
	}
	for name, p := range wrongParams {
		if name != "aes-128 only" {
			_, err := UnwrapOAEP(priv, oaepBlob, p.OAEP)
			wantUnwrapErr(t, "rsa-oaep "+name, err)
		}
		_, err := UnwrapRSAAES(priv, aesBlob, p)
		wantUnwrapErr(t, "rsa-aes "+name, err)
	}
	_, err = UnwrapOAEP(other, oaepBlob, good.OAEP)
	wantUnwrapErr(t, "rsa-oaep wrong key", err)
	_, err = UnwrapRSAAES(other, aesBlob, good)
	wantUnwrapErr(t, "rsa-aes wrong key", err)
	_, err = UnwrapOAEP(nil, oaepBlob, good.OAEP)
	wantUnwrapErr(t, "rsa-oaep nil key", err)
	_, err = UnwrapRSAAES(nil, aesBlob, good)
	wantUnwrapErr(t, "rsa-aes nil key", err)

	for _, tc := range []struct {
		name   string
		blob   []byte
		unwrap func([]byte) ([]byte, error)
	}{
		{"rsa-oaep", oaepBlob, func(b []byte) ([]byte, error) { return UnwrapOAEP(priv, b, good.OAEP) }},
		{"rsa-aes", aesBlob, func(b []byte) ([]byte, error) { return UnwrapRSAAES(priv, b, good) }},
	} {
		for i := range tc.blob {
			bad := bytes.Clone(tc.blob)
			bad[i] ^= 0x01 << (i % 8)
			_, err := tc.unwrap(bad)
			wantUnwrapErr(t, fmt.Sprintf("%s byte %d flipped", tc.name, i), err)
		}
		for _, cut := range []int{1, 7, 8, 16, len(tc.blob) - priv.Size(), len(tc.blob) - 1, len(tc.blob)} {
			if cut <= 0 || cut > len(tc.blob) {
				continue
			}
			_, err := tc.unwrap(tc.blob[:len(tc.blob)-cut])
			wantUnwrapErr(t, fmt.Sprintf("%s truncated by %d", tc.name, cut), err)
		}
		for _, ext := range []int{1, 8, 256} {
			_, err := tc.unwrap(append(bytes.Clone(tc.blob), make([]byte, ext)...))
			wantUnwrapErr(t, fmt.Sprintf("%s extended by %d", tc.name, ext), err)
		}
	}
}

// RSA-AES blobs whose ephemeral key is not an AES key size must fail even
// though the OAEP part decrypts.
func TestUnwrapRSAAESBadEphemeral(t *testing.T) {
	priv := rsaKey(t, 2048)
	p := RSAAESParams{OAEP: OAEPParams{Hash: crypto.SHA256}}
	for _, n := range []int{0, 8, 15, 17, 31, 33, 64} {
		eph := seq(n)
		head, err := WrapOAEP(&priv.PublicKey, eph, p.OAEP)
		if err != nil {
			t.Fatal(err)
		}
		kek := seq(32)
		tail, err := KeyWrapPad(kek, seq(32))
		if err != nil {
			t.Fatal(err)
		}
		_, err = UnwrapRSAAES(priv, append(head, tail...), p)
		wantUnwrapErr(t, fmt.Sprintf("%d-byte ephemeral key", n), err)
	}
}

func TestWrapRSAInputErrors(t *testing.T) {
	pub := &rsaKey(t, 2048).PublicKey
	if _, err := WrapRSAAES(pub, nil, RSAAESParams{}); err == nil {
		t.Error("WrapRSAAES(empty) succeeded")
	}
	if _, err := WrapRSAAES(pub, seq(16), RSAAESParams{AESBits: 512}); err == nil {
		t.Error("WrapRSAAES with AESBits 512 succeeded")
	}
	if _, err := WrapOAEP(pub, seq(16), OAEPParams{Hash: crypto.MD5}); err == nil {
		t.Error("WrapOAEP with MD5 succeeded")
	}
	if _, err := WrapOAEP(nil, seq(16), OAEPParams{}); err == nil {
		t.Error("WrapOAEP with a nil key succeeded")
	}
	// Hash 0 means SHA-256.
	priv := rsaKey(t, 2048)
	blob, err := WrapOAEP(pub, seq(16), OAEPParams{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := UnwrapOAEP(priv, blob, OAEPParams{Hash: crypto.SHA256, MGF1Hash: crypto.SHA256}); err != nil {
		t.Errorf("zero OAEPParams is not SHA-256/MGF1-SHA-256: %v", err)
	}
}

func TestParseHash(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want crypto.Hash
	}{
		{"sha1", crypto.SHA1}, {"SHA224", crypto.SHA224}, {"sha256", crypto.SHA256},
		{"Sha384", crypto.SHA384}, {"sha512", crypto.SHA512},
	} {
		got, err := ParseHash(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("ParseHash(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
		if name := HashName(got); !strings.EqualFold(name, tt.in) {
			t.Errorf("HashName(%v) = %q, want %q", got, name, strings.ToLower(tt.in))
		}
	}
	for _, bad := range []string{"", "md5", "sha-256", "sha3-256", "sha512/256"} {
		_, err := ParseHash(bad)
		if err == nil || !strings.Contains(err.Error(), "sha1, sha224, sha256, sha384 or sha512") {
			t.Errorf("ParseHash(%q) = %v, want an error listing the accepted names", bad, err)
		}
	}
	if got := HashName(crypto.SHA512_256); got != "sha512-256" {
		t.Errorf("HashName(SHA512_256) = %q", got)
	}
}

func TestKCV(t *testing.T) {
	// AES-ECB of the zero block under the all-zero key is 66E94BD4EF8A2C3B
	// (FIPS-197 style known answer), so its KCV is 66E94B.
	kcv, err := KCVSecret(make([]byte, 16))
	if err != nil || !bytes.Equal(kcv, unhex(t, "66E94B")) {
		t.Fatalf("KCVSecret(zero AES-128) = %X, %v; want 66E94B", kcv, err)
	}
	for _, n := range []int{0, 8, 20, 64} {
		if _, err := KCVSecret(seq(n)); err == nil {
			t.Errorf("KCVSecret(%d bytes) succeeded", n)
		}
	}
	priv := rsaKey(t, 2048)
	a, err := KCVPublic(&priv.PublicKey)
	if err != nil || len(a) != 3 {
		t.Fatalf("KCVPublic(rsa) = %x, %v", a, err)
	}
	if b, _ := KCVPublic(priv.Public()); !bytes.Equal(a, b) {
		t.Fatal("KCVPublic differs between calls")
	}
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if k, err := KCVPublic(&ec.PublicKey); err != nil || len(k) != 3 {
		t.Fatalf("KCVPublic(ec) = %x, %v", k, err)
	}
	if _, err := KCVPublic("not a key"); err == nil {
		t.Error("KCVPublic(string) succeeded")
	}
}

func TestPKCS8(t *testing.T) {
	ec, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []crypto.Signer{rsaKey(t, 2048), ec} {
		der, err := MarshalPKCS8(k)
		if err != nil {
			t.Fatal(err)
		}
		back, err := ParsePKCS8(der)
		if err != nil {
			t.Fatal(err)
		}
		if !back.(interface{ Equal(crypto.PrivateKey) bool }).Equal(k) {
			t.Fatalf("%T did not round-trip", k)
		}
	}
	// An Ed25519 PKCS#8 key (RFC 8410 §10.3) is refused with a clear error.
	ed := unhex(t, "302e020100300506032b657004220420d4ee72dbf913584ad5b6d8f1f769f8ad3afe7c28cbf1d4fbe097a88f44755842")
	if _, err := ParsePKCS8(ed); err == nil || !strings.Contains(err.Error(), "ed25519") {
		t.Errorf("ParsePKCS8(ed25519) = %v, want an error naming ed25519", err)
	}
	if _, err := ParsePKCS8([]byte("garbage")); err == nil {
		t.Error("ParsePKCS8(garbage) succeeded")
	}
}

// rsa.PrivateKey must still be usable concurrently through our functions.
func TestUnwrapConcurrent(t *testing.T) {
	priv := rsaKey(t, 2048)
	p := RSAAESParams{}
	blob, err := WrapRSAAES(&priv.PublicKey, seq(32), p)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 8)
	for range 8 {
		go func() {
			_, err := UnwrapRSAAES(priv, blob, p)
			errs <- err
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}
