// Package plan turns the inventories of a source and a target backend into
// a migration plan: every selected source key classified as transfer (by
// rsa-oaep, rsa-aes or session-kek), sync (a masked copy between clones),
// rotate (a master key that cannot leave its HSM: a new key on the target
// and its data keys re-encrypted under it), skip or blocked (with a reason
// a user can act on), written as canonical JSON that carries its own
// SHA-256 digest and a digest of each cluster's relevant inventory.
//
// Building a plan is pure: Build takes inventories already listed
// (hsm.TakeInventory, once per cluster, never per key) and returns the
// plan, so the rules are table-tested without an HSM. An inventory also
// says what its backend cannot do: a target that cannot share keys gets
// the keys without their shares, and the item says so (NotPreserved); only
// backends that both move masked objects are ever a clone pair. Between
// clones, keys are judged by package clonediff, the same rules synckey
// follows. A plan never holds key material.
//
// Options.Validate checks the options before any cluster is asked
// anything; errors name the option (OptionError), and the caller words its
// own flags (Options.Advice for the advice on blocked keys).
//
// A plan file is trusted only after Read has checked its digest;
// CheckFresh compares the inventories a plan was made from with the
// clusters now, so that a stale plan is refused with what changed.
package plan
