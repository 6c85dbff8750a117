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
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/runner"
)

// RunKind is the journal run kind of a rotation.
const RunKind = "rotate"

// OnError says what a run does with a bad record.
type OnError string

// The OnError policies.
const (
	Stop OnError = "stop" // stop the run at the first bad record
	Skip OnError = "skip" // write it to the rejects file and go on
)

// ParseOnError reads a bad-record policy: stop (also "") or skip.
func ParseOnError(s string) (OnError, error) {
	switch o := OnError(strings.ToLower(strings.TrimSpace(s))); o {
	case Stop, Skip:
		return o, nil
	case "":
		return Stop, nil
	}
	return "", fmt.Errorf("%q: want stop or skip", s)
}

// ParseAlg checks an alg name ("" keeps each record's own).
func ParseAlg(s string) (string, error) {
	switch a := strings.ToLower(strings.TrimSpace(s)); a {
	case "", AlgKWP, AlgGCM:
		return a, nil
	}
	return "", fmt.Errorf("alg %q: want aes-kwp or aes-gcm", s)
}

// Config is one rotation.
type Config struct {
	// Source holds the old master; its sessions are the lanes.
	Source Side
	// Target holds the new master; nil means the source cluster.
	Target *Side
	// From and To select the old and the new master.
	From, To hsm.Filter
	// In is the data-key file; Out the rotated file; Rejects the rejects
	// file (default Out + ".rejects").
	In, Out, Rejects string
	// Alg is the output alg; "" keeps each record's own.
	Alg string
	// OnError is the bad-record policy; default Stop.
	OnError OnError
	// Batch is the number of lines per journal item; default 1000.
	Batch int
	// Workers is the number of data keys in flight; default 64.
	Workers int
	// Progress is told about records (not batches); may be nil.
	Progress runner.Progress
	// Log receives warnings; may be nil.
	Log *slog.Logger
	// WantSHA256, if set, is the SHA-256 (hex) the input must have: the
	// digest a migration plan recorded, so that the file rotated is the
	// file planned.
	WantSHA256 string
}

// Report is what a rotation did, for the summary and the journal.
type Report struct {
	Run      string         `json:"run"`
	In       string         `json:"in"`
	Out      string         `json:"out"`
	Rejects  string         `json:"rejects,omitempty"`
	From     string         `json:"from"` // "label kcv handle"
	To       string         `json:"to"`
	Lines    int64          `json:"lines"`
	Batches  int            `json:"batches"`
	Rotated  int64          `json:"rotated"`  // records in the output
	Rejected int64          `json:"rejected"` // records in the rejects file
	Blank    int64          `json:"blank"`    // blank lines, not records
	Resumed  bool           `json:"resumed"`
	Redone   int            `json:"redone"` // done batches whose output was lost and was redone
	Finished bool           `json:"finished"`
	Summary  runner.Summary `json:"summary"`
	Elapsed  time.Duration  `json:"elapsed-ns"`
	Records  int64          `json:"records-this-run"`
}

// Rate is records rotated per second in this run.
func (r Report) Rate() float64 { return perSecond(r.Records, r.Elapsed) }

// perSecond is n per second of d (0 for no time).
func perSecond(n int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}

// targetOf is the side that holds the new master: dst, or src when nil.
func targetOf(src Side, dst *Side) Side {
	if dst != nil {
		return *dst
	}
	return src
}

// batchResult is a done batch's journal record: where its bytes went in
// each file and their hashes. It holds no ciphertext.
type batchResult struct {
	Line     int64  `json:"line"`
	Lines    int    `json:"lines"`
	Rotated  int    `json:"rotated"`
	Rejected int    `json:"rejected"`
	Blank    int    `json:"blank"`
	Out      extent `json:"out"`
	Rej      extent `json:"rejects"`
}

// extent is a byte range of a file and the SHA-256 of its bytes.
type extent struct {
	Off int64  `json:"off"`
	Len int64  `json:"len"`
	SHA string `json:"sha256"`
}

func itemKey(b int) string { return fmt.Sprintf("batch-%09d", b) }

// resolved is a master key found by its filter.
type resolved struct {
	hsm.KeyInfo
	cluster string
}

func (r resolved) String() string {
	return fmt.Sprintf("%q kcv %s (%s in %s)", r.Label, r.KCV, r.Ref, r.cluster)
}

// MasterRole says which master key a MasterError is about.
type MasterRole string

// The master keys a filter selects.
const (
	OldMaster MasterRole = "old master" // Config.From
	NewMaster MasterRole = "new master" // Config.To
	AnyMaster MasterRole = "master"     // GenerateConfig.Master
)

// MasterError says the filter of a master key did not select exactly one
// AES secret key. The CLI names the flag that holds the filter.
type MasterError struct {
	Role    MasterRole
	Cluster string
	Err     error
}

// Error names the cluster and the master.
func (e *MasterError) Error() string {
	return fmt.Sprintf("cluster %s: the %s: %v", e.Cluster, e.Role, e.Err)
}

// Unwrap returns what went wrong.
func (e *MasterError) Unwrap() error { return e.Err }

// findMaster selects the one key f matches in s.
func findMaster(ctx context.Context, s hsm.KeyFinder, name string, f hsm.Filter, role MasterRole) (resolved, error) {
	fail := func(err error) (resolved, error) {
		return resolved{}, &MasterError{Role: role, Cluster: name, Err: err}
	}
	keys, err := s.ListKeys(ctx, f)
	if err != nil {
		return fail(fmt.Errorf("listing keys: %w", err))
	}
	k, err := hsm.SelectOne(keys, f)
	if err != nil {
		return fail(err)
	}
	if k.Class != hsm.ClassSecret || k.Type != hsm.TypeAES {
		return fail(fmt.Errorf("selects %s, an %s %s: a master key is an AES secret key", k.Ref, k.Type, k.Class))
	}
	return resolved{KeyInfo: k, cluster: name}, nil
}

// Masters resolves the old and new master keys of cfg and checks they can
// do their jobs.
func Masters(ctx context.Context, cfg *Config) (from, to resolved, err error) {
	from, err = findMaster(ctx, cfg.Source.Sessions[0], cfg.Source.Name, cfg.From, OldMaster)
	if err != nil {
		return
	}
	dst := cfg.Source
	if cfg.Target != nil {
		dst = *cfg.Target
	}
	to, err = findMaster(ctx, dst.Sessions[0], dst.Name, cfg.To, NewMaster)
	if err != nil {
		return
	}
	if !from.Attrs.Unwrap {
		err = fmt.Errorf("the old master %s cannot unwrap (unwrap=false); its owner can set unwrap=true if it is modifiable", from)
		return
	}
	if !to.Attrs.Wrap {
		err = fmt.Errorf("the new master %s cannot wrap (wrap=false); its owner can set wrap=true if it is modifiable", to)
		return
	}
	return
}

// runID names the run: the input's content and every parameter that
// changes the output bytes of a batch. The bad-record policy is not one of
// them, so a run stopped by a bad record resumes under --on-error skip
// without redoing the batches before it (see checkPolicy).
func runID(idx *inputIndex, cfg *Config, from, to resolved) string {
	h := sha256.New()
	fmt.Fprintf(h, "rotate v2\n%s\n%s %s %s\n%s %s %s\n%s\n%d\n", idx.SHA256,
		from.cluster, from.Ref, from.KCV, to.cluster, to.Ref, to.KCV, cfg.Alg, cfg.Batch)
	return hex.EncodeToString(h.Sum(nil))[:32]
}

func (cfg *Config) defaults() {
	if cfg.Batch <= 0 {
		cfg.Batch = 1000
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 64
	}
	if cfg.OnError == "" {
		cfg.OnError = Stop
	}
	if cfg.Rejects == "" {
		cfg.Rejects = cfg.Out + ".rejects"
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
}

// partial is the name of the file being written for path.
func partial(path string) string { return path + ".partial" }

// job is one rotation being run.
type job struct {
	cfg      Config
	idx      *inputIndex
	from, to resolved
	master   []byte // the new master's JSON object
	in       *os.File
	w        *writer
	lanes    []*lane
	next     atomic.Uint64 // round-robin lane choice
	perBatch int
	records  atomic.Int64
	stop     context.CancelCauseFunc

	failMu    sync.Mutex
	failErr   error // the failure of the earliest failed batch
	failBatch int
}

// Run rotates cfg.In into cfg.Out as a run of journal j, resuming the run
// if it exists. It returns the report also recorded in the journal.
func Run(ctx context.Context, j *journal.Journal, cfg Config) (Report, error) {
	cfg.defaults()
	if cfg.Out == "" || cfg.In == "" {
		return Report{}, errors.New("rotate needs an input file and an output file")
	}
	if sameFile(cfg.In, cfg.Out) {
		return Report{}, fmt.Errorf("the input and the output are the same file %s: write the rotated keys elsewhere", cfg.In)
	}
	from, to, err := Masters(ctx, &cfg)
	if err != nil {
		return Report{}, err
	}
	if cfg.Target == nil && from.Ref == to.Ref {
		return Report{}, fmt.Errorf("the old and the new master are the same key %s: choose a new master", from)
	}
	idx, err := indexInput(cfg.In, cfg.Batch)
	if err != nil {
		return Report{}, err
	}
	if cfg.WantSHA256 != "" && idx.SHA256 != cfg.WantSHA256 {
		return Report{}, fmt.Errorf("data-key file %s: %w (its sha256 is %s, the plan recorded %s): run keymig plan again", cfg.In, ErrInputChanged, idx.SHA256[:12], cfg.WantSHA256[:min(12, len(cfg.WantSHA256))])
	}
	id := runID(idx, &cfg, from, to)
	rep := Report{Run: id, In: cfg.In, Out: cfg.Out, From: from.String(), To: to.String(), Lines: idx.Lines, Batches: len(idx.Batches)}
	meta := map[string]string{"in": cfg.In, "in-sha256": idx.SHA256, "out": cfg.Out, "rejects": cfg.Rejects,
		"from": from.String(), "to": to.String(), "alg": cfg.Alg, "on-error": string(cfg.OnError), "batch": fmt.Sprint(cfg.Batch)}
	r, info, resumed, err := j.Begin(id, RunKind, meta)
	if err != nil {
		return rep, err
	}
	rep.Resumed = resumed
	if resumed && info.Status == journal.RunDone {
		if _, err := os.Stat(cfg.Out); err == nil {
			var old Report
			if json.Unmarshal(info.Summary, &old) == nil {
				old.Finished, old.Resumed = true, true
				r.Finish(journal.RunDone, old)
				return old, nil
			}
		}
	}
	if !resumed {
		if _, err := os.Stat(cfg.Out); err == nil {
			r.Finish(journal.RunFailed, rep)
			return rep, fmt.Errorf("%s already exists: rotate never overwrites a file; remove it or write the output elsewhere", cfg.Out)
		}
	}
	items := make([]journal.Item, len(idx.Batches))
	for b := range idx.Batches {
		items[b] = journal.Item{Key: itemKey(b), State: runner.StatePending}
	}
	if _, err := r.AddItems(items); err != nil {
		return rep, err
	}

	jb := &job{cfg: cfg, idx: idx, from: from, to: to, master: MasterJSON(to.Label, to.KCV)}
	rep, err = jb.run(ctx, r, rep)
	status := journal.RunDone
	switch {
	case err != nil:
		status = journal.RunFailed
	case rep.Summary.Interrupted:
		status = journal.RunInterrupted
	case !rep.Finished:
		status = journal.RunFailed
	}
	if ferr := r.Finish(status, rep); ferr != nil && err == nil {
		err = ferr
	}
	return rep, err
}

func (jb *job) run(ctx context.Context, r *journal.Run, rep Report) (Report, error) {
	cfg := &jb.cfg
	// What the journal says is done, batch by batch.
	done := make([]*batchResult, len(jb.idx.Batches))
	if err := r.Items(func(it journal.Item) error {
		var b int
		if _, err := fmt.Sscanf(it.Key, "batch-%d", &b); err != nil || b < 0 || b >= len(done) {
			return fmt.Errorf("journal %s: run %s has an item %q that is not one of its %d batches: %w", r.Journal().Path(), r.ID(), it.Key, len(done), journal.ErrFormat)
		}
		if it.State == runner.StateDone {
			var br batchResult
			if err := json.Unmarshal(it.Data, &br); err != nil {
				return fmt.Errorf("journal %s: item %s: %v: %w", r.Journal().Path(), it.Key, err, journal.ErrFormat)
			}
			done[b] = &br
		}
		return nil
	}); err != nil {
		return rep, err
	}

	if err := checkPolicy(cfg, done); err != nil {
		return rep, err
	}
	// A previous attempt may already have renamed the output into place.
	if _, err := os.Stat(partial(cfg.Out)); errors.Is(err, os.ErrNotExist) && rep.Resumed {
		if _, err := os.Stat(cfg.Out); err == nil {
			if n, err := intactPrefix(cfg.Out, cfg.Rejects, done); err == nil && n == len(done) {
				return jb.finish(r, rep, done, true)
			}
			return rep, fmt.Errorf("%s exists but does not match journal %s: move it away and run again", cfg.Out, r.Journal().Path())
		}
	}

	w, keep, err := openWriter(cfg.Out, cfg.Rejects, done)
	if err != nil {
		return rep, err
	}
	jb.w = w
	defer w.close()
	// Done batches after the intact prefix lost their bytes (or came after
	// one that did): do them again.
	for b := keep; b < len(done); b++ {
		if done[b] == nil {
			continue
		}
		done[b] = nil
		rep.Redone++
		if err := r.Put(journal.Item{Key: itemKey(b), State: runner.StatePending, LastError: "output lost in an interruption; redone"}); err != nil {
			return rep, err
		}
	}
	if rep.Redone > 0 {
		cfg.Log.Info("batches whose output was lost in an interruption are redone", "batches", rep.Redone, "out", partial(cfg.Out))
	}
	if keep < len(done) {
		if err := jb.work(ctx, r, keep, &rep); err != nil || rep.Summary.Interrupted || rep.Summary.Failed > 0 {
			return rep, err
		}
		// Re-read what is done now.
		for b := range done {
			it, ok, err := r.Get(itemKey(b))
			if err != nil || !ok || it.State != runner.StateDone {
				return rep, fmt.Errorf("journal %s: batch %d is not done after the run (%v)", r.Journal().Path(), b, err)
			}
			var br batchResult
			if err := json.Unmarshal(it.Data, &br); err != nil {
				return rep, fmt.Errorf("journal %s: item %s: %v: %w", r.Journal().Path(), it.Key, err, journal.ErrFormat)
			}
			done[b] = &br
		}
	}
	if err := failpoint.Hit(failpoint.RotateBeforeFsync); err != nil {
		return rep, err
	}
	if err := w.close(); err != nil {
		return rep, err
	}
	if err := failpoint.Hit(failpoint.RotateAfterFsync); err != nil {
		return rep, err
	}
	return jb.finish(r, rep, done, false)
}

// checkPolicy refuses to resume under --on-error stop a run whose done
// batches rejected records under --on-error skip: its output would not be
// what stop promises. Going from stop to skip is fine: the done batches
// had no bad record.
func checkPolicy(cfg *Config, done []*batchResult) error {
	if cfg.OnError != Stop {
		return nil
	}
	var rejected int64
	for _, b := range done {
		if b != nil {
			rejected += int64(b.Rejected)
		}
	}
	if rejected > 0 {
		return fmt.Errorf("this run already rejected %d record(s) into %s under the skip policy: resume it under skip, or start over with another output file", rejected, partial(cfg.Rejects))
	}
	return nil
}

// work runs the batches from first on with the runner.
func (jb *job) work(ctx context.Context, r *journal.Run, first int, rep *Report) error {
	cfg := &jb.cfg
	in, err := os.Open(cfg.In)
	if err != nil {
		return fmt.Errorf("data-key file: %w", err)
	}
	defer in.Close()
	jb.in = in

	var dst *Side
	if cfg.Target != nil {
		dst = cfg.Target
	}
	lanes, err := setupLanes(ctx, cfg.Source, dst)
	if err != nil {
		return err
	}
	jb.lanes = lanes
	defer closeLanes(context.WithoutCancel(ctx), lanes, cfg.Log)

	// Batches in flight and data keys in flight per batch: enough batches
	// to keep the HSMs busy while one waits for its turn to be written.
	batches := min(max(2, cfg.Workers/16), 16)
	jb.perBatch = max(1, (cfg.Workers+batches-1)/batches)

	var already int64
	for b := 0; b < first; b++ {
		already += int64(jb.idx.Batches[b].Lines)
	}
	if cfg.Progress != nil {
		cfg.Progress.Start(int(jb.idx.Lines), int(already))
		defer cfg.Progress.Stop()
	}
	runCtx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	jb.stop = stop
	start := time.Now()
	sum, err := runner.Run(runCtx, runner.Config{
		Run:     r,
		Workers: batches,
		Process: jb.process,
		Grace:   2 * time.Minute,
	})
	rep.Elapsed = time.Since(start)
	rep.Records = jb.records.Load()
	// Batches that failed only because one before them did are not news.
	var fails []runner.Failure
	for _, f := range sum.Failures {
		if !strings.Contains(f.Error, errBehind.Error()) {
			fails = append(fails, f)
		}
	}
	sum.Failures = fails
	rep.Summary = sum
	if err != nil {
		return err
	}
	jb.failMu.Lock()
	failErr := jb.failErr
	jb.failMu.Unlock()
	if failErr != nil {
		// A batch stopped the run: report it, not an interruption.
		if ctx.Err() == nil {
			rep.Summary.Interrupted, rep.Summary.Stopped = false, ""
		}
		return failErr
	}
	return nil
}

// ErrInputChanged reports an input whose SHA-256 is not Config.WantSHA256.
var ErrInputChanged = errors.New("changed since it was planned")

// errBehind fails a batch that waited for an earlier one that failed.
var errBehind = errors.New("not written: an earlier batch failed")

// process is the runner's step for one batch: read its lines, re-encrypt
// its records, and hand its output to the writer in order.
func (jb *job) process(ctx context.Context, it journal.Item, _ runner.Commit) (journal.Item, error) {
	cfg := &jb.cfg
	var b int
	fmt.Sscanf(it.Key, "batch-%d", &b)
	rng := jb.idx.Batches[b]
	if jb.w.behindFailure(b) {
		return it, errBehind
	}
	res, out, rej, err := jb.batch(ctx, b, rng)
	if err != nil {
		jb.w.fail(b)
		var re *recordError
		if errors.As(err, &re) {
			err = &RecordError{File: cfg.In, Line: re.Line, ID: re.ID, Err: re.Err}
		} else {
			err = fmt.Errorf("batch of lines %d-%d: %w; run the same command again to resume", rng.Line, rng.Line+int64(rng.Lines)-1, err)
		}
		// Later batches cannot be written before this one: stop the run.
		// The error reported is that of the earliest batch that failed, so
		// under --on-error stop it names the first bad line of the file.
		jb.failMu.Lock()
		if jb.failErr == nil || b < jb.failBatch {
			jb.failErr, jb.failBatch = err, b
		}
		jb.failMu.Unlock()
		jb.stop(err)
		return it, err
	}
	res.Out, res.Rej, err = jb.w.write(b, out, rej)
	if err != nil {
		return it, err
	}
	if err := failpoint.Hit(failpoint.RotateAfterBatchWrite); err != nil {
		return it, err
	}
	jb.records.Add(int64(res.Rotated))
	if p := cfg.Progress; p != nil {
		for range res.Rotated {
			p.Finished(true)
		}
		for range res.Rejected {
			p.Finished(false)
		}
		for range res.Blank {
			p.Finished(true)
		}
	}
	data, _ := json.Marshal(res)
	return journal.Item{State: runner.StateDone, Data: data, Result: fmt.Sprintf("%d rotated, %d rejected", res.Rotated, res.Rejected)}, nil
}

// line is one line of a batch and what became of it.
type line struct {
	no    int64
	raw   []byte
	n     int // bytes in the input, newline included
	blank bool
	rec   Record
	err   error  // record error: goes to the rejects file (or stops the run)
	out   []byte // the new ciphertext
}

// batch re-encrypts one batch and renders its output and rejects.
func (jb *job) batch(ctx context.Context, b int, rng batchRange) (batchResult, []byte, []byte, error) {
	cfg := &jb.cfg
	res := batchResult{Line: rng.Line, Lines: rng.Lines}
	lines := make([]line, 0, rng.Lines)
	no := rng.Line
	err := eachLine(io.NewSectionReader(jb.in, rng.Off, rng.Len), func(raw []byte, n int) error {
		l := line{no: no, raw: bytes.Clone(raw), n: n}
		no++
		switch {
		case isBlank(raw):
			l.blank = true
		case n-1 > MaxLine && len(raw) > MaxLine:
			l.err = fmt.Errorf("the line is longer than the %d-byte limit of a data-key record", MaxLine)
		default:
			l.rec, l.err = ParseRecord(l.raw)
			if l.err == nil {
				l.err = jb.checkMaster(&l.rec)
			}
		}
		lines = append(lines, l)
		return nil
	})
	if err != nil {
		return res, nil, nil, fmt.Errorf("reading %s: %w", cfg.In, err)
	}
	if len(lines) != rng.Lines {
		return res, nil, nil, fmt.Errorf("%s changed while it was being rotated (batch at line %d has %d lines, had %d): run again on a file that does not change", cfg.In, rng.Line, len(lines), rng.Lines)
	}
	if cfg.OnError == Stop {
		for i := range lines {
			if lines[i].err != nil {
				return res, nil, nil, &recordError{Line: lines[i].no, ID: lines[i].rec.ID, Err: lines[i].err}
			}
		}
	}

	// The HSM work, perBatch data keys at once.
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
		next     atomic.Int64
	)
	dstName := cfg.Source.Name
	if cfg.Target != nil {
		dstName = cfg.Target.Name
	}
	for range jb.perBatch {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(lines) {
					return
				}
				l := &lines[i]
				if l.blank || l.err != nil {
					continue
				}
				mu.Lock()
				stop := firstErr != nil
				mu.Unlock()
				if stop {
					return
				}
				ln := jb.lanes[jb.next.Add(1)%uint64(len(jb.lanes))]
				outAlg := cfg.Alg
				if outAlg == "" {
					outAlg = l.rec.Alg
				}
				ct, err := ln.rewrap(ctx, jb.from.Ref, jb.to.Ref, l.rec.Alg, outAlg, l.rec.Ciphertext, cfg.Source.Name, dstName)
				var re *recordError
				switch {
				case errors.As(err, &re):
					l.err = re.Err
				case err != nil:
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				default:
					l.out = ct
				}
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return res, nil, nil, firstErr
	}

	var out, rej []byte
	for i := range lines {
		l := &lines[i]
		switch {
		case l.blank:
			res.Blank++
		case l.err != nil:
			if cfg.OnError == Stop {
				return res, nil, nil, &recordError{Line: l.no, ID: l.rec.ID, Err: l.err}
			}
			rej = appendReject(rej, l.no, l.rec.ID, l.err, l.raw)
			res.Rejected++
		default:
			outAlg := cfg.Alg
			if outAlg == "" {
				outAlg = l.rec.Alg
			}
			out = l.rec.Rewrite(out, jb.master, outAlg, l.out)
			out = append(out, '\n')
			res.Rotated++
		}
	}
	return res, out, rej, nil
}

// checkMaster refuses a record that names another master than the old one.
func (jb *job) checkMaster(r *Record) error {
	return matchMaster(r.Master, jb.from)
}

func matchMaster(m Master, want resolved) error {
	if m.KCV != hex.EncodeToString(want.KCV) {
		return fmt.Errorf("the record's master has kcv %s, but the old master %s has kcv %s: the record is under another master", m.KCV, want.Ref, want.KCV)
	}
	if m.Label != "" && m.Label != want.Label {
		return fmt.Errorf("the record's master is labelled %q, but the old master %s is labelled %q", m.Label, want.Ref, want.Label)
	}
	return nil
}

// Reject is one line of a rejects file.
type Reject struct {
	Line  int64  `json:"line"`
	ID    string `json:"id,omitempty"`
	Error string `json:"error"`
	// Raw is the line as read when it is valid UTF-8; RawBase64 otherwise.
	Raw       *string `json:"raw,omitempty"`
	RawBase64 []byte  `json:"raw-base64,omitempty"`
}

func appendReject(dst []byte, no int64, id string, err error, raw []byte) []byte {
	r := Reject{Line: no, ID: id, Error: err.Error()}
	if utf8.Valid(raw) {
		s := string(raw)
		r.Raw = &s
	} else {
		r.RawBase64 = raw
	}
	b, _ := json.Marshal(r)
	dst = append(dst, b...)
	return append(dst, '\n')
}

func sameFile(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	if err != nil {
		return false
	}
	return os.SameFile(fa, fb)
}
