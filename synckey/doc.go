// Package synckey keeps cloned HSM clusters in step, as CloudHSM's syncKey
// (cloudhsm_mgmt_util) and key replicate (CloudHSM CLI) do one key at a
// time, but for a whole cluster, resumably and on a schedule.
//
// # Diff
//
// A sync lists both clusters once (hsm.TakeInventory) and compares them
// with package clonediff, which matches keys by handle, shared by a cluster
// and its clones. Each key gets one rclone-check style row:
//
//	=  on both, the same key (check value, class, label, id, attributes,
//	   owner and shares)
//	+  on the source only: it will be copied
//	-  on the target only: deleted only when pruning is confirmed
//	*  on both but different: never overwritten; the row says which
//	   attributes or shares differ and on which side
//	!  cannot be synchronised, with the reason: the key is not yet
//	   synchronised across the source cluster (partial coverage or
//	   inconsistent copies), its owner or a share's user does not exist on
//	   the target, the logged-in users may not export or insert it, its id
//	   is taken on the target, or the target is full
//
// The rules are those of CloudHSM: a masked object can be inserted only by
// a crypto officer or the key's owner, and only where the owner and every
// user it is shared with exist.
//
// # Copy
//
// A sync is one run of a journal (bbolt, see package journal) driven by
// package runner. Its items are the + keys (and, with pruning, the - keys).
// Copying a key is: export it masked from the source, commit "inserting",
// insert the masked object into the target (idempotent for the same key
// under the same handle), then read it back: same check value, on at least
// min(2, HSMs) of the target. A run that did not finish (killed, or
// stopped by a signal) is resumed by the next sync with the same items, so
// a key is never copied twice nor left half-copied: until the read-back
// succeeds the item is not done, and the next attempt inserts again, which
// is harmless.
//
// Two syncs of the same pair at once are refused by the journal's lock.
//
// # Schedule
//
// Repeat runs a sync now and then every period with jitter, one run at a
// time; a signal between runs ends it at once, a signal during a run lets
// the run finish its keys in flight (the runner's rule) and then ends it.
//
// This package depends on the hsm contract, journal and runner only; the
// caller picks the backend and opens the sessions.
package synckey
