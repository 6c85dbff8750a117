// Package rotate re-encrypts data keys under a new master key (envelope
// re-encryption) without a data key ever reaching the host in plaintext.
//
// # Data-key files
//
// A data-key file is JSON Lines, one record per data key:
//
//	{"id": "...", "master": {"label": "...", "kcv": "a1b2c3"}, "alg": "aes-kwp", "ciphertext": "<base64>", ...}
//
// aes-kwp is RFC 5649 key wrap under the master; aes-gcm is the HSM's
// AES-GCM wrap (IV ‖ ciphertext ‖ tag, IV made inside the HSM). Rotation
// writes each line again with only the values of master, alg and ciphertext
// replaced: every other byte, unknown fields and their order included, is
// kept, and records keep their order. ParseRecord finds the three values by
// their byte ranges in the line rather than re-marshalling it.
//
// # Inside the HSMs
//
// Within one cluster, each data key is unwrapped under the old master into
// a session object, wrapped under the new master and the session object is
// deleted: three HSM calls, all on the HSM that holds the session's session
// objects. Across clusters, the source unwraps it into a session object and
// wraps it under a session KEK that was moved to the target once per lane
// by RSA-OAEP; the target unwraps it into a session object (whose check
// value must equal the source's) and wraps it under the new master. Session
// objects are deleted as soon as they are used, on both sides, and die with
// their session if keymig is killed. The old master is never changed.
//
// A lane is one session (one per side across clusters). Lanes spread the
// work over the HSMs of a cluster, since all session objects of a session
// live on one HSM; the caller logs in once per lane.
//
// # Jobs, journal and output
//
// A rotation is a runner job whose item is a batch of consecutive records
// (Config.Batch, 1000 by default), so a file of millions of records commits
// thousands of times. The run is keyed by the input's SHA-256, the two
// masters, the output alg and the batch size, so the same command resumes
// and a changed input starts anew. The bad-record policy is not part of
// the key: a run stopped by a bad record resumes under skip.
//
// Batches are worked on concurrently and written in order, by one writer,
// to FILE.partial (and rejected records to REJECTS.partial). Each batch's
// journal item records the offset, length and SHA-256 of the bytes it
// wrote to each file — never the ciphertexts. On resume, the longest prefix
// of done batches whose bytes are intact on disk is kept, the files are cut
// after it, and every later batch is done again. aes-kwp output is a
// function of the data key and the new master, so a redone batch writes
// the same bytes and a resumed run produces the same file as an
// uninterrupted one, byte for byte. aes-gcm output has a fresh IV per
// wrap: two runs, interrupted or not, differ in bytes but hold the same
// data keys, record for record (datakeys verify checks it by KCV). No side
// file of GCM ciphertexts is kept: nothing outside the output could make
// a redone GCM batch reproduce bytes no longer on disk, and nothing needs
// it to.
//
// When every batch is done, the output is read back and checked against the
// input line by line (every record is in the output with only the three
// values changed, or in the rejects file; counts agree), synced, and renamed
// into place.
//
// # Bad input
//
// A malformed line, an unknown alg, bad base64, a master that is not the
// old master (label or KCV), or a ciphertext that does not unwrap under it
// is a record error naming the line. OnError decides: stop the run at the
// first one, or write {"line", "error", "raw"} to the rejects file and go
// on. A record is never dropped silently. Scan finds every such problem but
// the last without asking an HSM anything; plan --datakeys uses it.
//
// # In a migration
//
// A migration plan's rotate item names a data-key file with its SHA-256
// (Config.WantSHA256): migrate makes the new master on the target and runs
// a rotation in the migration's own journal, so the file rotated is the
// file planned and a killed migration resumes the rotation where it was.
//
// # Memory
//
// The input is read twice as a stream (an index pass that hashes it and
// notes where each batch starts, and the final check) and once batch by
// batch; at most Workers batches of output are in memory at once. Memory
// does not grow with the file.
//
// The package depends on the hsm contract, the journal and the runner only;
// internal/cli picks the backend. A rotation asks of each session the core
// and deletion (Session), since every session object it makes is deleted
// as soon as it is used.
package rotate
