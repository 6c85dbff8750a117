package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/urfave/cli/v2"
)

// hsmAuditOptions are the inputs of `keymig hsm audit show` and `verify`.
type hsmAuditOptions struct {
	clusterOptions
	HSM string // show: one HSM's log; empty = every HSM
}

// hsmAuditCommand is `keymig hsm audit`.
func hsmAuditCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "audit",
		Usage: "show or verify the HSMs' hash-chained audit logs",
		Description: `Every HSM keeps an append-only audit log: sequence number, time, user,
operation (login, generate, wrap, unwrap, share, delete, masked export and
insert, ...), key handles and outcome; never key material or passwords.
Each record carries the hash of the one before, so that altering, removing
or reordering a record breaks the chain. Like CloudHSM's audit logs, which
are read from CloudWatch rather than through an HSM login, these commands
read the cluster directory and need no PIN.`,
		Subcommands: []*cli.Command{
			{
				Name:  "show",
				Usage: "print the audit records of every HSM (or of --hsm ID)",
				Description: `Example:
  keymig hsm audit show --cluster ./hsm1
  keymig hsm audit show --cluster ./hsm1 --hsm hsm-3f2a9c --output json`,
				Flags: append(clusterFlags(false), &cli.StringFlag{Name: "hsm", Usage: "only this HSM's log"}),
				Action: func(c *cli.Context) error {
					co, err := e.clusterOptionsFrom(c, false)
					if err != nil {
						return err
					}
					return runHSMAuditShow(c.Context, e, hsmAuditOptions{clusterOptions: co, HSM: c.String("hsm")})
				},
			},
			{
				Name:  "verify",
				Usage: "check every HSM's audit hash chain; exit status 1 names the HSM and the first bad record",
				Description: `Example:
  keymig hsm audit verify --cluster ./hsm1`,
				Flags: clusterFlags(false),
				Action: func(c *cli.Context) error {
					co, err := e.clusterOptionsFrom(c, false)
					if err != nil {
						return err
					}
					return runHSMAuditVerify(c.Context, e, hsmAuditOptions{clusterOptions: co})
				},
			},
		},
	}
}

// auditRecord is one audit record with the HSM that wrote it.
type auditRecord struct {
	HSM string `json:"hsm-id"`
	hsm.AuditRecord
}

// runHSMAuditShow prints audit records, HSM by HSM, in sequence order.
func runHSMAuditShow(ctx context.Context, e *env, o hsmAuditOptions) error {
	stdout := e.stdout
	return withCluster(ctx, o.clusterOptions, func(cl *cluster.Cluster) error {
		var ids []string
		if o.HSM != "" {
			ids = []string{o.HSM}
		} else {
			for _, h := range cl.Info().HSMs {
				ids = append(ids, h.ID)
			}
		}
		var recs []auditRecord
		for _, id := range ids {
			err := cl.AuditRecords(ctx, id, func(r hsm.AuditRecord) error {
				recs = append(recs, auditRecord{HSM: id, AuditRecord: r})
				return nil
			})
			if err != nil {
				return inCluster(o.Dir, fmt.Errorf("read the audit log of HSM %s: %w", id, err))
			}
		}
		if o.Output == outputJSON {
			return writeJSON(stdout, struct {
				Cluster string        `json:"cluster"`
				Records []auditRecord `json:"records"`
			}{o.Dir, nonNil(recs)})
		}
		t := newTable(stdout, "HSM", "SEQ", "TIME", "USER", "OP", "KEYS", "TARGET", "OUTCOME")
		for _, r := range recs {
			handles := make([]string, len(r.Handles))
			for i, h := range r.Handles {
				handles[i] = h.String()
			}
			t.row(r.HSM, fmt.Sprint(r.Seq), r.Time.UTC().Format(time.RFC3339), r.User, r.Op, joinOrDash(handles), r.Target, r.Outcome)
		}
		return t.flush()
	})
}

// runHSMAuditVerify checks every HSM's audit chain and fails, naming the HSM
// and the first bad record, if any is broken.
func runHSMAuditVerify(ctx context.Context, e *env, o hsmAuditOptions) error {
	stdout := e.stdout
	return withCluster(ctx, o.clusterOptions, func(cl *cluster.Cluster) error {
		reports, err := cl.VerifyAudit(ctx)
		if err != nil {
			return inCluster(o.Dir, fmt.Errorf("verify audit logs: %w", err))
		}
		if o.Output == outputJSON {
			if err := writeJSON(stdout, struct {
				Cluster string                `json:"cluster"`
				OK      bool                  `json:"ok"`
				HSMs    []cluster.AuditReport `json:"hsms"`
			}{o.Dir, auditOK(reports), nonNil(reports)}); err != nil {
				return err
			}
		} else {
			t := newTable(stdout, "HSM", "RECORDS", "CHAIN", "PROBLEM")
			for _, r := range reports {
				chain := "ok"
				if !r.OK {
					chain = "BROKEN"
				}
				t.row(r.HSM, fmt.Sprint(r.Records), chain, r.Problem)
			}
			if err := t.flush(); err != nil {
				return err
			}
		}
		var broken []string
		for _, r := range reports {
			if !r.OK {
				broken = append(broken, fmt.Sprintf("HSM %s: %s", r.HSM, r.Problem))
			}
		}
		if len(broken) > 0 {
			return inCluster(o.Dir, errors.New("audit log tampered with or damaged: "+strings.Join(broken, "; ")))
		}
		return nil
	})
}

// auditOK reports whether every HSM's chain is intact.
func auditOK(reports []cluster.AuditReport) bool {
	for _, r := range reports {
		if !r.OK {
			return false
		}
	}
	return true
}
