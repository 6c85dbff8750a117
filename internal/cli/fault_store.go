package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/remote"
)

// faultStore is where keymig hsm fault reads and sets faults: the
// cluster directory's faults.json, which the next process to open the
// HSM files applies, or, through a client directory, the daemons
// themselves, which apply a fault at once for every client.
type faultStore interface {
	faults(ctx context.Context, hsms []hsm.HSMInfo) (map[string]hsm.Fault, error)
	setFault(ctx context.Context, id string, f hsm.Fault) error
	close()
}

func faultStoreFor(dir string) (faultStore, error) {
	if !isClientDir(dir) {
		return dirFaults(dir), nil
	}
	op, err := clusterMembers(dir)
	if err != nil {
		return nil, err
	}
	return &daemonFaults{dir: dir, opener: op, members: map[string]*remote.Member{}}, nil
}

// dirFaults are the faults recorded in a cluster directory.
type dirFaults string

func (d dirFaults) faults(context.Context, []hsm.HSMInfo) (map[string]hsm.Fault, error) {
	return cluster.Faults(string(d))
}

func (d dirFaults) setFault(_ context.Context, id string, f hsm.Fault) error {
	return cluster.SetFault(string(d), id, f)
}

func (dirFaults) close() {}

// daemonFaults are the faults of served HSMs, set and read through their
// daemons.
type daemonFaults struct {
	dir     string
	opener  cluster.Opener
	members map[string]*remote.Member
}

func (d *daemonFaults) member(id string) (*remote.Member, error) {
	if m, ok := d.members[id]; ok {
		return m, nil
	}
	m, err := d.opener.Open(d.dir, cluster.MemberSpec{ID: id}, 0)
	if err != nil {
		return nil, err
	}
	d.members[id] = m.(*remote.Member)
	return d.members[id], nil
}

func (d *daemonFaults) faults(ctx context.Context, hsms []hsm.HSMInfo) (map[string]hsm.Fault, error) {
	out := map[string]hsm.Fault{}
	for _, h := range hsms {
		m, err := d.member(h.ID)
		if err != nil {
			return nil, err
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		f, err := m.Fault(cctx)
		cancel()
		if hsm.CodeOf(err) == hsm.CodeUnavailable {
			continue // a daemon that is down has no fault to show; its state says down
		}
		if err != nil {
			return nil, fmt.Errorf("read the fault of HSM %s: %w", h.ID, err)
		}
		if !f.IsZero() {
			out[h.ID] = f
		}
	}
	return out, nil
}

func (d *daemonFaults) setFault(ctx context.Context, id string, f hsm.Fault) error {
	m, err := d.member(id)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return m.SetFaultContext(cctx, f)
}

func (d *daemonFaults) close() {
	for _, m := range d.members {
		m.Close()
	}
}
