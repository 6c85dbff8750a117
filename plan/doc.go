// Package plan turns the inventories of a source and a target cluster into a
// migration plan: every selected source key classified as transfer, sync,
// skip or blocked (with a reason a user can act on), written as canonical
// JSON that carries its own SHA-256 digest and a digest of each cluster's
// relevant inventory.
//
// Building a plan is pure: Build takes inventories already listed (each
// cluster is listed once, never per key) and returns the plan, so the rules
// are table-tested without an HSM. A plan never holds key material.
//
// A plan file is trusted only after Read has checked its digest; Check
// compares the inventories a plan was made from with the clusters now, so
// that a stale plan is refused with what changed.
package plan
