// Package migrate applies a migration plan: it moves each planned key from
// the source cluster to the target as a resumable job of the runner, with
// every step recorded in the journal.
//
// A transfer wraps the key on the source under a transport key made for the
// run, unwraps it on the target with the source key's label, id and
// attributes, compares check values, shares it with the same users and
// waits until it is on at least two HSMs of the target. A sync copies a key
// between clones as a masked object, keeping its handle.
//
// Exactly once: an HSM unwrap is not idempotent, and a crash can fall
// between the target's answer and the journal commit. So an item whose
// journal state is anything but pending has possibly acted before; its next
// attempt first looks on the target for a key with the planned identity (id
// and KCV) and adopts it instead of unwrapping again. The wrapped blob lives
// only in memory and never reaches the journal.
//
// Optional capabilities are asked for where an item needs them: masked
// objects for a sync, sharing for a key the plan shares, deletion for a
// target key whose check value is wrong. The package depends only on the
// hsm contract; internal/cli picks the backend.
package migrate
