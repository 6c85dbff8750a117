package rotate

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/journal"
)

// writer appends the batches' output and rejects to the partial files in
// batch order, whatever order the batches finish in.
type writer struct {
	mu         sync.Mutex
	turn       *sync.Cond
	next       int // the batch whose turn it is
	failed     int // lowest failed batch, or -1
	out, rej   *os.File
	outN, rejN int64
	closed     bool
}

// openWriter opens the partial files, keeps the longest prefix of done
// batches whose bytes are intact there, cuts both files after it, and
// returns a writer positioned after it and the number of batches kept.
func openWriter(outPath, rejPath string, done []*batchResult) (*writer, int, error) {
	keep, err := intactPrefix(partial(outPath), partial(rejPath), done)
	if err != nil {
		return nil, 0, err
	}
	var outN, rejN int64
	if keep > 0 {
		outN = done[keep-1].Out.Off + done[keep-1].Out.Len
		rejN = done[keep-1].Rej.Off + done[keep-1].Rej.Len
	}
	out, err := openAt(partial(outPath), outN)
	if err != nil {
		return nil, 0, err
	}
	rej, err := openAt(partial(rejPath), rejN)
	if err != nil {
		out.Close()
		return nil, 0, err
	}
	w := &writer{next: keep, failed: -1, out: out, rej: rej, outN: outN, rejN: rejN}
	w.turn = sync.NewCond(&w.mu)
	return w, keep, nil
}

// openAt opens (or creates) path and cuts it to n bytes.
func openAt(path string, n int64) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cannot write beside the output: %w", err)
	}
	if err := f.Truncate(n); err != nil {
		f.Close()
		return nil, fmt.Errorf("cannot cut %s to %d bytes: %w", path, n, err)
	}
	return f, nil
}

// intactPrefix counts the leading done batches whose bytes in outPath and
// rejPath are where the journal says, with the hashes it recorded. A
// missing file holds nothing.
func intactPrefix(outPath, rejPath string, done []*batchResult) (int, error) {
	out, err := os.Open(outPath)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer out.Close()
	rej, err := os.Open(rejPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, err
	}
	if rej != nil {
		defer rej.Close()
	}
	var outN, rejN int64
	for b, r := range done {
		if r == nil || r.Out.Off != outN || r.Rej.Off != rejN {
			return b, nil
		}
		if !extentIntact(out, r.Out) || (r.Rej.Len > 0 && (rej == nil || !extentIntact(rej, r.Rej))) {
			return b, nil
		}
		outN += r.Out.Len
		rejN += r.Rej.Len
	}
	return len(done), nil
}

func extentIntact(f *os.File, e extent) bool {
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f, e.Off, e.Len))
	return err == nil && n == e.Len && hex.EncodeToString(h.Sum(nil)) == e.SHA
}

// behindFailure reports whether a batch before b failed, so b can never be
// written in this run.
func (w *writer) behindFailure(b int) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.failed >= 0 && w.failed < b
}

// fail records that batch b will never be written in this run; the
// batches after it stop waiting.
func (w *writer) fail(b int) {
	w.mu.Lock()
	if w.failed < 0 || b < w.failed {
		w.failed = b
	}
	w.mu.Unlock()
	w.turn.Broadcast()
}

// write waits for batch b's turn, appends its output and rejects, and
// returns where they went.
func (w *writer) write(b int, out, rej []byte) (extent, extent, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.next != b && !(w.failed >= 0 && w.failed < b) && !w.closed {
		w.turn.Wait()
	}
	if w.next != b {
		return extent{}, extent{}, errBehind
	}
	oe, err := appendExtent(w.out, w.outN, out)
	if err == nil {
		var re extent
		re, err = appendExtent(w.rej, w.rejN, rej)
		if err == nil {
			w.outN += oe.Len
			w.rejN += re.Len
			w.next++
			w.turn.Broadcast()
			return oe, re, nil
		}
	}
	if w.failed < 0 || b < w.failed {
		w.failed = b
	}
	w.turn.Broadcast()
	return extent{}, extent{}, fmt.Errorf("writing %s: %w", w.out.Name(), err)
}

func appendExtent(f *os.File, off int64, data []byte) (extent, error) {
	if _, err := f.WriteAt(data, off); err != nil {
		return extent{}, err
	}
	sum := sha256.Sum256(data)
	return extent{Off: off, Len: int64(len(data)), SHA: hex.EncodeToString(sum[:])}, nil
}

// close syncs and closes both files. It is idempotent.
func (w *writer) close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	w.mu.Unlock()
	w.turn.Broadcast()
	var errs []error
	for _, f := range []*os.File{w.out, w.rej} {
		if err := f.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("writing %s: %w", f.Name(), err))
		}
		if err := f.Close(); err != nil {
			errs = append(errs, fmt.Errorf("writing %s: %w", f.Name(), err))
		}
	}
	return errors.Join(errs...)
}

// finish checks the complete output against the input, moves the files
// into place and fills in the report. placed says the files were already
// moved by an earlier attempt.
func (jb *job) finish(r *journal.Run, rep Report, done []*batchResult, placed bool) (Report, error) {
	cfg := &jb.cfg
	for _, d := range done {
		rep.Rotated += int64(d.Rotated)
		rep.Rejected += int64(d.Rejected)
		rep.Blank += int64(d.Blank)
	}
	if rep.Rotated+rep.Rejected+rep.Blank != jb.idx.Lines {
		return rep, fmt.Errorf("journal %s: the batches account for %d lines of %s, which has %d: move the journal away and run again", r.Journal().Path(), rep.Rotated+rep.Rejected+rep.Blank, cfg.In, jb.idx.Lines)
	}
	outPath, rejPath := partial(cfg.Out), partial(cfg.Rejects)
	if placed {
		outPath, rejPath = cfg.Out, cfg.Rejects
	}
	if err := checkOutput(cfg.In, outPath, rejPath, jb.to, cfg.Alg, rep.Rotated, rep.Rejected); err != nil {
		return rep, err
	}
	if !placed {
		if err := failpoint.Hit(failpoint.RotateBeforeRename); err != nil {
			return rep, err
		}
		if rep.Rejected > 0 {
			if err := os.Rename(rejPath, cfg.Rejects); err != nil {
				return rep, fmt.Errorf("moving the rejects into place: %w", err)
			}
		} else {
			os.Remove(rejPath)
		}
		if err := atomicfile.Rename(outPath, cfg.Out); err != nil {
			return rep, fmt.Errorf("moving the output into place: %w", err)
		}
		if err := failpoint.Hit(failpoint.RotateAfterRename); err != nil {
			return rep, err
		}
	}
	if rep.Rejected > 0 {
		rep.Rejects = cfg.Rejects
	}
	rep.Finished = true
	return rep, nil
}
