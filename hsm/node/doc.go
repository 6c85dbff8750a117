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
// password hashes), token keys and an index of key ids, and an append-only
// audit file beside it (AuditPath: the bbolt file's name + ".audit").
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
// runs outside every lock. Writes go through a group commit
// (internal/boltgroup) so that concurrent writes share one commit without
// waiting for a batch timer; the functions given to it may run more than
// once, so they decide everything (handles, policy checks,
// counters) from the transaction they run in and only touch memory once the
// transaction has committed. Each write carries a revision number so that
// in-memory updates that arrive out of order are applied in commit order.
//
// Audit records are appended to an in-memory buffer under one short lock
// (sequence number, JSON, SHA-256); a single flusher goroutine writes the
// whole buffer with one write and one fdatasync, at once again while more
// is buffered, so a busy node syncs its audit file back to back and an
// idle one not at all. Operations that change nothing (wrap, encrypt,
// sign, session objects, logout, refusals outside a transaction) do not
// wait for the disk; writes wait until their record is synced. Appenders
// wait only when 4 MiB are buffered.
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
// to a SHA-256 hash chain in the audit file: one line per record, the hex
// hash, a space and the record's JSON, where the hash is SHA-256 of the
// previous record's hash ‖ the JSON. The log's head (last sequence number
// and hash) is kept in the bbolt file too, so that records cut off the end
// are detected; it is written beside the flusher at most every 50 ms and at
// Close, only ever forward, so it may lag the file, never lead it. VerifyAudit walks the chain and names
// the first altered, missing or reordered record. The chain is unkeyed: it
// detects edits, not an attacker who recomputes every hash.
//
// Durability: a write's record is appended once its change is final in
// its transaction, just before the commit, so the audit file's sync and
// the bbolt commit run side by side; the write returns once both are on
// disk. A commit that fails after that is followed by a "rolled-back"
// record naming the record it undoes. A process killed while both are on
// their way may leave either one without the other: the record of a change
// that never committed, or a committed change whose record was not yet
// written. Records of operations that changed nothing have been
// answered before they are synced: a crash loses those not yet on disk,
// the flush in progress and what is buffered behind it (normally a few
// milliseconds of work, at most 4 MiB of records); the head's last update
// may be lost too. Either way the chain stays intact: whole lines are written,
// and Open cuts a torn last line (power lost in the middle of a write) and
// continues the chain from the file's last line, read from its tail only.
// If the file holds fewer records than the head (cut or deleted), new
// records continue after the head, so the gap stays visible. A failed
// write or sync fails the log: every later operation returns the storage
// error until the HSM is opened again. Files from before the audit log had
// its own file have their records moved to it at Open.
package node
