package hsm

import (
	"fmt"
	"time"
)

// What the HSMs of one cluster exchange among themselves and with the
// cluster layer, beyond a user's session: the types of the peer API that
// every member of a cluster (a local HSM, a remote one, a test double)
// speaks, so that none of them needs another's package.

// Fault is injected into an HSM for rehearsals and tests of the layers
// above it.
type Fault struct {
	Down     bool          `json:"down,omitempty"`      // every call fails as unavailable
	Throttle float64       `json:"throttle,omitempty"`  // fraction of calls answered "throttled"
	Latency  time.Duration `json:"latency,omitempty"`   // added to every call: a network round trip
	FailNext int           `json:"fail-next,omitempty"` // the next N calls fail as unavailable
}

// IsZero reports whether f injects nothing.
func (f Fault) IsZero() bool { return f == Fault{} }

// String describes the fault for listings: "none", or "down throttle=0.2 ...".
func (f Fault) String() string {
	if f.IsZero() {
		return "none"
	}
	s := ""
	add := func(p string) {
		if s != "" {
			s += " "
		}
		s += p
	}
	if f.Down {
		add("down")
	}
	if f.Throttle > 0 {
		add(fmt.Sprintf("throttle=%g", f.Throttle))
	}
	if f.Latency > 0 {
		add("latency=" + f.Latency.String())
	}
	if f.FailNext > 0 {
		add(fmt.Sprintf("fail-next=%d", f.FailNext))
	}
	return s
}

// Validate refuses a fault that cannot be injected.
func (f Fault) Validate() error {
	if f.Throttle < 0 || f.Throttle > 1 {
		return Errorf(CodeInvalidInput, "fault", 0, "throttle %g: want a fraction between 0 and 1", f.Throttle)
	}
	if f.Latency < 0 || f.FailNext < 0 {
		return Errorf(CodeInvalidInput, "fault", 0, "latency and fail-next must not be negative")
	}
	return nil
}

// AuditRecord is one entry of an HSM's hash-chained audit log. It never
// holds key material or passwords.
type AuditRecord struct {
	Seq     uint64    `json:"seq"`
	Time    time.Time `json:"time"`
	User    string    `json:"user"`              // who acted; "peer" for the cluster layer
	Op      string    `json:"op"`                // login, login-failed, generate, wrap, ...
	Handles []KeyRef  `json:"handles,omitempty"` // keys involved
	Target  string    `json:"target,omitempty"`  // user acted upon (user management, share), or attribute name
	Outcome string    `json:"outcome"`           // "ok" or the error code
	Prev    string    `json:"prev"`              // hex SHA-256 of the previous record
	Hash    string    `json:"-"`                 // hex SHA-256 of Prev ‖ this record's JSON; filled in when read
}

// UserRecord is a user as the HSMs of a cluster copy it among themselves:
// a password hash, never a password.
type UserRecord struct {
	Name       string `json:"name"`
	Role       Role   `json:"role"`
	Hash       []byte `json:"hash"`                 // PBKDF2-SHA256(password, Salt, Iterations), 32 bytes
	Salt       []byte `json:"salt"`                 // 16 random bytes
	Iterations int    `json:"iterations"`           // PBKDF2 iterations of Hash
	Failures   int    `json:"failures"`             // consecutive failed logins
	Locked     bool   `json:"locked"`               // set after too many failures; a password change clears it
	QuorumKey  []byte `json:"quorum-key,omitempty"` // registered quorum public key, DER SubjectPublicKeyInfo
}
