package wrap

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
)

// kwIV is the RFC 3394 §2.2.3.1 default initial value.
var kwIV = [8]byte{0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6}

// kwpPrefix is the constant half of the RFC 5649 §3 alternative initial value.
var kwpPrefix = [4]byte{0xA6, 0x59, 0x59, 0xA6}

// maxKWPPayload is the RFC 5649 limit: the message length indicator is 32 bits.
const maxKWPPayload = 1 << 32

var errBlockSize = errors.New("aes key wrap needs a cipher with 16-byte blocks (aes)")

// KeyWrap wraps plaintext (a multiple of 8 bytes, at least 16) under the AES
// key kek (16, 24 or 32 bytes) with AES-KW as RFC 3394 defines it.
func KeyWrap(kek, plaintext []byte) ([]byte, error) {
	b, err := newKEK(kek)
	if err != nil {
		return nil, err
	}
	return KeyWrapBlock(b, plaintext)
}

// KeyUnwrap reverses KeyWrap; every failure is ErrUnwrap.
func KeyUnwrap(kek, blob []byte) ([]byte, error) {
	b, err := aes.NewCipher(kek)
	if err != nil {
		return nil, ErrUnwrap
	}
	return KeyUnwrapBlock(b, blob)
}

// KeyWrapPad wraps 1 to 2^32 bytes of plaintext under the AES key kek with
// AES-KWP as RFC 5649 defines it.
func KeyWrapPad(kek, plaintext []byte) ([]byte, error) {
	b, err := newKEK(kek)
	if err != nil {
		return nil, err
	}
	return KeyWrapPadBlock(b, plaintext)
}

// KeyUnwrapPad reverses KeyWrapPad; every failure is ErrUnwrap.
func KeyUnwrapPad(kek, blob []byte) ([]byte, error) {
	b, err := aes.NewCipher(kek)
	if err != nil {
		return nil, ErrUnwrap
	}
	return KeyUnwrapPadBlock(b, blob)
}

func newKEK(kek []byte) (cipher.Block, error) {
	switch len(kek) {
	case 16, 24, 32:
		return aes.NewCipher(kek)
	default:
		return nil, fmt.Errorf("aes key-encryption key is %d bytes; want 16, 24 or 32", len(kek))
	}
}

// KeyWrapBlock is KeyWrap over an already expanded AES cipher, so that
// wrapping many keys under one KEK does not redo the key schedule.
func KeyWrapBlock(b cipher.Block, plaintext []byte) ([]byte, error) {
	if b.BlockSize() != aes.BlockSize {
		return nil, errBlockSize
	}
	if len(plaintext) < 16 || len(plaintext)%8 != 0 {
		return nil, fmt.Errorf("aes-kw wraps a multiple of 8 bytes, at least 16; got %d bytes (use aes-kwp for other lengths)", len(plaintext))
	}
	out := make([]byte, 8+len(plaintext))
	copy(out[8:], plaintext)
	encryptSemiblocks(b, kwIV, out)
	return out, nil
}

// KeyUnwrapBlock is KeyUnwrap over an already expanded AES cipher; every
// failure is ErrUnwrap.
func KeyUnwrapBlock(b cipher.Block, blob []byte) ([]byte, error) {
	if b.BlockSize() != aes.BlockSize || len(blob) < 24 || len(blob)%8 != 0 {
		return nil, ErrUnwrap
	}
	out := make([]byte, len(blob))
	copy(out, blob)
	a := decryptSemiblocks(b, out)
	if subtle.ConstantTimeCompare(a[:], kwIV[:]) != 1 {
		clear(out)
		return nil, ErrUnwrap
	}
	return out[8:], nil
}

// KeyWrapPadBlock is KeyWrapPad over an already expanded AES cipher.
func KeyWrapPadBlock(b cipher.Block, plaintext []byte) ([]byte, error) {
	if b.BlockSize() != aes.BlockSize {
		return nil, errBlockSize
	}
	if len(plaintext) == 0 || uint64(len(plaintext)) > maxKWPPayload {
		return nil, fmt.Errorf("aes-kwp wraps 1 to 2^32 bytes; got %d bytes", len(plaintext))
	}
	var aiv [8]byte
	copy(aiv[:4], kwpPrefix[:])
	binary.BigEndian.PutUint32(aiv[4:], uint32(len(plaintext)))

	padded := (len(plaintext) + 7) &^ 7
	out := make([]byte, 8+padded) // the padding bytes are already zero
	copy(out[8:], plaintext)
	if padded == 8 {
		// RFC 5649 §4.1: a single semiblock is encrypted as one AES block.
		copy(out[:8], aiv[:])
		b.Encrypt(out, out)
		return out, nil
	}
	encryptSemiblocks(b, aiv, out)
	return out, nil
}

// KeyUnwrapPadBlock is KeyUnwrapPad over an already expanded AES cipher; every
// failure is ErrUnwrap.
func KeyUnwrapPadBlock(b cipher.Block, blob []byte) ([]byte, error) {
	if b.BlockSize() != aes.BlockSize || len(blob) < 16 || len(blob)%8 != 0 {
		return nil, ErrUnwrap
	}
	out := make([]byte, len(blob))
	var a [8]byte
	if len(blob) == 16 {
		b.Decrypt(out, blob)
		copy(a[:], out[:8])
		clear(out[:8])
	} else {
		copy(out, blob)
		a = decryptSemiblocks(b, out)
	}
	p := out[8:]

	// Check the prefix, the length indicator and the padding without
	// branching on any of them, then fail once.
	ok := subtle.ConstantTimeCompare(a[:4], kwpPrefix[:])
	mli := uint64(binary.BigEndian.Uint32(a[4:]))
	n := uint64(len(p))
	// want n-8 < mli <= n
	ok &= int(ctLess(n-8, mli) & (1 ^ ctLess(n, mli)))
	var pad byte
	for i := n - 8; i < n; i++ {
		// Only bytes at or past mli are padding and must be zero.
		inPad := byte(1 ^ ctLess(i, mli))
		pad |= p[i] & -inPad
	}
	ok &= subtle.ConstantTimeByteEq(pad, 0)
	if ok != 1 {
		clear(out)
		return nil, ErrUnwrap
	}
	clear(p[mli:])
	return p[:mli:mli], nil
}

// ctLess returns 1 if x < y and 0 otherwise, in constant time; x and y must
// be below 2^63.
func ctLess(x, y uint64) uint64 {
	return (x - y) >> 63
}

// encryptSemiblocks runs the RFC 3394 §2.2.1 wrapping process (index form) in
// place: buf holds room for A in buf[:8] followed by the plaintext semiblocks.
func encryptSemiblocks(b cipher.Block, iv [8]byte, buf []byte) {
	var blk [16]byte
	copy(blk[:8], iv[:])
	n := uint64(len(buf)/8 - 1)
	for j := uint64(0); j < 6; j++ {
		for i := uint64(1); i <= n; i++ {
			r := buf[8*i : 8*i+8]
			copy(blk[8:], r)
			b.Encrypt(blk[:], blk[:])
			t := n*j + i
			binary.BigEndian.PutUint64(blk[:8], binary.BigEndian.Uint64(blk[:8])^t)
			copy(r, blk[8:])
		}
	}
	copy(buf[:8], blk[:8])
	clear(blk[:])
}

// decryptSemiblocks runs the RFC 3394 §2.2.2 unwrapping process in place and
// returns the recovered A; buf[8:] then holds the plaintext semiblocks.
func decryptSemiblocks(b cipher.Block, buf []byte) [8]byte {
	var blk [16]byte
	copy(blk[:8], buf[:8])
	n := uint64(len(buf)/8 - 1)
	for j := uint64(6); j > 0; j-- {
		for i := n; i >= 1; i-- {
			r := buf[8*i : 8*i+8]
			t := n*(j-1) + i
			binary.BigEndian.PutUint64(blk[:8], binary.BigEndian.Uint64(blk[:8])^t)
			copy(blk[8:], r)
			b.Decrypt(blk[:], blk[:])
			copy(r, blk[8:])
		}
	}
	var a [8]byte
	copy(a[:], blk[:8])
	clear(blk[:])
	clear(buf[:8])
	return a
}
