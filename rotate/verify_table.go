package rotate

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm"
)

// TableVerifyConfig is a check of every row of a data-key table inside
// the HSMs: each row must unwrap under the master it names, the old one
// (in Source) or the new one (in Target, or Source).
type TableVerifyConfig struct {
	Source   Side
	Target   *Side
	From, To hsm.Filter
	Table    Table
	// Batch is the rows per page; default 1000. Workers bounds the rows
	// checked at once; default 64.
	Batch, Workers int
}

// TableVerifyReport is what a table check found.
type TableVerifyReport struct {
	Table string `json:"table"`
	Rows  int64  `json:"rows"`
	// UnderOld and UnderNew count the rows that unwrap under each master.
	UnderOld int64 `json:"under-old"`
	UnderNew int64 `json:"under-new"`
	// Bad counts rows that do not: another master, a NULL, an unknown alg,
	// a ciphertext that does not unwrap.
	Bad      int64    `json:"bad"`
	Problems []string `json:"problems,omitempty"`
	// Fingerprint is the SHA-256 of every row's key and data-key check
	// value, in key order: the same before and after a rotation that kept
	// every data key, whichever master each row is under.
	Fingerprint string        `json:"fingerprint"`
	Elapsed     time.Duration `json:"elapsed-ns"`
}

// OK reports whether every row unwraps under the new master.
func (r TableVerifyReport) OK() bool { return r.Bad == 0 && r.UnderOld == 0 }

// VerifyTable unwraps every row into a session object under the master it
// names, reads the check value the HSM computes and deletes the object.
// Plaintext never leaves the HSMs.
func VerifyTable(ctx context.Context, cfg TableVerifyConfig) (TableVerifyReport, error) {
	start := time.Now()
	rep := TableVerifyReport{Table: cfg.Table.String()}
	if cfg.Batch <= 0 {
		cfg.Batch = 1000
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 64
	}
	rc := Config{Source: cfg.Source, Target: cfg.Target, From: cfg.From, To: cfg.To}
	from, to, err := Masters(ctx, &rc)
	if err != nil {
		return rep, err
	}
	dst := targetOf(cfg.Source, cfg.Target)
	fp := sha256.New()
	var after *string
	var mu sync.Mutex
	bad := func(key string, format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		rep.Bad++
		if len(rep.Problems) < maxProblems {
			rep.Problems = append(rep.Problems, fmt.Sprintf("row %q: ", key)+fmt.Sprintf(format, args...))
		}
	}
	for {
		rows, err := cfg.Table.Page(ctx, after, cfg.Batch, "")
		if err != nil {
			return rep, err
		}
		if len(rows) == 0 {
			break
		}
		k := rows[len(rows)-1].Key
		after = &k
		kcvs := make([]hsm.Bytes, len(rows))
		err = forEach(ctx, len(rows), cfg.Workers, func(i int) error {
			row := &rows[i]
			side, m, which := cfg.Source, from, &rep.UnderOld
			switch {
			case row.Null != "":
				bad(row.Key, "the column %s is NULL", row.Null)
				return nil
			case row.Alg != AlgKWP && row.Alg != AlgGCM:
				bad(row.Key, "unknown alg %q", row.Alg)
				return nil
			case row.Master.KCV == to.KCV.String():
				side, m, which = dst, to, &rep.UnderNew
			case row.Master.KCV != from.KCV.String():
				bad(row.Key, "its master kcv %s is neither the old master's %s nor the new one's %s", row.Master.KCV, from.KCV, to.KCV)
				return nil
			}
			s := side.Sessions[i%len(side.Sessions)]
			kcv, err := kcvInside(ctx, s, mech(row.Alg), m.Ref, row.Ciphertext)
			if errors.Is(err, hsm.ErrUnwrapFailed) {
				bad(row.Key, "does not unwrap under %s", m)
				return nil
			}
			if err != nil {
				return fmt.Errorf("cluster %s: %w", side.Name, err)
			}
			kcvs[i] = kcv
			mu.Lock()
			*which++
			mu.Unlock()
			return nil
		})
		if err != nil {
			return rep, err
		}
		for i, row := range rows {
			fmt.Fprintf(fp, "%s\x00%s\n", row.Key, kcvs[i])
		}
		rep.Rows += int64(len(rows))
	}
	rep.Fingerprint = hex.EncodeToString(fp.Sum(nil))
	rep.Elapsed = time.Since(start)
	return rep, nil
}
