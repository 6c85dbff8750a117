package hsm

import (
	"context"
	"fmt"
	"time"
)

// Backend is an HSM or a cluster of HSMs that users log in to.
type Backend interface {
	// Login authenticates a user. Failures of any cause (unknown user,
	// wrong password) give one permission error; a user locked after too
	// many failures gets an error that says so.
	Login(ctx context.Context, c Credentials) (Session, error)
	// Close releases the backend's files and connections. Sessions opened
	// from it must not be used afterwards.
	Close() error
}

// Session is a logged-in user's view of an HSM or cluster: the core that
// every backend has, a PKCS#11 token as much as the included cluster. All
// methods are safe for concurrent use. The user's role and ownership decide
// what each call may do, as in CloudHSM.
//
// What not every backend can do is an optional capability, a separate
// interface a session may also implement: Sharer, AttributeSetter,
// KeyDeleter, Masker and Users. Callers discover them with a type
// assertion, or with As, whose error names the backend and what it lacks.
type Session interface {
	KeyGenerator
	KeyFinder
	Wrapper
	Unwrapper
	Cipher
	PublicKeys
	// Info describes the cluster (or single HSM) behind the session.
	Info(ctx context.Context) (ClusterInfo, error)
	// User is the logged-in user's name and role.
	User() User
	// Logout ends the session and destroys its session keys. It is
	// idempotent.
	Logout(ctx context.Context) error
}

// FullSession is a session with every optional capability, as a CloudHSM
// cluster gives (the included one, local or remote): what a cluster needs
// from each of its members, and what the CloudHSM conformance suite tests.
type FullSession interface {
	Session
	Sharer
	AttributeSetter
	KeyDeleter
	Masker
	Users
}

// Capabilities says which optional capabilities a session has.
type Capabilities struct {
	Share        bool `json:"share"`         // Sharer
	SetAttribute bool `json:"set-attribute"` // AttributeSetter
	Delete       bool `json:"delete"`        // KeyDeleter
	Masked       bool `json:"masked"`        // Masker: masked export and insert, between clones
	Users        bool `json:"users"`         // Users: CloudHSM users and roles
}

// CapabilitiesOf reports the optional capabilities s implements.
func CapabilitiesOf(s Session) Capabilities {
	_, share := s.(Sharer)
	_, attr := s.(AttributeSetter)
	_, del := s.(KeyDeleter)
	_, masked := s.(Masker)
	_, users := s.(Users)
	return Capabilities{Share: share, SetAttribute: attr, Delete: del, Masked: masked, Users: users}
}

// BackendNamer is implemented by sessions that can say what they are, for
// errors ("PKCS#11 token legacy", "keymig cluster cluster-abc").
type BackendNamer interface {
	BackendName() string
}

// BackendName is what s says it is, or a description of its type.
func BackendName(s Session) string {
	if n, ok := s.(BackendNamer); ok {
		return n.BackendName()
	}
	return fmt.Sprintf("a %T backend", s)
}

// As returns s as the capability T (Sharer, Masker, ...), or an
// unsupported error that names the backend and what it cannot do, in the
// words of doing (e.g. "share keys").
func As[T any](s Session, doing string) (T, error) {
	if c, ok := s.(T); ok {
		return c, nil
	}
	var zero T
	return zero, Errorf(CodeUnsupported, "", 0, "%s cannot %s", BackendName(s), doing)
}

// KeyGenerator makes new keys inside the HSM.
type KeyGenerator interface {
	// GenerateKey makes a secret (AES) key owned by the caller.
	// Not idempotent: each call makes a new key.
	GenerateKey(ctx context.Context, spec KeySpec) (KeyInfo, error)
	// GenerateKeyPair makes an RSA or EC key pair owned by the caller.
	// Not idempotent.
	GenerateKeyPair(ctx context.Context, spec KeyPairSpec) (pub, priv KeyInfo, err error)
}

// KeyPairSpec says which key pair to generate; each half has its own
// template (label, id, attributes), as in CloudHSM CLI.
type KeyPairSpec struct {
	Type    KeyType  `json:"key-type"`        // rsa or ec
	Bits    int      `json:"size-bits"`       // RSA modulus size
	Curve   string   `json:"curve,omitempty"` // EC: P-256 or P-384
	Public  Template `json:"public"`
	Private Template `json:"private"`
}

// KeyFinder lists keys. A crypto user sees the keys it owns and those shared
// with it; a crypto officer sees every key.
type KeyFinder interface {
	// ListKeys returns the keys f matches, ordered by handle. It reads the
	// whole inventory at once: callers cache the result rather than look
	// keys up one at a time.
	ListKeys(ctx context.Context, f Filter) ([]KeyInfo, error)
	// GetKey returns one key by handle, or a not-found error.
	GetKey(ctx context.Context, ref KeyRef) (KeyInfo, error)
}

// Wrapper exports keys encrypted under a wrapping key.
type Wrapper interface {
	// WrapKey returns the payload key encrypted under the wrapping key. Only
	// the payload's owner may wrap it; the payload must be extractable, the
	// wrapping key must have wrap, and a wrap-with-trusted payload needs a
	// trusted wrapping key. Safe to retry.
	WrapKey(ctx context.Context, r WrapRequest) ([]byte, error)
}

// Unwrapper imports keys.
type Unwrapper interface {
	// UnwrapKey decrypts the blob with the unwrapping key and stores the key
	// inside as a new key owned by the caller. Any failure to decrypt is
	// ErrUnwrapFailed. Not idempotent: a retry after an unknown outcome may
	// make a second key, so callers look for the first one before retrying.
	UnwrapKey(ctx context.Context, r UnwrapRequest) (KeyInfo, error)
}

// Cipher encrypts and decrypts data with a key that stays inside the HSM.
type Cipher interface {
	// Encrypt encrypts with the key's encrypt attribute. For aes-gcm the IV
	// is made inside the HSM and the output is IV ‖ ciphertext ‖ tag.
	Encrypt(ctx context.Context, key KeyRef, m Mechanism, p Params, plaintext []byte) ([]byte, error)
	// Decrypt reverses Encrypt; it needs the key's decrypt attribute.
	Decrypt(ctx context.Context, key KeyRef, m Mechanism, p Params, ciphertext []byte) ([]byte, error)
}

// Sharer shares keys with other crypto users; only the owner may.
type Sharer interface {
	// ShareKey lets user use the key as its attributes allow. Idempotent.
	ShareKey(ctx context.Context, key KeyRef, user string) error
	// UnshareKey withdraws a share. Idempotent.
	UnshareKey(ctx context.Context, key KeyRef, user string) error
}

// AttributeSetter changes a key's attributes; only the owner may, only on a
// modifiable key, and only for attributes that can be changed by hand
// (trusted needs a crypto officer; wrap-with-trusted and modifiable change
// in one direction only).
type AttributeSetter interface {
	// SetAttribute sets one boolean attribute. Idempotent.
	SetAttribute(ctx context.Context, key KeyRef, a Attr, v bool) error
}

// KeyDeleter deletes keys; only the owner may, and only a destroyable key.
type KeyDeleter interface {
	// DeleteKey deletes the key on every HSM. Deleting a key that is
	// already gone returns a not-found error.
	DeleteKey(ctx context.Context, key KeyRef) error
}

// PublicKeys moves public keys in and out as PEM.
type PublicKeys interface {
	// ExportPublicKey returns the public half of a key pair as a PEM
	// SubjectPublicKeyInfo. Any user who can see the key may export it.
	ExportPublicKey(ctx context.Context, key KeyRef) ([]byte, error)
	// ImportPublicKey stores a PEM public key as a new public-key object.
	// Not idempotent.
	ImportPublicKey(ctx context.Context, pem []byte, t Template) (KeyInfo, error)
}

// Masker moves keys between HSMs that share a masking key: the HSMs of one
// cluster and of its clones. Non-extractable keys move this way too.
type Masker interface {
	// ExportMasked returns the key encrypted under the masking key, with its
	// handle, attributes, owner and shares. The owner or a crypto officer
	// may export. Safe to retry.
	ExportMasked(ctx context.Context, key KeyRef) ([]byte, error)
	// InsertMasked stores a masked object under its original handle. A
	// blob from another lineage fails with an integrity error; a handle that
	// already holds the same key is not an error (the insert is idempotent),
	// a handle holding another key is an exists error.
	InsertMasked(ctx context.Context, blob []byte) (KeyInfo, error)
}

// Users manages users; only crypto officers may create, delete or change
// other users, and every user may change its own password.
type Users interface {
	// CreateUser adds a user; an existing name is an exists error.
	CreateUser(ctx context.Context, name string, role Role, password string) error
	// DeleteUser removes a user who owns no keys.
	DeleteUser(ctx context.Context, name string) error
	// ChangePassword sets a new password and unlocks the user.
	ChangePassword(ctx context.Context, name, password string) error
	// ListUsers returns every user, ordered by name.
	ListUsers(ctx context.Context) ([]User, error)
}

// ClusterInfo describes a cluster (a single HSM is a cluster of one).
type ClusterInfo struct {
	ID      string    `json:"cluster-id"`
	Region  string    `json:"region"`
	Lineage string    `json:"lineage"` // public identifier shared by a cluster and its clones
	HSMs    []HSMInfo `json:"hsms"`
	Policy  Policy    `json:"policy"`
	Keys    int       `json:"token-keys"` // token keys stored, against Policy.KeyCapacity
	Created time.Time `json:"created"`
}

// HSMInfo describes one HSM of a cluster.
type HSMInfo struct {
	ID    string `json:"hsm-id"`
	AZ    string `json:"availability-zone"`
	State string `json:"state"` // active, down, degraded
}

// Policy is the cluster's configuration that callers plan against.
type Policy struct {
	FIPS                 bool `json:"fips"`
	KeyCapacity          int  `json:"key-capacity"`
	KeyAvailabilityCheck bool `json:"key-availability-check"`
	MaxConcurrentOps     int  `json:"max-concurrent-ops"` // per HSM
	// KDFIterations is the PBKDF2-SHA256 cost of password hashes set from
	// now on; 0 means the HSM's default.
	KDFIterations int `json:"kdf-iterations,omitempty"`
	// QuorumUserManagement is M of the user-management quorum policy;
	// 0 or 1 means no quorum token is needed.
	QuorumUserManagement int `json:"quorum-user-management,omitempty"`
}
