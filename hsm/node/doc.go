// Package node is one simulated HSM, modelled on an AWS CloudHSM hardware
// security module: users and sessions, keys with CloudHSM's attributes and
// ownership rules, FIPS policy, the wrapping and encryption mechanisms of the
// hsm contract, a masking key shared with clones, and a hash-chained audit
// log. A Node implements hsm.Backend; the sessions it returns implement
// hsm.Session. The Peer* methods are for the cluster layer (replication,
// anti-entropy, backups), never for users.
//
// # Storage
//
// Each node is one bbolt file holding its options, users (PBKDF2-SHA256
// password hashes), token keys, an index of key ids, and the audit log.
// Key material at rest is sealed with AES-256-GCM under a per-file storage
// key, and the lineage secret (from which the masking key is derived with
// HKDF-SHA256) is sealed the same way. Both of those keys are stored in the
// same file: this is a faithful simulation, not a security boundary. Anyone
// who can read the file can recover every key in it.
//
// Session keys live in memory only, belong to the session that made them and
// are destroyed at Logout or Close.
//
// # Concurrency and performance
//
// Every method is safe for concurrent use. After Open, token keys are held
// in memory (decrypted; parsed RSA keys and expanded AES ciphers are cached
// per key), so cryptographic operations read no disk and take only a read
// lock on the key map, and only for as long as a map lookup takes. Crypto
// runs outside every lock. Writes — and the audit records of operations that
// change nothing — go through bbolt's DB.Batch so that concurrent operations
// share one fsync; the functions given to Batch may run more than once, so
// they decide everything (handles, policy checks, counters) from the
// transaction they run in and only touch memory once the transaction has
// committed. Each write carries a revision number so that in-memory updates
// that arrive out of order are applied in commit order.
//
// At most MaxConcurrentOps operations run at once; past that an operation
// fails at once with hsm.CodeThrottled (the cluster client retries, this
// layer does not). SetFault injects outages, throttling and latency for
// tests; injected latency is slept before any lock or slot is taken, so it
// models a network round trip rather than a busy HSM.
//
// # Audit
//
// Every operation, allowed or refused, appends a record (time, sequence
// number, user, opcode, handles, outcome; never key material or passwords)
// to a SHA-256 hash chain in the same transaction as the change it records.
// VerifyAudit walks the chain and names the first altered, missing or
// reordered record. The chain is unkeyed: it detects edits, not an attacker
// who recomputes every hash.
package node
