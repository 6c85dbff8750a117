// Package journal is keymig's durable record of a job: a bbolt file that
// holds runs, the state of every item of a run, a lock record and events.
//
// The journal knows nothing of HSMs or keys. An item is an opaque record
// keyed by a string: its state, attempt count, last error, an opaque result
// (a migration stores the target handle there) and timestamps. Callers
// never store plaintext key material or PINs in it; Check rejects records
// that fail to parse but cannot, of course, read intent.
//
// A run is keyed by the caller (a migration uses its plan's digest), so
// running the same job again finds the same run and resumes it.
//
// # Concurrency and durability
//
// A Journal is safe for concurrent use. Item transitions (Run.Put) go
// through internal/boltgroup, so concurrent workers share one commit and
// one fsync, with no added delay when one writes alone; Options.BatchSize
// bounds a commit and is set to the worker count. A shared commit may run a
// write more than once, so every write here is a pure overwrite of a record
// computed before the commit. A transition has happened once Put returns
// nil, and not before. The points before and after that commit are the
// failpoints journal/before-commit and journal/after-commit.
//
// # Locking
//
// bbolt holds an exclusive flock on the file while it is open, so two
// processes can never write one journal at once. A lock record inside the
// file (run, host, pid, command, start) and the same record in a sidecar
// file FILE.lock tell a second process who holds it. When a process dies the
// operating system drops its flock; the next Open finds the stale record,
// logs that the holder died, and takes over. Unlock removes a record left
// by a dead process and refuses to remove a live one. The flock is only as
// good as the filesystem: keep journals on a local disk, not on NFS.
package journal
