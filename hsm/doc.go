// Package hsm is the contract every HSM backend of keymig implements: the
// included single HSM (hsm/node), a cluster of them (hsm/cluster), and later
// remote HSMs and PKCS#11 tokens.
//
// The model follows AWS CloudHSM and PKCS#11. A key is named by a KeyRef, a
// 64-bit handle that is the same on every HSM of a cluster and of its clones.
// A key has a label (not unique), an id (unique per owner), a class, a type,
// a size, CloudHSM's boolean attributes, a key check value, an owner, the
// users it is shared with, and its coverage across the HSMs of a cluster.
//
// Backends are reached through a logged-in Session: the core every backend
// has, composed of small role interfaces (KeyGenerator, KeyFinder, Wrapper,
// ...) so that consumers can ask for just what they use. What not every
// backend can do (a PKCS#11 token has no owners, shares, masked objects or
// CloudHSM users) is an optional capability: Sharer, AttributeSetter,
// KeyDeleter, Masker, Users. Callers find them by type assertion or As,
// whose error has CodeUnsupported and names the backend; CapabilitiesOf
// lists them, and TakeInventory records them with a backend's keys.
// Quorum (M-of-N approval of user management, as CloudHSM's quorum
// token-sign) is one more optional capability, of the included HSM only.
// FullSession has them all: what a cluster needs of each member. Every
// method takes a context first and is safe for concurrent use.
//
// The types the members of a cluster exchange among themselves (Fault,
// AuditRecord, UserRecord) live here too, so that a local HSM, a remote one
// and a test double need no package of each other's.
//
// Errors are values of type *Error with a stable Code, so they survive a
// network hop and can be tested with errors.Is against the sentinels below
// (ErrNotFound, ErrThrottled, ...). Whether a retry can help is a property of
// the code (see Retryable). Unwrap failures of every cause are one error
// with one message, ErrUnwrapFailed, so that no padding or integrity oracle
// leaks through a backend.
//
// This package holds types and the helpers over them (As, TakeInventory);
// it has no implementation of an HSM.
package hsm
