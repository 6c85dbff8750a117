package rotate

import (
	"bytes"
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
	// Originals, for a rotation to a new table or column, reads the values
	// Table's rows were rotated from: each row under the new master must
	// hold the same data key as its original.
	Originals Table
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
	// Compared counts the rows under the new master found to hold the
	// data key of their original (with Originals).
	Compared int64 `json:"compared-with-original,omitempty"`
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
		var originals map[string]TableRow
		if cfg.Originals != nil {
			keys := make([]string, len(rows))
			for i, r := range rows {
				keys[i] = r.Key
			}
			got, err := cfg.Originals.Get(ctx, keys)
			if err != nil {
				return rep, err
			}
			originals = make(map[string]TableRow, len(got))
			for _, r := range got {
				originals[r.Key] = r
			}
		}
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
			if originals != nil && which == &rep.UnderNew {
				same, err := sameAsOriginal(ctx, cfg.Source.Sessions[i%len(cfg.Source.Sessions)], from, originals, row, kcv)
				if err != nil {
					return fmt.Errorf("cluster %s: %w", cfg.Source.Name, err)
				}
				if same != "" {
					bad(row.Key, "%s", same)
					return nil
				}
				mu.Lock()
				rep.Compared++
				mu.Unlock()
			}
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

// sameAsOriginal compares a rotated row's data-key check value with that
// of the value it was rotated from, unwrapped under the old master inside
// the HSM; it returns what is wrong, or "" when they match.
func sameAsOriginal(ctx context.Context, s Session, from resolved, originals map[string]TableRow, row *TableRow, kcv hsm.Bytes) (string, error) {
	orig, ok := originals[row.Key]
	switch {
	case !ok:
		return "its original row is gone", nil
	case orig.Null != "":
		return fmt.Sprintf("its original's column %s is NULL", orig.Null), nil
	case orig.Master.KCV != from.KCV.String():
		return fmt.Sprintf("its original is under master kcv %s, not the old master's %s", orig.Master.KCV, from.KCV), nil
	}
	okcv, err := kcvInside(ctx, s, mech(orig.Alg), from.Ref, orig.Ciphertext)
	if errors.Is(err, hsm.ErrUnwrapFailed) {
		return fmt.Sprintf("its original does not unwrap under %s", from), nil
	}
	if err != nil {
		return "", err
	}
	if !bytes.Equal(okcv, kcv) {
		return fmt.Sprintf("it holds data key kcv %s, its original %s: another data key", kcv, okcv), nil
	}
	return "", nil
}
