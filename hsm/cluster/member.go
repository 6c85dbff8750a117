package cluster

import (
	"context"

	"github.com/keymig/keymig/hsm"
)

// Member is what the cluster needs from one HSM: user logins for the
// caller's operations, and the peer API that HSMs of one cluster use among
// themselves (listing, masked copies, user records, snapshots). A local
// *node.Node satisfies it; a remote HSM client can too.
//
// A member whose call may have taken effect with its answer lost (a
// remote HSM whose connection broke mid-call) returns an error with a
// method OutcomeUnknown() bool that returns true: the cluster then does
// not make the key again elsewhere, and its listings wait for that HSM.
type Member interface {
	// ID is the HSM's id, as recorded in cluster.json.
	ID() string
	// Login opens a user session on this HSM.
	Login(ctx context.Context, c hsm.Credentials) (hsm.Session, error)
	// Close releases the HSM's file or connection.
	Close() error
	// Bootstrap creates the first crypto officer on a new, empty HSM.
	Bootstrap(ctx context.Context, officer hsm.Credentials) error
	// SetFault injects a fault (down, fail-next, throttling, latency).
	SetFault(f hsm.Fault)
	// VerifyAudit checks the audit log's hash chain and counts its records.
	VerifyAudit() (int, error)
	// Audit calls fn for every audit record in order.
	Audit(fn func(hsm.AuditRecord) error) error

	// PeerListKeys lists every token key the HSM holds, whoever owns it.
	PeerListKeys(ctx context.Context) ([]hsm.KeyInfo, error)
	// PeerExportMasked exports a key as a masked object. Safe to retry.
	PeerExportMasked(ctx context.Context, ref hsm.KeyRef) ([]byte, error)
	// PeerInsertMasked stores a masked object under its handle; inserting
	// the same key twice is not an error, so it is safe to retry.
	PeerInsertMasked(ctx context.Context, blob []byte) (hsm.KeyInfo, error)
	// PeerDeleteKey removes a key whoever owns it.
	PeerDeleteKey(ctx context.Context, ref hsm.KeyRef) error
	// PeerUsers lists the HSM's user records (password hashes, never passwords).
	PeerUsers(ctx context.Context) ([]hsm.UserRecord, error)
	// PeerPutUser stores a user record as is.
	PeerPutUser(ctx context.Context, u hsm.UserRecord) error
	// PeerPutQuorumToken stores a quorum token another HSM generated.
	PeerPutQuorumToken(ctx context.Context, t hsm.QuorumToken) error
	// Snapshot returns users, token keys (masked) and policy as JSON.
	Snapshot(ctx context.Context) ([]byte, error)
	// RestoreSnapshot replaces the HSM's users, keys and policy with a snapshot.
	RestoreSnapshot(ctx context.Context, snap []byte) error
}
