// Package cluster is the included HSM cluster: several simulated HSMs
// (hsm/node) behind the hsm contract, the way the AWS CloudHSM client
// presents a cluster to an application. The caller opens a directory, logs
// in once, and sees one HSM. It is a simulation for tests, demos and
// migrations between keymig's own clusters, not a security boundary.
//
// # Directory
//
// A cluster is a directory: cluster.json (cluster id, region, lineage id,
// HSMs with their availability zones, policy, creation time, the backup
// index and keys deleted while an HSM was away), one bbolt file per HSM
// (hsm-XXXXXXXXXXX.db) with its audit log beside it (.db.audit),
// faults.json (injected faults, so that the next process sees them) and
// backups/. Files are replaced atomically (temporary
// file, fsync, rename, fsync of the directory). Open takes an exclusive
// flock on DIR/.lock and writes who holds it (pid, host, command, time)
// into it; a second Open, from this process or another, waits up to
// OpenOptions.LockTimeout and then fails naming the holder.
//
// The lineage secret (32 random bytes made by Init) is stored only in the
// HSM files; the masking key that protects masked objects is derived from
// it, so a cluster and its clones, and only they, accept each other's
// masked objects.
//
// # Sessions, load balancing and key sync
//
// Login logs the user in to every reachable HSM (users are replicated).
// Operations on a token key run on one of the HSMs that hold it, chosen by
// the power of two choices on operations in flight; session keys stay on
// the HSM that made them. A token key created on one HSM (generate, import,
// unwrap, insert) is copied as a masked object to every other reachable HSM
// before the call returns (client-side sync). The client keeps a map of
// which HSMs hold which token keys: built by listing every HSM once, then
// kept up to date as it creates, copies and deletes keys.
//
// With the key availability check on (the default for two HSMs or more), a
// token key may be created and used only once it exists on at least 2
// HSMs; otherwise the call fails with hsm.QuorumError (use) or
// hsm.QuorumCreateError (create, which then leaves nothing behind). Before
// refusing a use, the client asks the HSMs again, since another process may
// have copied the key, and copies a key held by one HSM to a reachable HSM
// that lacks it. HSMs that miss a change while down are recorded in
// cluster.json as behind; Open syncs them once they are back. Coverage
// calls an HSM that is down "unreachable", not "missing". Sync is the server-side anti-entropy pass: it copies keys and users
// missing on an HSM from the others, e.g. after the HSM was down.
// ListKeys merges the HSMs' listings and reports each key's coverage: the
// HSMs that hold it, those that lack it, and the attributes or shares that
// differ between copies.
//
// # Failures and retries
//
// HSM answers are retried here and nowhere else in keymig: the jobs above
// (migrate, rotate, synckey, through package runner) never retry an HSM's
// answer, only a step of their own that time may cure (runner.Later). A
// throttled answer is retried with full-jitter exponential backoff (sleep =
// random(0, min(200ms, 2ms·2^n)), ThrottleAttempts tries in all), then
// returned. An HSM that answers unavailable, or does not answer within the
// call timeout, is set aside for a while and the operation moves to
// another HSM where that is safe: always for operations that make nothing,
// and for operations that make a key only if the HSM certainly did nothing
// (it refused before starting). When no HSM that can serve the call is
// left, the call waits for one to come back (full-jitter backoff from 50ms
// to 2s, for up to 5s) before it fails. A create whose outcome is unknown is
// not retried, since that could make the key twice: the error (code
// unavailable) says to look for the key before trying again. Whatever a
// call returns is final for it. Stats counts retries, throttling,
// failovers and quorum refusals.
//
// Changes to users reach every HSM; a change that reaches some reachable
// HSMs and not others returns an error naming them, rather than being
// half-applied silently. A user created while an HSM is down reaches it at
// the next Sync. A key deleted while an HSM is down is remembered in
// cluster.json, so that Sync deletes it there rather than copying it back.
//
// # Quorum authentication
//
// Each HSM enforces the user-management quorum itself and spends its own
// copy of a token: GenerateQuorumToken makes the token on one HSM and copies
// it to the others (PeerPutQuorumToken); registrations, the policy and
// approvals go to every HSM like other user changes. Quorum keys travel in
// the user records and the policy in the HSMs' options and cluster.json, so
// backups, restores and AddHSM keep both.
//
// # Concurrency
//
// A Cluster and its sessions are safe for concurrent use, and throughput
// comes from running many operations at once: a real HSM is a network round
// trip away. No cluster-wide lock is held across a call to an HSM; the
// client's locks guard only maps and counters. Sync, backups and membership
// changes are serialised with each other.
//
// # Backups and clones
//
// A backup is a snapshot of one HSM (users, token keys still under the
// masking key, policy), encrypted with AES-256-GCM under a key derived with
// HKDF from the lineage secret. A clear-text header carries the backup id,
// source cluster, region, lineage, time and counts, and is authenticated as
// the ciphertext's additional data. So that a backup can be restored into a
// new directory, as AWS restores one into a new cluster, the header also
// holds the lineage secret wrapped under a fixed "vendor" key compiled into
// keymig: this simulates the HSM vendor's key hierarchy and is not a
// security boundary. Restore makes a clone: a new cluster id, another
// directory and region, the same lineage, users and key handles. AddHSM and
// RemoveHSM take a backup first; AddHSM fills the new HSM from it, then
// syncs.
//
// # Faults
//
// SetFault records a fault (down, throttling, latency, fail-next) for an
// HSM in faults.json; Open applies the recorded faults and skips HSMs that
// are down. Cluster.SetFault also changes an open cluster at once.
package cluster
