package cluster

import (
	"context"
	"sync"

	"github.com/keymig/keymig/hsm"
)

// AuditReport is the result of checking one HSM's audit log.
type AuditReport struct {
	HSM     string `json:"hsm-id"`
	Records int    `json:"records"`           // records checked
	OK      bool   `json:"ok"`                // the hash chain is intact
	Problem string `json:"problem,omitempty"` // the first bad record and why
}

// VerifyAudit checks the hash-chained audit log of every HSM of the
// cluster, down ones included (the check reads the file, not the HSM).
func (c *Cluster) VerifyAudit(ctx context.Context) ([]AuditReport, error) {
	members := c.memberList()
	out := make([]AuditReport, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Go(func() {
			n, err := m.m.VerifyAudit()
			out[i] = AuditReport{HSM: m.id, Records: n, OK: err == nil}
			if err != nil {
				out[i].Problem = err.Error()
			}
		})
	}
	wg.Wait()
	return out, ctx.Err()
}

// AuditRecords calls fn for every audit record of HSM hsmID, in order.
func (c *Cluster) AuditRecords(ctx context.Context, hsmID string, fn func(hsm.AuditRecord) error) error {
	m := c.memberByID(hsmID)
	if m == nil {
		c.mu.RLock()
		_, err := c.cfg.selectHSMs(hsmID)
		c.mu.RUnlock()
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return m.m.Audit(fn)
}
