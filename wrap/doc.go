// Package wrap implements the key-wrapping mechanisms keymig uses to move
// keys between HSMs, as pure functions over byte slices: nothing here reads
// files, talks to an HSM, logs, or keeps state, so every function is safe for
// concurrent use.
//
// Mechanisms and their wire formats:
//
//   - AES-KW (RFC 3394, NIST SP 800-38F KW): KeyWrap / KeyUnwrap. The
//     plaintext is a multiple of 8 bytes and at least 16; the blob is 8 bytes
//     longer. The 8-byte single-block form that RFC 3394 allows and SP 800-38F
//     does not is refused.
//   - AES-KWP (RFC 5649, SP 800-38F KWP): KeyWrapPad / KeyUnwrapPad, for 1 to
//     2^32 bytes. The blob is the plaintext padded to a multiple of 8, plus 8.
//     This is what `openssl enc -id-aes256-wrap-pad` and CKM_AES_KEY_WRAP_KWP
//     produce.
//   - RSA-OAEP (RFC 8017) with a chosen hash, an MGF1 hash that may differ
//     (many HSMs and cloud KMSs pair SHA-256 with MGF1-SHA-1) and an optional
//     label: WrapOAEP / UnwrapOAEP. The blob is exactly the modulus length.
//   - RSA-AES (PKCS#11 CKM_RSA_AES_KEY_WRAP, also AWS KMS
//     RSA_AES_KEY_WRAP_SHA_256 and Google Cloud KMS RSA_OAEP_*_SHA*_AES):
//     RSA-OAEP(ephemeral AES key) || AES-KWP(ephemeral key, payload). The first
//     part is exactly the modulus length, so a blob splits without a length
//     prefix. The ephemeral key is zeroed once used.
//
// Every unwrap function reports every failure — wrong key, wrong hash, wrong
// MGF1 hash, wrong label, truncated, extended or tampered blob, bad padding —
// as the single error ErrUnwrap, whose message never varies. Saying which step
// failed would hand an attacker a padding or integrity oracle, so callers must
// not try to refine it either. Wrap functions, which only handle the caller's
// own inputs, return descriptive errors.
//
// The package also computes key check values the way AWS CloudHSM does
// (KCVSecret, KCVPublic) and converts private keys to and from PKCS#8.
//
// Intermediate buffers and ephemeral keys are zeroed where the language makes
// that practical; Go cannot promise that no copy survives in memory (the
// garbage collector may move or keep data), so treat this as hygiene, not a
// guarantee.
package wrap

import "errors"

// ErrUnwrap is the one error every unwrap failure returns, whatever its cause.
var ErrUnwrap = errors.New("unwrap failed: the wrapped key, the unwrapping key or the mechanism parameters are wrong")

// ErrPayloadTooLarge reports that a payload does not fit in one RSA-OAEP block;
// errors.Is matches it against a *PayloadTooLargeError.
var ErrPayloadTooLarge = errors.New("payload too large for rsa-oaep")
