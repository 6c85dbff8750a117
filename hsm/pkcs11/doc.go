// Package pkcs11 drives a real HSM (any PKCS#11 token: a Luna partition,
// CloudHSM's client library, SoftHSM2) behind the hsm contract, on
// github.com/miekg/pkcs11. A token is addressed by an RFC 7512 URI
// (ParseURI):
//
//	pkcs11:token=legacy;object=payments?module-path=/usr/lib/softhsm/libsofthsm2.so
//
// token= (or serial=, slot-id=) picks the token; object=, id= and type=
// narrow the keys keymig sees; module-path= is the module. A URI with
// pin-value or pin-source is refused: PINs come from the environment, a
// private file or a prompt, as for every keymig backend, and are passed to
// C_Login exactly as given (CloudHSM's library takes user:password,
// SoftHSM a bare PIN). A wrong PIN (CKR_PIN_INCORRECT) is never retried,
// so the token's retry counter moves by one per keymig run.
//
// # Concurrency
//
// As ThalesIgnite/crypto11 documents for itself: a module is loaded and
// C_Initialize'd once per process, however many tokens of it are open (a
// registry keyed by module path, the only process-wide state here,
// because PKCS#11 is process-wide); C_Finalize follows the last Close.
// Each token is logged in once (C_Login on its first session; further
// Logins share it, after checking they give the same PIN). Every call to
// the module goes through the token's bounded pool of sessions
// (Options.Sessions, DefaultSessions by default), opened on demand and
// kept until logout, so at most that many calls are in flight and a
// worker pool larger than it simply waits. All methods are safe for
// concurrent use.
//
// # Keys and handles
//
// Keys are found once, with C_FindObjects over the key classes, and
// cached with their attributes, as the CloudHSM integration guide advises;
// keys this process makes or deletes update the cache, keys another
// program makes during a run are not seen. An object that says CKA_TOKEN
// false at the first listing is left out: this process has made no
// session object yet, so it is what a module killed mid-create leaves
// (SoftHSM writes an object's attributes one by one), not a key. PKCS#11 object handles are
// valid only inside one process, so a key's hsm.KeyRef, which plans and
// journals keep across runs, is derived from what identifies it on the
// token: SHA-256 over its class and CKA_ID (its CKA_LABEL when it has no
// id), shortened to 63 bits. Two keys of one class with the same id are
// told apart by check value, then by the order found; only such duplicates
// can change handle between runs, and plan refuses to move them.
//
// # Check values
//
// A secret key's KCV is CKA_CHECK_VALUE when the token keeps one; else it
// is computed inside the token, AES-ECB of a zero block, when the key may
// encrypt; else, for an extractable key, by a round trip inside the token
// (wrap under a session KEK of the token's own, unwrap as a session copy
// that may encrypt, compute, destroy the copy). A key pair's KCV is the
// SHA-1 of its public key, built from the public values the token shows.
// A key none of these reach has no KCV; plan says so.
//
// # What a token cannot do
//
// PKCS#11 has no owners, shares, masked objects or CloudHSM users: a
// Session implements the hsm core and KeyDeleter only, every key is the
// logged-in user's (UserName), and hsm.As reports the rest unsupported,
// so that plan says what will not be preserved. Mechanisms are those the
// token lists (C_GetMechanismList, C_GetMechanismInfo) among the ones this
// package drives: aes-kwp, aes-kw, rsa-oaep (with the hashes the token
// takes, probed), aes-gcm and rsa-pkcs. CKM_RSA_AES_KEY_WRAP is not driven
// yet; keys reach and leave a token by session-kek. Every unwrap failure
// is hsm.ErrUnwrapFailed. Retries: none here; the migration runner owns
// them.
package pkcs11
