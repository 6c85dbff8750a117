package wrap

import (
	"bytes"
	"crypto/aes"
	"fmt"
	"testing"
)

// RFC 3394 §4 and RFC 5649 §6 published vectors.
func TestKeyWrapRFC3394(t *testing.T) {
	kek128 := "000102030405060708090A0B0C0D0E0F"
	kek192 := "000102030405060708090A0B0C0D0E0F1011121314151617"
	kek256 := "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F"
	tests := []struct {
		name, kek, key, wrapped string
	}{
		{"4.1 128-bit key, 128-bit KEK", kek128, "00112233445566778899AABBCCDDEEFF",
			"1FA68B0A8112B447 AEF34BD8FB5A7B82 9D3E862371D2CFE5"},
		{"4.2 128-bit key, 192-bit KEK", kek192, "00112233445566778899AABBCCDDEEFF",
			"96778B25AE6CA435 F92B5B97C050AED2 468AB8A17AD84E5D"},
		{"4.3 128-bit key, 256-bit KEK", kek256, "00112233445566778899AABBCCDDEEFF",
			"64E8C3F9CE0F5BA2 63E9777905818A2A 93C8191E7D6E8AE7"},
		{"4.4 192-bit key, 192-bit KEK", kek192, "00112233445566778899AABBCCDDEEFF0001020304050607",
			"031D33264E15D332 68F24EC260743EDC E1C6C7DDEE725A93 6BA814915C6762D2"},
		{"4.5 192-bit key, 256-bit KEK", kek256, "00112233445566778899AABBCCDDEEFF0001020304050607",
			"A8F9BC1612C68B3F F6E6F4FBE30E71E4 769C8B80A32CB895 8CD5D17D6B254DA1"},
		{"4.6 256-bit key, 256-bit KEK", kek256, "00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F",
			"28C9F404C4B810F4 CBCCB35CFB87F826 3F5786E2D80ED326 CBC7F0E71A99F43B FB988B9B7A02DD21"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kek, key, wrapped := unhex(t, tt.kek), unhex(t, tt.key), unhex(t, tt.wrapped)
			got, err := KeyWrap(kek, key)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, wrapped) {
				t.Fatalf("KeyWrap = %X, want %X", got, wrapped)
			}
			back, err := KeyUnwrap(kek, wrapped)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, key) {
				t.Fatalf("KeyUnwrap = %X, want %X", back, key)
			}
		})
	}
}

func TestKeyWrapPadRFC5649(t *testing.T) {
	kek := "5840df6e29b02af1 ab493b705bf16ea1 ae8338f4dcc176a8"
	tests := []struct {
		name, key, wrapped string
	}{
		{"20-octet key", "c37b7e6492584340 bed1220780894115 5068f738",
			"138bdeaa9b8fa7fc 61f97742e72248ee 5ae6ae5360d1ae6a 5f54f373fa543b6a"},
		{"7-octet key", "466f7250617369", "afbeb0f07dfbf541 9200f2ccb50bb24f"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kek, key, wrapped := unhex(t, kek), unhex(t, tt.key), unhex(t, tt.wrapped)
			got, err := KeyWrapPad(kek, key)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, wrapped) {
				t.Fatalf("KeyWrapPad = %x, want %x", got, wrapped)
			}
			back, err := KeyUnwrapPad(kek, wrapped)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, key) {
				t.Fatalf("KeyUnwrapPad = %x, want %x", back, key)
			}
		})
	}
}

func TestKeyWrapRoundTrip(t *testing.T) {
	for _, kekLen := range []int{16, 24, 32} {
		kek := seq(kekLen)
		other := append([]byte{}, kek...)
		other[0] ^= 1
		for n := 1; n <= 1300; n++ {
			payload := seq(n)
			blob, err := KeyWrapPad(kek, payload)
			if err != nil {
				t.Fatalf("KeyWrapPad(%d bytes): %v", n, err)
			}
			if want := (n+7)/8*8 + 8; len(blob) != want {
				t.Fatalf("KeyWrapPad(%d bytes) is %d bytes, want %d", n, len(blob), want)
			}
			got, err := KeyUnwrapPad(kek, blob)
			if err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("KeyUnwrapPad(%d bytes) = %x, %v", n, got, err)
			}
			_, err = KeyUnwrapPad(other, blob)
			wantUnwrapErr(t, fmt.Sprintf("kwp %d bytes, wrong kek", n), err)

			blob, err = KeyWrap(kek, payload)
			if n < 16 || n%8 != 0 {
				if err == nil {
					t.Fatalf("KeyWrap(%d bytes) succeeded, want an error", n)
				}
				continue
			}
			if err != nil {
				t.Fatalf("KeyWrap(%d bytes): %v", n, err)
			}
			got, err = KeyUnwrap(kek, blob)
			if err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("KeyUnwrap(%d bytes) = %x, %v", n, got, err)
			}
			_, err = KeyUnwrap(other, blob)
			wantUnwrapErr(t, fmt.Sprintf("kw %d bytes, wrong kek", n), err)
		}
	}
}

// Every single-bit class of damage — one flipped byte anywhere, a truncated
// or an extended blob — must end in the same error.
func TestKeyUnwrapTamper(t *testing.T) {
	kek := seq(32)
	for _, mech := range []struct {
		name   string
		wrap   func(kek, p []byte) ([]byte, error)
		unwrap func(kek, b []byte) ([]byte, error)
		sizes  []int
	}{
		{"aes-kw", KeyWrap, KeyUnwrap, []int{16, 24, 32, 40, 64}},
		{"aes-kwp", KeyWrapPad, KeyUnwrapPad, []int{1, 7, 8, 9, 16, 20, 32, 33, 64}},
	} {
		for _, n := range mech.sizes {
			blob, err := mech.wrap(kek, seq(n))
			if err != nil {
				t.Fatal(err)
			}
			for i := range blob {
				for _, x := range []byte{0x01, 0x80, 0xff} {
					bad := bytes.Clone(blob)
					bad[i] ^= x
					_, err := mech.unwrap(kek, bad)
					wantUnwrapErr(t, fmt.Sprintf("%s %d bytes, byte %d ^ %#x", mech.name, n, i, x), err)
				}
			}
			for cut := 1; cut <= len(blob); cut++ {
				_, err := mech.unwrap(kek, blob[:len(blob)-cut])
				wantUnwrapErr(t, fmt.Sprintf("%s %d bytes, truncated by %d", mech.name, n, cut), err)
			}
			for _, ext := range []int{1, 7, 8, 16} {
				_, err := mech.unwrap(kek, append(bytes.Clone(blob), make([]byte, ext)...))
				wantUnwrapErr(t, fmt.Sprintf("%s %d bytes, extended by %d", mech.name, n, ext), err)
			}
		}
	}
}

func TestKeyWrapBadInputs(t *testing.T) {
	for _, n := range []int{0, 8, 15, 17, 33} {
		if _, err := KeyWrap(seq(32), seq(n)); err == nil {
			t.Errorf("KeyWrap(%d bytes) succeeded", n)
		}
	}
	if _, err := KeyWrapPad(seq(32), nil); err == nil {
		t.Error("KeyWrapPad(empty) succeeded")
	}
	for _, n := range []int{0, 8, 15, 33} {
		if _, err := KeyWrap(seq(n), seq(16)); err == nil {
			t.Errorf("KeyWrap with a %d-byte kek succeeded", n)
		}
		if _, err := KeyWrapPad(seq(n), seq(16)); err == nil {
			t.Errorf("KeyWrapPad with a %d-byte kek succeeded", n)
		}
		_, err := KeyUnwrap(seq(n), make([]byte, 24))
		wantUnwrapErr(t, fmt.Sprintf("KeyUnwrap with a %d-byte kek", n), err)
		_, err = KeyUnwrapPad(seq(n), make([]byte, 24))
		wantUnwrapErr(t, fmt.Sprintf("KeyUnwrapPad with a %d-byte kek", n), err)
	}
}

// The Block variants must agree with the keyed ones.
func TestKeyWrapBlockVariants(t *testing.T) {
	kek := seq(32)
	b, err := aes.NewCipher(kek)
	if err != nil {
		t.Fatal(err)
	}
	p := seq(32)
	w1, _ := KeyWrap(kek, p)
	w2, err := KeyWrapBlock(b, p)
	if err != nil || !bytes.Equal(w1, w2) {
		t.Fatalf("KeyWrapBlock = %x, %v; want %x", w2, err, w1)
	}
	if got, err := KeyUnwrapBlock(b, w1); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("KeyUnwrapBlock = %x, %v", got, err)
	}
	w1, _ = KeyWrapPad(kek, p[:21])
	w2, err = KeyWrapPadBlock(b, p[:21])
	if err != nil || !bytes.Equal(w1, w2) {
		t.Fatalf("KeyWrapPadBlock = %x, %v; want %x", w2, err, w1)
	}
	if got, err := KeyUnwrapPadBlock(b, w1); err != nil || !bytes.Equal(got, p[:21]) {
		t.Fatalf("KeyUnwrapPadBlock = %x, %v", got, err)
	}
}
