package rotate

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keymig/keymig/hsm"
)

// VerifyConfig is a check that a rotated file holds the same data keys as
// its input, compared by check value inside the HSMs.
type VerifyConfig struct {
	// Source holds the old master; Target the new one (nil: the source).
	Source Side
	Target *Side
	From   hsm.Filter
	To     hsm.Filter
	// In is the original data-key file, Rotated the output of rotate, and
	// Rejects (optional) its rejects file: input lines listed there are
	// expected to be missing from Rotated.
	In, Rotated, Rejects string
	// Workers is the number of records checked at once; default 64.
	Workers int
}

// VerifyReport is what a verification found.
type VerifyReport struct {
	Records    int64         `json:"records"`    // input records
	Verified   int64         `json:"verified"`   // same data key on both sides
	Rejected   int64         `json:"rejected"`   // listed in the rejects file
	Missing    int64         `json:"missing"`    // neither in the rotated file nor rejected
	Mismatched int64         `json:"mismatched"` // different data key, or does not unwrap
	Problems   []string      `json:"problems,omitempty"`
	Elapsed    time.Duration `json:"elapsed-ns"`
}

// OK reports whether every record was verified or knowingly rejected.
func (r VerifyReport) OK() bool { return r.Missing == 0 && r.Mismatched == 0 }

const maxProblems = 20

// pair is an input record and its rotated counterpart.
type pair struct {
	no, outNo int64
	in, out   Record
}

// Verify unwraps each input record under the old master and its rotated
// counterpart under the new one, each into a session object, and compares
// the check values the HSMs report; the session objects are deleted at
// once. Plaintext never leaves the HSMs. It streams both files.
func Verify(ctx context.Context, cfg VerifyConfig) (VerifyReport, error) {
	var rep VerifyReport
	start := time.Now()
	if cfg.Workers <= 0 {
		cfg.Workers = 64
	}
	rc := Config{Source: cfg.Source, Target: cfg.Target, From: cfg.From, To: cfg.To}
	from, to, err := Masters(ctx, &rc)
	if err != nil {
		return rep, err
	}
	dst := cfg.Source
	if cfg.Target != nil {
		dst = *cfg.Target
	}
	rejected := map[int64]bool{}
	if cfg.Rejects != "" {
		if err := readRejects(cfg.Rejects, rejected); err != nil {
			return rep, err
		}
	}
	in, err := os.Open(cfg.In)
	if err != nil {
		return rep, fmt.Errorf("data-key file: %w", err)
	}
	defer in.Close()
	out, err := os.Open(cfg.Rotated)
	if err != nil {
		return rep, fmt.Errorf("rotated file: %w", err)
	}
	defer out.Close()
	inR, outR := newLineReader(in), newLineReader(out)

	var mu sync.Mutex
	problem := func(format string, args ...any) {
		mu.Lock()
		if len(rep.Problems) < maxProblems {
			rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...))
		}
		mu.Unlock()
	}
	var verified, mismatched atomic.Int64
	var laneN atomic.Uint64
	check := func(p *pair) error {
		i := laneN.Add(1)
		s := cfg.Source.Sessions[i%uint64(len(cfg.Source.Sessions))]
		d := dst.Sessions[i%uint64(len(dst.Sessions))]
		if err := matchMaster(p.in.Master, from); err != nil {
			mismatched.Add(1)
			problem("%s line %d: %v", cfg.In, p.no, err)
			return nil
		}
		if err := matchMaster(p.out.Master, to); err != nil {
			mismatched.Add(1)
			problem("%s line %d: %v", cfg.Rotated, p.outNo, err)
			return nil
		}
		a, err := kcvInside(ctx, s, mech(p.in.Alg), from.Ref, p.in.Ciphertext)
		if err != nil {
			if errors.Is(err, hsm.ErrUnwrapFailed) {
				mismatched.Add(1)
				problem("%s line %d (id %q): does not unwrap under the old master %s", cfg.In, p.no, p.in.ID, from)
				return nil
			}
			return fmt.Errorf("source cluster %s: %w", cfg.Source.Name, err)
		}
		b, err := kcvInside(ctx, d, mech(p.out.Alg), to.Ref, p.out.Ciphertext)
		if err != nil {
			if errors.Is(err, hsm.ErrUnwrapFailed) {
				mismatched.Add(1)
				problem("%s line %d (id %q): does not unwrap under the new master %s", cfg.Rotated, p.outNo, p.out.ID, to)
				return nil
			}
			return fmt.Errorf("target cluster %s: %w", dst.Name, err)
		}
		if !bytes.Equal(a, b) {
			mismatched.Add(1)
			problem("%s line %d (id %q): the data key has check value %s, but %s line %d holds one with %s", cfg.In, p.no, p.in.ID, hsm.Bytes(a), cfg.Rotated, p.outNo, hsm.Bytes(b))
			return nil
		}
		verified.Add(1)
		return nil
	}

	const chunk = 1024
	pairs := make([]pair, 0, chunk)
	flush := func() error {
		var next atomic.Int64
		var wg sync.WaitGroup
		var first error
		var emu sync.Mutex
		for range min(cfg.Workers, len(pairs)) {
			wg.Go(func() {
				for {
					i := int(next.Add(1) - 1)
					if i >= len(pairs) {
						return
					}
					if err := check(&pairs[i]); err != nil {
						emu.Lock()
						if first == nil {
							first = err
						}
						emu.Unlock()
						return
					}
				}
			})
		}
		wg.Wait()
		pairs = pairs[:0]
		return first
	}

	var pending []byte // an output line read ahead but not yet matched
	var pendingNo int64
	var no, outNo int64
	for {
		raw, _, err := inR.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return rep, fmt.Errorf("reading %s: %w", cfg.In, err)
		}
		no++
		if isBlank(raw) {
			continue
		}
		rep.Records++
		if rejected[no] {
			rep.Rejected++
			continue
		}
		inRec, perr := ParseRecord(bytes.Clone(raw))
		if pending == nil {
			o, _, err := outR.next()
			if err != nil && err != io.EOF {
				return rep, fmt.Errorf("reading %s: %w", cfg.Rotated, err)
			}
			if err == nil {
				outNo++
				pending, pendingNo = bytes.Clone(o), outNo
			}
		}
		if perr != nil {
			rep.Missing++
			problem("%s line %d is not in %s: %v", cfg.In, no, cfg.Rotated, perr)
			continue
		}
		outRec, oerr := ParseRecord(pending)
		if pending == nil || oerr != nil || !SameShape(&inRec, &outRec) {
			rep.Missing++
			problem("%s line %d (id %q) has no counterpart at %s line %d", cfg.In, no, inRec.ID, cfg.Rotated, pendingNo)
			continue
		}
		pairs = append(pairs, pair{no: no, outNo: pendingNo, in: inRec, out: outRec})
		pending = nil
		if len(pairs) == chunk {
			if err := flush(); err != nil {
				return rep, err
			}
		}
		if ctx.Err() != nil {
			return rep, ctx.Err()
		}
	}
	if err := flush(); err != nil {
		return rep, err
	}
	if pending != nil {
		rep.Missing++
		problem("%s line %d matches no record of %s", cfg.Rotated, pendingNo, cfg.In)
	} else if _, _, err := outR.next(); err != io.EOF {
		rep.Missing++
		problem("%s has lines after the last record of %s", cfg.Rotated, cfg.In)
	}
	rep.Verified, rep.Mismatched = verified.Load(), mismatched.Load()
	rep.Elapsed = time.Since(start)
	return rep, nil
}

// kcvInside unwraps ct under key into a session object, reads the check
// value the HSM computed and deletes the object.
func kcvInside(ctx context.Context, s Session, m hsm.Mechanism, key hsm.KeyRef, ct []byte) ([]byte, error) {
	k, err := unwrapSession(ctx, s, m, key, ct)
	if err != nil {
		return nil, err
	}
	if err := drop(ctx, s, k.Ref); err != nil {
		return nil, fmt.Errorf("deleting session object %s: %w", k.Ref, err)
	}
	return k.KCV, nil
}

// readRejects collects the line numbers of a rejects file.
func readRejects(path string, into map[int64]bool) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("rejects file: %w", err)
	}
	defer f.Close()
	return eachLine(f, func(l []byte, _ int) error {
		if isBlank(l) {
			return nil
		}
		var r Reject
		if err := json.Unmarshal(l, &r); err != nil || r.Line <= 0 {
			return fmt.Errorf("rejects file %s: a line is not a reject record {\"line\": N, ...}", path)
		}
		into[r.Line] = true
		return nil
	})
}
