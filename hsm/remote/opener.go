package remote

import (
	"crypto/tls"
	"fmt"
	"sort"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
)

// Opener is the cluster.Opener of a networked cluster: it opens each HSM
// as a Member at its address, so that cluster.Open over a client directory
// talks to the daemons. HSMs are made and removed where they are served
// (keymig hsm init, keymig hsm remove-hsm on the cluster's host), never
// through a client.
type Opener struct {
	// Addrs maps HSM ids to HOST:PORT.
	Addrs map[string]string
	// TLS returns the client TLS configuration for one HSM; nil speaks
	// plain HTTP/2, for tests of the protocol only.
	TLS func(hsmID, addr string) (*tls.Config, error)
}

var _ cluster.Opener = (*Opener)(nil)

// Create refuses: a networked cluster's HSMs are made on their host.
func (o *Opener) Create(dir string, s cluster.MemberSpec) (cluster.Member, error) {
	return nil, hsm.Errorf(hsm.CodeUnsupported, "create", 0, "HSM %s: HSMs of a networked cluster are made where they are served: run keymig hsm init or add-hsm on the cluster's host, not through client directory %s", s.ID, dir)
}

// Open returns the client of the HSM; it connects at its first call, so an
// HSM that is down does not stop the cluster from opening.
func (o *Opener) Open(dir string, s cluster.MemberSpec, _ time.Duration) (cluster.Member, error) {
	addr, ok := o.Addrs[s.ID]
	if !ok {
		known := make([]string, 0, len(o.Addrs))
		for id := range o.Addrs {
			known = append(known, id)
		}
		sort.Strings(known)
		return nil, hsm.Errorf(hsm.CodeNotFound, "open", 0, "client directory %s has no address for HSM %s (it knows %v): write it again with keymig hsm client-config", dir, s.ID, known)
	}
	var cfg *tls.Config
	if o.TLS != nil {
		var err error
		if cfg, err = o.TLS(s.ID, addr); err != nil {
			return nil, fmt.Errorf("HSM %s at %s: %w", s.ID, addr, err)
		}
	}
	return New(s.ID, addr, cfg), nil
}

// Remove refuses: a networked HSM's files are on its host.
func (o *Opener) Remove(dir, id string) error {
	return hsm.Errorf(hsm.CodeUnsupported, "remove", 0, "HSM %s: a networked HSM's files are on its host; stop its daemon and remove them there", id)
}
