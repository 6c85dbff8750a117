package rotate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/keymig/keymig/hsm"
)

// checkOutput reads the input, the output and the rejects file side by
// side and checks that every record of the input is either the next output
// line — the same line with only master, alg and ciphertext changed, the
// master being the new one — or the next reject, with the counts given.
// It reads each file once as a stream.
func checkOutput(inPath, outPath, rejPath string, to resolved, alg string, wantRotated, wantRejected int64) error {
	in, err := os.Open(inPath)
	if err != nil {
		return fmt.Errorf("checking the output: %w", err)
	}
	defer in.Close()
	out, err := os.Open(outPath)
	if err != nil {
		return fmt.Errorf("checking the output: %w", err)
	}
	defer out.Close()
	var rejR *lineReader
	if rej, err := os.Open(rejPath); err == nil {
		defer rej.Close()
		rejR = newLineReader(rej)
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("checking the output: %w", err)
	}
	inR, outR := newLineReader(in), newLineReader(out)
	wantMaster := MasterJSON(to.Label, to.KCV)
	toKCV := hex.EncodeToString(to.KCV)

	// The next reject's line number, or 0.
	nextReject := func() (int64, error) {
		if rejR == nil {
			return 0, nil
		}
		l, _, err := rejR.next()
		if err == io.EOF {
			return 0, nil
		}
		if err != nil {
			return 0, err
		}
		var r Reject
		if err := json.Unmarshal(l, &r); err != nil || r.Line <= 0 {
			return 0, fmt.Errorf("%s: a line is not a reject record", rejPath)
		}
		return r.Line, nil
	}
	rejLine, err := nextReject()
	if err != nil {
		return err
	}
	var no, outNo, rotated, rejected int64
	for {
		raw, _, err := inR.next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("checking the output: %w", err)
		}
		no++
		if isBlank(raw) {
			continue
		}
		if rejLine == no {
			rejected++
			if rejLine, err = nextReject(); err != nil {
				return err
			}
			continue
		}
		inRec, err := ParseRecord(raw)
		if err != nil {
			return fmt.Errorf("checking the output: %s line %d is neither rotated nor rejected (%v)", inPath, no, err)
		}
		inRec.Raw = bytes.Clone(raw)
		o, _, err := outR.next()
		if err == io.EOF {
			return fmt.Errorf("checking the output: %s ends after %d records, but %s line %d has no counterpart", outPath, outNo, inPath, no)
		}
		if err != nil {
			return fmt.Errorf("checking the output: %w", err)
		}
		outNo++
		outRec, err := ParseRecord(o)
		if err != nil {
			return fmt.Errorf("checking the output: %s line %d: %v", outPath, outNo, err)
		}
		if !SameShape(&inRec, &outRec) {
			return fmt.Errorf("checking the output: %s line %d is not input line %d with a new master, alg and ciphertext: the order or other fields changed", outPath, outNo, no)
		}
		if outRec.Master.KCV != toKCV || outRec.Master.Label != to.Label {
			return fmt.Errorf("checking the output: %s line %d names master %q kcv %s, not the new master %s", outPath, outNo, outRec.Master.Label, outRec.Master.KCV, wantMaster)
		}
		if want := orAlg(alg, inRec.Alg); outRec.Alg != want {
			return fmt.Errorf("checking the output: %s line %d has alg %s, want %s", outPath, outNo, outRec.Alg, want)
		}
		rotated++
	}
	if _, _, err := outR.next(); err != io.EOF {
		return fmt.Errorf("checking the output: %s has more lines than the %d records rotated from %s", outPath, outNo, inPath)
	}
	if rejLine != 0 {
		return fmt.Errorf("checking the output: %s names line %d, which is not a rejected line of %s", rejPath, rejLine, inPath)
	}
	if rotated != wantRotated || rejected != wantRejected {
		return fmt.Errorf("checking the output: %d records rotated and %d rejected, the journal says %d and %d", rotated, rejected, wantRotated, wantRejected)
	}
	return nil
}

// CheckOutput checks a finished rotation that kept each record's own alg:
// every record of the input at in is, in order, either in the output at
// out with only master, alg and ciphertext changed and the master being
// to, or in the rejects file (which need not exist), and together they
// hold records records.
func CheckOutput(in, out, rejects string, to hsm.KeyInfo, records int64) error {
	var rejected int64
	if f, err := os.Open(rejects); err == nil {
		err = eachLine(f, func(raw []byte, _ int) error {
			if !isBlank(raw) {
				rejected++
			}
			return nil
		})
		f.Close()
		if err != nil {
			return fmt.Errorf("reading %s: %w", rejects, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return checkOutput(in, out, rejects, resolved{KeyInfo: to}, "", records-rejected, rejected)
}

func orAlg(alg, own string) string {
	if alg == "" {
		return own
	}
	return alg
}

// ScanReport is what a data-key file holds, as found by Scan.
type ScanReport struct {
	Lines    int64            `json:"lines"`
	Records  int64            `json:"records"`
	Blank    int64            `json:"blank"`
	Bad      int64            `json:"bad"`
	Algs     map[string]int64 `json:"algs"`
	Problems []string         `json:"problems,omitempty"` // the first few bad lines
	SHA256   string           `json:"sha256"`
}

// Scan reads the data-key file at path once, as a stream, and reports its
// records, its bad lines by number — malformed, an unknown alg, bad base64,
// a master other than master — and its SHA-256. It asks no HSM anything,
// so a ciphertext that does not unwrap is found only by a run.
func Scan(path string, master hsm.KeyInfo) (ScanReport, error) {
	rep := ScanReport{Algs: map[string]int64{}}
	f, err := os.Open(path)
	if err != nil {
		return rep, fmt.Errorf("data-key file: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	want := resolved{KeyInfo: master}
	err = eachLine(io.TeeReader(f, h), func(raw []byte, n int) error {
		rep.Lines++
		if isBlank(raw) {
			rep.Blank++
			return nil
		}
		r, err := ParseRecord(raw)
		if err == nil {
			err = matchMaster(r.Master, want)
		}
		if err != nil {
			rep.Bad++
			if len(rep.Problems) < maxProblems {
				rep.Problems = append(rep.Problems, (&recordError{Line: rep.Lines, ID: r.ID, Err: err}).Error())
			}
			return nil
		}
		rep.Records++
		rep.Algs[r.Alg]++
		return nil
	})
	if err != nil {
		return rep, fmt.Errorf("reading %s: %w", path, err)
	}
	rep.SHA256 = hex.EncodeToString(h.Sum(nil))
	return rep, nil
}

// DryRunReport is what a dry run found in a data-key file.
type DryRunReport struct {
	ScanReport
	From string `json:"from"`
	To   string `json:"to"`
}

// DryRun reads the data-key file and reports what rotate would do with
// it — every bad line by number — without asking any HSM to do anything
// but list keys.
func DryRun(ctx context.Context, cfg Config) (DryRunReport, error) {
	from, to, err := Masters(ctx, &cfg)
	if err != nil {
		return DryRunReport{}, err
	}
	scan, err := Scan(cfg.In, from.KeyInfo)
	return DryRunReport{ScanReport: scan, From: from.String(), To: to.String()}, err
}
