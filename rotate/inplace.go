package rotate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/runner"
	"github.com/sourcegraph/conc/pool"
)

// TableRunKind is the journal run kind of an in-place table rotation.
const TableRunKind = "rotate-table"

// TableConfig is one in-place rotation of a data-key table.
type TableConfig struct {
	// Source, Target, From, To, Alg, OnError, Workers, Progress and Log
	// are as in Config.
	Source   Side
	Target   *Side
	From, To hsm.Filter
	Alg      string
	OnError  OnError
	Workers  int
	Progress runner.Progress
	Log      *slog.Logger
	// Table is the table rotated in place.
	Table Table
	// Batch is the number of rows per page, transaction and journal item;
	// default DefaultTableBatch.
	Batch int
}

// DefaultTableBatch is the page size of a table rotation. Measured with
// BenchmarkRotateTable (1,000,000 rows, 2 cores shared with the database):
// 27,000–29,600 rows/s with pages of 1,000 rows, 31,900–35,700 with 2,500;
// one UPDATE of 2,500 rows still holds its row locks for milliseconds.
const DefaultTableBatch = 2500

// TableReport is what an in-place rotation did.
type TableReport struct {
	Run   string `json:"run"`
	Table string `json:"table"`
	From  string `json:"from"`
	To    string `json:"to"`
	// Rows counted over every attempt of the run, batch by batch.
	Rotated  int64 `json:"rotated"`  // rewritten under the new master
	Already  int64 `json:"already"`  // found under the new master
	Rejected int64 `json:"rejected"` // bad rows, set aside under skip
	Vanished int64 `json:"vanished"` // deleted by the application meanwhile
	// FinalPass counts the rows under the old master the final pass found
	// (inserted or changed by the application during the run).
	FinalPass int64 `json:"final-pass"`
	// Unsettled counts rows the application changed again under the final
	// pass: still under the old master (run again).
	Unsettled int64         `json:"unsettled,omitempty"`
	Batches   int           `json:"batches"`
	Resumed   bool          `json:"resumed"`
	Finished  bool          `json:"finished"`
	Rejects   []TableReject `json:"rejects,omitempty"`
	Elapsed   time.Duration `json:"elapsed-ns"`
	Records   int64         `json:"rows-this-run"`
}

// Rate is rows rotated per second in this run.
func (r TableReport) Rate() float64 { return perSecond(r.Records, r.Elapsed) }

// TableReject is a row set aside: its key and why. It holds no ciphertext.
type TableReject struct {
	Key   string `json:"key"`
	Error string `json:"error"`
}

// WriteTableRejects writes the rows set aside to path, one JSON object
// (key and reason) per line, replacing the file atomically.
func WriteTableRejects(path string, rejects []TableReject) error {
	var b []byte
	for _, r := range rejects {
		line, _ := json.Marshal(r)
		b = append(append(b, line...), '\n')
	}
	return atomicfile.WriteFile(path, b, 0o600)
}

// RowError is the error an in-place run stops with under OnError stop.
type RowError struct {
	Table string
	Key   string
	Err   error
}

// Error names the table and the row.
func (e *RowError) Error() string {
	return fmt.Sprintf("table %s, row with key %q: %v", e.Table, e.Key, e.Err)
}

// Unwrap returns the row's problem.
func (e *RowError) Unwrap() error { return e.Err }

// tableBatch is a batch's journal record: the key range it covers and
// what became of its rows. It holds no ciphertext.
type tableBatch struct {
	// After is the cursor the page was read after (nil: the first page).
	After    *string       `json:"after"`
	First    string        `json:"first"`
	Last     string        `json:"last"`
	Rotated  int64         `json:"rotated"`
	Already  int64         `json:"already"`
	Rejected []TableReject `json:"rejected,omitempty"`
	Vanished int64         `json:"vanished"`
	// Changed counts rows the application changed between the read and
	// the write; the final pass rotates them.
	Changed int64 `json:"changed"`
}

// Journal item keys: the batches of the main pass in order, then a
// marker once the main pass has reached the end of the table.
func tableItemKey(b int) string { return fmt.Sprintf("page-%09d", b) }

const mainPassDone = "main-pass-done"

// statePageRead is the journal state of a page read but not yet written.
const statePageRead = "read"

type tableJob struct {
	cfg      TableConfig
	from, to resolved
	toMaster Master
	lanes    []*lane
	dstName  string
	rejected map[string]bool // keys set aside, not to be redone by the final pass
	records  atomic.Int64
}

// RunTable rotates cfg.Table in place as a run of journal j, resuming the
// run if it exists.
//
// Rows are read in pages by primary key (keyset paging: no OFFSET, no
// transaction held across pages). Each page is re-encrypted inside the
// HSMs and written back in one statement that changes a row only where it
// still holds the ciphertext read under the old master, so a row rotated
// by a killed run, or changed by the application meanwhile, is never
// rotated twice or overwritten. The journal records each page's key range
// as it is read and its outcome once written; a resume redoes the pages in
// flight (harmless, by the rule above) and reads on after the last one. A
// final pass rotates the rows still under the old master: inserted or
// changed by the application during the run.
func RunTable(ctx context.Context, j *journal.Journal, cfg TableConfig) (TableReport, error) {
	if cfg.Batch <= 0 {
		cfg.Batch = DefaultTableBatch
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 64
	}
	if cfg.OnError == "" {
		cfg.OnError = Stop
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	rc := Config{Source: cfg.Source, Target: cfg.Target, From: cfg.From, To: cfg.To}
	from, to, err := Masters(ctx, &rc)
	if err != nil {
		return TableReport{}, err
	}
	if cfg.Target == nil && from.Ref == to.Ref {
		return TableReport{}, fmt.Errorf("the old and the new master are the same key %s: choose a new master", from)
	}
	h := sha256.New()
	fmt.Fprintf(h, "rotate-table v1\n%s\n%s %s %s\n%s %s %s\n%s\n%d\n", cfg.Table,
		from.cluster, from.Ref, from.KCV, to.cluster, to.Ref, to.KCV, cfg.Alg, cfg.Batch)
	id := hex.EncodeToString(h.Sum(nil))[:32]
	rep := TableReport{Run: id, Table: cfg.Table.String(), From: from.String(), To: to.String()}
	meta := map[string]string{"table": cfg.Table.String(), "from": from.String(), "to": to.String(),
		"alg": cfg.Alg, "on-error": string(cfg.OnError), "batch": fmt.Sprint(cfg.Batch)}
	r, _, resumed, err := j.Begin(id, TableRunKind, meta)
	if err != nil {
		return rep, err
	}
	// A run that is done is not replayed from its summary: the table is
	// live, so running it again runs its final pass again and rotates
	// what the application wrote under the old master since.
	rep.Resumed = resumed
	jb := &tableJob{cfg: cfg, from: from, to: to, toMaster: Master{Label: to.Label, KCV: to.KCV.String()},
		dstName: targetOf(cfg.Source, cfg.Target).Name, rejected: map[string]bool{}}
	start := time.Now()
	err = jb.run(ctx, r, &rep)
	rep.Elapsed, rep.Records = time.Since(start), jb.records.Load()
	status := journal.RunDone
	switch {
	case err != nil && ctx.Err() != nil:
		status = journal.RunInterrupted
	case err != nil:
		status = journal.RunFailed
	default:
		rep.Finished = true
	}
	if ferr := r.Finish(status, rep); ferr != nil && err == nil {
		err = ferr
	}
	return rep, err
}

func (jb *tableJob) run(ctx context.Context, r *journal.Run, rep *TableReport) error {
	cfg := &jb.cfg
	// What the journal knows: batches done, batches read but not written,
	// and whether the main pass is over.
	var (
		done    = map[int]*tableBatch{}
		open    = map[int]*tableBatch{}
		last    = -1
		allRead bool
	)
	if err := r.Items(func(it journal.Item) error {
		if it.Key == mainPassDone {
			allRead = true
			return nil
		}
		var b int
		if _, err := fmt.Sscanf(it.Key, "page-%d", &b); err != nil || b < 0 {
			return fmt.Errorf("journal %s: run %s has an item %q that is not a page: %w", r.Journal().Path(), r.ID(), it.Key, journal.ErrFormat)
		}
		var tb tableBatch
		if err := json.Unmarshal(it.Data, &tb); err != nil {
			return fmt.Errorf("journal %s: item %s: %v: %w", r.Journal().Path(), it.Key, err, journal.ErrFormat)
		}
		if it.State == runner.StateDone {
			done[b] = &tb
		} else {
			open[b] = &tb
		}
		last = max(last, b)
		return nil
	}); err != nil {
		return err
	}
	if err := jb.checkPolicy(done); err != nil {
		return err
	}
	for _, tb := range done {
		jb.count(rep, tb)
	}

	lanes, err := setupLanes(ctx, cfg.Source, cfg.Target)
	if err != nil {
		return err
	}
	jb.lanes = lanes
	defer closeLanes(context.WithoutCancel(ctx), lanes, cfg.Log)
	if cfg.Progress != nil {
		// The rows to do: those under the old master now.
		census, err := cfg.Table.Census(ctx)
		if err != nil {
			return err
		}
		var todo int
		for _, c := range census {
			if c.KCV == jb.from.KCV.String() {
				todo += int(c.Rows)
			}
		}
		cfg.Progress.Start(todo, 0)
		defer cfg.Progress.Stop()
	}

	// Pages read by a killed run but not written: read their key range
	// again and redo them.
	for b := 0; b <= last; b++ {
		tb := open[b]
		if tb == nil {
			continue
		}
		// The same page size after the same cursor. Rows the application
		// inserted into its range meanwhile may push some of its rows out
		// of it: the final pass takes them.
		rows, err := cfg.Table.Page(ctx, tb.After, cfg.Batch, "")
		if err != nil {
			return err
		}
		if done[b], err = jb.page(ctx, r, b, tb.After, rows, rep); err != nil {
			return err
		}
	}

	// The main pass, from after the last page the journal knows.
	if !allRead {
		var after *string
		if last >= 0 {
			after = done[last].After
			if k := done[last].Last; k != "" {
				after = &k
			}
		}
		// Pages in flight: while one is written back, the next is in the
		// HSMs. Each is recorded as read before its work starts, so a
		// resume knows every page that may be half done.
		var (
			mu     sync.Mutex
			failed atomic.Bool
			p      = pool.New().WithErrors().WithFirstError().WithMaxGoroutines(pagesInFlight)
		)
		for b := last + 1; !failed.Load(); b++ {
			if err := ctx.Err(); err != nil {
				p.Wait()
				return err
			}
			rows, err := cfg.Table.Page(ctx, after, cfg.Batch, "")
			if err == nil && len(rows) > 0 {
				err = jb.read(r, b, after, rows)
			}
			if err != nil {
				p.Wait()
				return err
			}
			if len(rows) == 0 {
				break
			}
			pageAfter := after
			p.Go(func() error {
				tb, err := jb.write(ctx, r, b, pageAfter, rows)
				if err != nil {
					failed.Store(true)
					return err
				}
				mu.Lock()
				done[b] = tb
				jb.count(rep, tb)
				mu.Unlock()
				return nil
			})
			k := rows[len(rows)-1].Key
			after = &k
		}
		if err := p.Wait(); err != nil {
			return err
		}
		if err := r.Put(journal.Item{Key: mainPassDone, State: runner.StateDone}); err != nil {
			return err
		}
	}

	// The final pass: whatever is still under the old master, but for the
	// rows already set aside. It is not journaled page by page: a resume
	// starts it again, which by the rule of Swap changes nothing twice.
	var after *string
	for {
		rows, err := cfg.Table.Page(ctx, after, cfg.Batch, jb.from.KCV.String())
		if err != nil {
			return err
		}
		if len(rows) == 0 {
			break
		}
		k := rows[len(rows)-1].Key
		after = &k
		todo := rows[:0:0]
		for _, row := range rows {
			if !jb.rejected[row.Key] {
				todo = append(todo, row)
			}
		}
		if len(todo) == 0 {
			continue
		}
		tb, err := jb.batch(ctx, todo)
		if err != nil {
			return err
		}
		rep.FinalPass += int64(len(todo))
		rep.Unsettled += tb.Changed
		jb.count(rep, tb)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	rep.Batches = len(done)
	if rep.Unsettled > 0 {
		return fmt.Errorf("table %s: %d row(s) were changed by the application again while the final pass rotated them, and are still under the old master: run the same command again", cfg.Table, rep.Unsettled)
	}
	return nil
}

// checkPolicy refuses to resume under stop a run that set rows aside under
// skip (its outcome would not be what stop promises).
func (jb *tableJob) checkPolicy(done map[int]*tableBatch) error {
	if jb.cfg.OnError != Stop {
		return nil
	}
	n := 0
	for _, tb := range done {
		n += len(tb.Rejected)
	}
	if n > 0 {
		return fmt.Errorf("this run already set %d row(s) of %s aside under the skip policy: resume it under skip", n, jb.cfg.Table)
	}
	return nil
}

func (jb *tableJob) count(rep *TableReport, tb *tableBatch) {
	rep.Rotated += tb.Rotated
	rep.Already += tb.Already
	rep.Rejected += int64(len(tb.Rejected))
	rep.Vanished += tb.Vanished
	rep.Rejects = append(rep.Rejects, tb.Rejected...)
	for _, rj := range tb.Rejected {
		jb.rejected[rj.Key] = true
	}
}

// pagesInFlight bounds the pages between read and written back.
const pagesInFlight = 2

// page records page b as read, rotates it and records what became of it.
func (jb *tableJob) page(ctx context.Context, r *journal.Run, b int, after *string, rows []TableRow, rep *TableReport) (*tableBatch, error) {
	if err := jb.read(r, b, after, rows); err != nil {
		return nil, err
	}
	tb, err := jb.write(ctx, r, b, after, rows)
	if err != nil {
		return nil, err
	}
	jb.count(rep, tb)
	return tb, nil
}

// read records page b, read after the cursor after, as in flight.
func (jb *tableJob) read(r *journal.Run, b int, after *string, rows []TableRow) error {
	tb := &tableBatch{After: after}
	if len(rows) > 0 {
		tb.First, tb.Last = rows[0].Key, rows[len(rows)-1].Key
	}
	data, _ := json.Marshal(tb)
	return r.Put(journal.Item{Key: tableItemKey(b), State: statePageRead, Data: data})
}

// write rotates page b and records what became of it.
func (jb *tableJob) write(ctx context.Context, r *journal.Run, b int, after *string, rows []TableRow) (*tableBatch, error) {
	tb := &tableBatch{After: after}
	if len(rows) > 0 {
		var err error
		if tb, err = jb.batch(ctx, rows); err != nil {
			return nil, err
		}
		tb.After, tb.First, tb.Last = after, rows[0].Key, rows[len(rows)-1].Key
	}
	if err := failpoint.Hit(failpoint.RotateAfterTableSwap); err != nil {
		return nil, err
	}
	data, _ := json.Marshal(tb)
	if err := r.Put(journal.Item{Key: tableItemKey(b), State: runner.StateDone, Data: data,
		Result: fmt.Sprintf("%d rotated, %d already, %d rejected", tb.Rotated, tb.Already, len(tb.Rejected))}); err != nil {
		return nil, err
	}
	return tb, nil
}

// batch rotates rows inside the HSMs and swaps them in the table.
func (jb *tableJob) batch(ctx context.Context, rows []TableRow) (*tableBatch, error) {
	cfg := &jb.cfg
	tb := &tableBatch{}
	oldKCV, newKCV := jb.from.KCV.String(), jb.toMaster.KCV
	type todo struct {
		row *TableRow
		err error
		out []byte
		alg string
	}
	work := make([]todo, 0, len(rows))
	for i := range rows {
		row := &rows[i]
		var err error
		switch {
		case row.Null != "":
			err = fmt.Errorf("the column %s is NULL", row.Null)
		case row.Master.KCV == newKCV:
			tb.Already++
			continue
		case row.Master.KCV != oldKCV:
			err = fmt.Errorf("its master kcv %s names neither the old master %s nor the new one %s", row.Master.KCV, oldKCV, newKCV)
		case row.Alg != AlgKWP && row.Alg != AlgGCM:
			err = fmt.Errorf("unknown alg %q: want aes-kwp or aes-gcm", row.Alg)
		default:
			err = checkLength(row.Alg, len(row.Ciphertext))
		}
		work = append(work, todo{row: row, err: err})
	}
	if cfg.OnError == Stop {
		for _, w := range work {
			if w.err != nil {
				return nil, &RowError{Table: cfg.Table.String(), Key: w.row.Key, Err: w.err}
			}
		}
	}
	var next atomic.Uint64
	// cfg.Workers data keys in flight over all the pages in flight.
	err := forEach(ctx, len(work), max(1, cfg.Workers/pagesInFlight), func(i int) error {
		w := &work[i]
		if w.err != nil {
			return nil
		}
		w.alg = cfg.Alg
		if w.alg == "" {
			w.alg = w.row.Alg
		}
		ln := jb.lanes[next.Add(1)%uint64(len(jb.lanes))]
		ct, err := ln.rewrap(ctx, jb.from.Ref, jb.to.Ref, w.row.Alg, w.alg, w.row.Ciphertext, cfg.Source.Name, jb.dstName)
		var re *recordError
		switch {
		case errors.As(err, &re):
			w.err = re.Err
		case err != nil:
			return err
		default:
			w.out = ct
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	var swaps []Swap
	for _, w := range work {
		if w.err != nil {
			if cfg.OnError == Stop {
				return nil, &RowError{Table: cfg.Table.String(), Key: w.row.Key, Err: w.err}
			}
			tb.Rejected = append(tb.Rejected, TableReject{Key: w.row.Key, Error: w.err.Error()})
			continue
		}
		swaps = append(swaps, Swap{Key: w.row.Key, OldCiphertext: w.row.Ciphertext, Alg: w.alg, Ciphertext: w.out})
	}
	if len(swaps) == 0 {
		return tb, nil
	}
	if err := failpoint.Hit(failpoint.RotateBeforeTableSwap); err != nil {
		return nil, err
	}
	changed, err := cfg.Table.Swap(ctx, oldKCV, jb.toMaster, swaps)
	if err != nil {
		return nil, fmt.Errorf("table %s: writing the rows %q to %q: %w; run the same command again to resume", cfg.Table, swaps[0].Key, swaps[len(swaps)-1].Key, err)
	}
	tb.Rotated = int64(len(changed))
	jb.records.Add(tb.Rotated)
	if p := cfg.Progress; p != nil {
		for range changed {
			p.Finished(true)
		}
	}
	if len(changed) == len(swaps) {
		return tb, nil
	}
	// Rows the swap left alone: find out why.
	did := make(map[string]bool, len(changed))
	for _, k := range changed {
		did[k] = true
	}
	var left []string
	want := map[string]*Swap{}
	for i := range swaps {
		if !did[swaps[i].Key] {
			left = append(left, swaps[i].Key)
			want[swaps[i].Key] = &swaps[i]
		}
	}
	now, err := cfg.Table.Get(ctx, left)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, row := range now {
		seen[row.Key] = true
		switch {
		case row.Master.KCV == newKCV && bytes.Equal(row.Ciphertext, want[row.Key].Ciphertext):
			// Written by this swap, whose answer was lost and retried.
			tb.Rotated++
			jb.records.Add(1)
		case row.Master.KCV == newKCV:
			tb.Already++
		default: // changed by the application: the final pass takes it
			tb.Changed++
		}
	}
	for _, k := range left {
		if !seen[k] {
			tb.Vanished++
		}
	}
	return tb, nil
}

// forEach calls fn(i) for i in [0, n) with up to workers calls at once and
// returns the first error; after one, no new call starts.
func forEach(ctx context.Context, n, workers int, fn func(i int) error) error {
	var (
		next  atomic.Int64
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for range min(workers, n) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				mu.Lock()
				stop := first != nil
				mu.Unlock()
				if i >= n || stop {
					return
				}
				if err := ctx.Err(); err != nil {
					mu.Lock()
					first = cmpOr(first, err)
					mu.Unlock()
					return
				}
				if err := fn(i); err != nil {
					mu.Lock()
					first = cmpOr(first, err)
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}

func cmpOr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// EstimateTable measures how fast cfg would rotate: it re-encrypts a
// sample of up to n rows under the old master inside the HSMs, exactly as
// a run would, writes nothing back, and returns rows per second (0 when no
// row is under the old master). The database's share is left out: a page
// written back costs far less than its HSM work.
func EstimateTable(ctx context.Context, cfg TableConfig, n int) (float64, error) {
	rc := Config{Source: cfg.Source, Target: cfg.Target, From: cfg.From, To: cfg.To}
	from, to, err := Masters(ctx, &rc)
	if err != nil {
		return 0, err
	}
	rows, err := cfg.Table.Page(ctx, nil, n, from.KCV.String())
	if err != nil || len(rows) == 0 {
		return 0, err
	}
	lanes, err := setupLanes(ctx, cfg.Source, cfg.Target)
	if err != nil {
		return 0, err
	}
	defer closeLanes(context.WithoutCancel(ctx), lanes, cfg.Log)
	dstName := targetOf(cfg.Source, cfg.Target).Name
	workers := cfg.Workers
	if workers <= 0 {
		workers = 64
	}
	start := time.Now()
	err = forEach(ctx, len(rows), workers, func(i int) error {
		r := &rows[i]
		if r.Null != "" || (r.Alg != AlgKWP && r.Alg != AlgGCM) {
			return nil
		}
		_, err := lanes[i%len(lanes)].rewrap(ctx, from.Ref, to.Ref, r.Alg, r.Alg, r.Ciphertext, cfg.Source.Name, dstName)
		var re *recordError
		if errors.As(err, &re) {
			return nil // a bad row costs what a good one does
		}
		return err
	})
	if err != nil {
		return 0, err
	}
	return float64(len(rows)) / time.Since(start).Seconds(), nil
}
