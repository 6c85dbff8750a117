package wrap

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"
)

// Fuzz targets for every parser of untrusted bytes. Each asserts that nothing
// panics, that every unwrap failure is exactly ErrUnwrap, and that whatever
// unwraps wraps back (deterministically for AES key wrap).

func FuzzKeyUnwrap(f *testing.F) {
	kek := seq(32)
	blob, _ := KeyWrap(kek, seq(32))
	f.Add(kek, blob)
	f.Add(seq(16), unhex(f, "1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5"))
	f.Add(seq(24), make([]byte, 24))
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, kek, blob []byte) {
		out, err := KeyUnwrap(kek, blob)
		if err != nil {
			if err != ErrUnwrap {
				t.Fatalf("error %v, want ErrUnwrap", err)
			}
			return
		}
		again, err := KeyWrap(kek, out)
		if err != nil || !bytes.Equal(again, blob) {
			t.Fatalf("rewrap = %x, %v; want %x", again, err, blob)
		}
	})
}

func FuzzKeyUnwrapPad(f *testing.F) {
	kek := seq(32)
	for _, n := range []int{1, 7, 8, 9, 20, 32} {
		blob, _ := KeyWrapPad(kek, seq(n))
		f.Add(kek, blob)
	}
	f.Add(unhex(f, "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8"), unhex(f, "afbeb0f07dfbf5419200f2ccb50bb24f"))
	f.Add(seq(16), make([]byte, 16))
	f.Fuzz(func(t *testing.T, kek, blob []byte) {
		out, err := KeyUnwrapPad(kek, blob)
		if err != nil {
			if err != ErrUnwrap {
				t.Fatalf("error %v, want ErrUnwrap", err)
			}
			return
		}
		again, err := KeyWrapPad(kek, out)
		if err != nil || !bytes.Equal(again, blob) {
			t.Fatalf("rewrap = %x, %v; want %x", again, err, blob)
		}
	})
}

// fuzzHashes picks the OAEP and MGF1 hashes from one fuzzed byte, including
// values that are not usable hashes.
var fuzzHashes = []crypto.Hash{crypto.SHA256, crypto.SHA1, crypto.SHA384, crypto.SHA512, crypto.SHA224, crypto.MD5, 0, 99}

func fuzzOAEPParams(sel byte, label []byte) OAEPParams {
	return OAEPParams{
		Hash:     fuzzHashes[int(sel&7)],
		MGF1Hash: fuzzHashes[int(sel>>3&7)],
		Label:    label,
	}
}

func FuzzUnwrapOAEP(f *testing.F) {
	priv := rsaKey(f, 2048)
	for _, sel := range []byte{0, 1 << 3, 2} {
		p := fuzzOAEPParams(sel, []byte("label"))
		blob, err := WrapOAEP(&priv.PublicKey, seq(32), p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(blob, []byte("label"), sel)
	}
	f.Add(make([]byte, 256), []byte{}, byte(0))
	f.Add([]byte{1}, []byte{}, byte(0xff))
	f.Fuzz(func(t *testing.T, blob, label []byte, sel byte) {
		p := fuzzOAEPParams(sel, label)
		out, err := UnwrapOAEP(priv, blob, p)
		if err != nil {
			if err != ErrUnwrap {
				t.Fatalf("error %v, want ErrUnwrap", err)
			}
			return
		}
		again, err := WrapOAEP(&priv.PublicKey, out, p)
		if err != nil {
			t.Fatalf("rewrap: %v", err)
		}
		if back, err := UnwrapOAEP(priv, again, p); err != nil || !bytes.Equal(back, out) {
			t.Fatalf("round trip = %x, %v; want %x", back, err, out)
		}
	})
}

func FuzzUnwrapRSAAES(f *testing.F) {
	priv := rsaKey(f, 2048)
	for _, bits := range []int{128, 256} {
		p := RSAAESParams{AESBits: bits}
		blob, err := WrapRSAAES(&priv.PublicKey, seq(40), p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(blob, byte(0), uint16(bits))
	}
	f.Add(make([]byte, 256+24), byte(0), uint16(0))
	f.Fuzz(func(t *testing.T, blob []byte, sel byte, bits uint16) {
		p := RSAAESParams{OAEP: fuzzOAEPParams(sel, nil), AESBits: int(bits)}
		out, err := UnwrapRSAAES(priv, blob, p)
		if err != nil {
			if err != ErrUnwrap {
				t.Fatalf("error %v, want ErrUnwrap", err)
			}
			return
		}
		again, err := WrapRSAAES(&priv.PublicKey, out, p)
		if err != nil {
			t.Fatalf("rewrap: %v", err)
		}
		if back, err := UnwrapRSAAES(priv, again, p); err != nil || !bytes.Equal(back, out) {
			t.Fatalf("round trip = %x, %v; want %x", back, err, out)
		}
	})
}

func FuzzParsePKCS8(f *testing.F) {
	der, _ := MarshalPKCS8(rsaKey(f, 2048))
	f.Add(der)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ = MarshalPKCS8(ec)
	f.Add(der)
	f.Add(unhex(f, "302e020100300506032b657004220420d4ee72dbf913584ad5b6d8f1f769f8ad3afe7c28cbf1d4fbe097a88f44755842"))
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, der []byte) {
		k, err := ParsePKCS8(der)
		if err != nil {
			if k != nil {
				t.Fatal("a key and an error")
			}
			return
		}
		again, err := MarshalPKCS8(k)
		if err != nil {
			t.Fatalf("re-marshal: %v", err)
		}
		back, err := ParsePKCS8(again)
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if !back.(interface{ Equal(crypto.PrivateKey) bool }).Equal(k) {
			t.Fatal("key changed in a round trip")
		}
	})
}
