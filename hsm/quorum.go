package hsm

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"time"
)

// Quorum (M of N) authentication, as CloudHSM CLI's quorum token-sign: with
// a policy M > 1, user management needs a token that M crypto officers have
// signed offline with their registered quorum keys (RSA, PKCS#1 v1.5 with
// SHA-256, what CloudHSM's RSA-2048 quorum keys and openssl dgst -sign
// make). The private keys never enter the HSM.

// QuorumService names what a quorum policy guards.
type QuorumService string

// ServiceUserManagement guards creating and deleting users, changing
// another user's password, and changing the quorum policy itself.
const ServiceUserManagement QuorumService = "user-management"

// QuorumTokenLifetime is how long a quorum token can be approved and used.
const QuorumTokenLifetime = 10 * time.Minute

// QuorumToken is what the officers sign: made by the HSM for one user and
// one service, it authorises one operation before it expires.
type QuorumToken struct {
	ID      Bytes         `json:"token-id"`
	Service QuorumService `json:"service"`
	User    string        `json:"username"` // who generated it and may spend it
	Lineage string        `json:"lineage"`  // the cluster (and clones) it is for
	Issued  time.Time     `json:"issued"`
	Expires time.Time     `json:"expires"`
}

// SignedBytes is the exact message an approval signs.
func (t QuorumToken) SignedBytes() []byte {
	b, _ := json.Marshal(t)
	return append([]byte("keymig-quorum-token-v1\n"), b...)
}

// QuorumApproval is one officer's signature of a token. Signer is the
// SHA-256 of the signing key's public half (DER SubjectPublicKeyInfo), by
// which the HSM finds the registered user.
type QuorumApproval struct {
	TokenID   Bytes `json:"token-id"`
	Signer    Bytes `json:"signer-key-sha256"`
	Signature Bytes `json:"signature"`
}

// QuorumKeyID is the SHA-256 of a public key's DER SubjectPublicKeyInfo.
func QuorumKeyID(pub crypto.PublicKey) (Bytes, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	h := sha256.Sum256(der)
	return h[:], nil
}

// SignQuorumToken signs t with an officer's private quorum key, offline.
func SignQuorumToken(t QuorumToken, key *rsa.PrivateKey) (QuorumApproval, error) {
	id, err := QuorumKeyID(&key.PublicKey)
	if err != nil {
		return QuorumApproval{}, err
	}
	h := sha256.Sum256(t.SignedBytes())
	sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, h[:])
	if err != nil {
		return QuorumApproval{}, fmt.Errorf("sign quorum token %s: %w", t.ID, err)
	}
	return QuorumApproval{TokenID: t.ID, Signer: id, Signature: sig}, nil
}

// Quorum is the optional capability of backends with quorum authentication.
type Quorum interface {
	// RegisterQuorumKey stores the caller's quorum public key (PEM, RSA of
	// 2048 bits or more); a user registers its own key only.
	RegisterQuorumKey(ctx context.Context, user string, publicPEM []byte) error
	// SetQuorumPolicy sets M for a service (1 turns quorum off); M may not
	// exceed the crypto officers with quorum keys. Changing it while M > 1
	// spends a token.
	SetQuorumPolicy(ctx context.Context, s QuorumService, m int) error
	// GenerateQuorumToken makes a token for the caller, a crypto officer.
	GenerateQuorumToken(ctx context.Context, s QuorumService) (QuorumToken, error)
	// ApproveQuorumToken submits M or more officers' approvals of one of
	// the caller's tokens; the next operation of the service spends it.
	ApproveQuorumToken(ctx context.Context, id Bytes, approvals []QuorumApproval) error
}
