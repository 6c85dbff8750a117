package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/rotate/pgstore"
	"github.com/keymig/keymig/runner"
	"github.com/urfave/cli/v2"
)

// tableOptions name a PostgreSQL data-key table: the flags rotate and
// datakeys share when --in or --out is a postgres:// URL.
type tableOptions struct {
	Table   string
	Columns pgstore.Columns
	Filters []string
	// OutTable and OutColumn: rotate (and verify) to a new table or column
	// instead of in place.
	OutTable, OutColumn string
}

func tableFlags() []cli.Flag {
	d := pgstore.DefaultColumns
	return []cli.Flag{
		&cli.StringFlag{Name: "table", Usage: "with a postgres:// URL: the data-key `TABLE` (SCHEMA.TABLE or TABLE; or table=... in the URL's query)"},
		&cli.StringFlag{Name: "id-column", Value: d.ID, Usage: "the table's primary key `COLUMN`"},
		&cli.StringFlag{Name: "master-label-column", Value: d.MasterLabel, Usage: "the `COLUMN` naming the master key's label"},
		&cli.StringFlag{Name: "master-kcv-column", Value: d.MasterKCV, Usage: "the `COLUMN` holding the master key's check value (hex)"},
		&cli.StringFlag{Name: "alg-column", Value: d.Alg, Usage: "the `COLUMN` holding the alg, aes-kwp or aes-gcm"},
		&cli.StringFlag{Name: "wrapped-key-column", Value: d.WrappedKey, Usage: "the bytea `COLUMN` holding the wrapped data key"},
		&cli.StringSliceFlag{Name: "filter", Usage: "only rows where `COLUMN=VALUE` (compared as text; repeat to AND them)"},
	}
}

// outFlags are rotate's and verify's: a rotation that keeps the old values.
func outFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "out-table", Usage: "with a postgres:// --in: write the rotated data keys to `TABLE` (made if missing: the same layout plus source_sha256) and leave the table's own values as they are"},
		&cli.StringFlag{Name: "out-column", Usage: "with a postgres:// --in: write the rotated data keys to the new columns `NAME`, NAME_master_label, NAME_master_kcv, NAME_alg and NAME_source_sha256 (added if missing) and leave the old ones as they are"},
	}
}

func tableOptionsFrom(c *cli.Context) tableOptions {
	return tableOptions{Table: c.String("table"), Filters: c.StringSlice("filter"), Columns: pgstore.Columns{
		ID: c.String("id-column"), MasterLabel: c.String("master-label-column"), MasterKCV: c.String("master-kcv-column"),
		Alg: c.String("alg-column"), WrappedKey: c.String("wrapped-key-column"),
	}, OutTable: c.String("out-table"), OutColumn: c.String("out-column")}
}

// resolve reads the table's address (a postgres:// URL, perhaps with
// table=... and the other address parameters in its query) and the
// flags into the URL to connect to and the store's options. A flag and
// an address parameter that disagree are refused.
func (t tableOptions) resolve(raw string) (string, pgstore.Options, error) {
	connURL, o, err := pgstore.ParseAddress(raw)
	if err != nil {
		return "", o, err
	}
	merge := func(name, flag string, dst *string, def string) error {
		switch {
		case flag == "" || flag == def:
		case *dst != def && *dst != flag:
			return fmt.Errorf("--%s %s and %s=%s in the URL disagree: give one", name, flag, name, *dst)
		default:
			*dst = flag
		}
		return nil
	}
	d := pgstore.DefaultColumns
	for _, m := range []struct {
		name string
		flag string
		dst  *string
		def  string
	}{
		{"table", t.Table, &o.Table, ""}, {"out-table", t.OutTable, &o.OutTable, ""}, {"out-column", t.OutColumn, &o.OutColumn, ""},
		{"id-column", t.Columns.ID, &o.Columns.ID, d.ID}, {"master-label-column", t.Columns.MasterLabel, &o.Columns.MasterLabel, d.MasterLabel},
		{"master-kcv-column", t.Columns.MasterKCV, &o.Columns.MasterKCV, d.MasterKCV}, {"alg-column", t.Columns.Alg, &o.Columns.Alg, d.Alg},
		{"wrapped-key-column", t.Columns.WrappedKey, &o.Columns.WrappedKey, d.WrappedKey},
	} {
		if err := merge(m.name, m.flag, m.dst, m.def); err != nil {
			return "", o, err
		}
	}
	if o.Table == "" {
		return "", o, errors.New("a postgres:// data-key store needs --table SCHEMA.TABLE (or table=SCHEMA.TABLE in the URL's query)")
	}
	for _, f := range t.Filters {
		pf, err := pgstore.ParseFilter(f)
		if err != nil {
			return "", o, fmt.Errorf("--filter %w", err)
		}
		o.Filters = append(o.Filters, pf)
	}
	return connURL, o, nil
}

// notForFiles refuses table flags beside a data-key file.
func (t tableOptions) notForFiles(flag, path string) error {
	if t.Table != "" || len(t.Filters) > 0 || t.OutTable != "" || t.OutColumn != "" {
		return fmt.Errorf("--table, --filter, --out-table and --out-column are for a postgres:// %s; %s is a file", flag, path)
	}
	return nil
}

// tableUse is what a command does with a table.
type tableUse int

const (
	readTable   tableUse = iota // read it as it is
	rotateTable                 // rotate it: make its output table or columns if missing
	createTable                 // make it and fill it
)

// openTable opens the table at raw for use.
func openTable(ctx context.Context, raw string, t tableOptions, use tableUse) (*pgstore.Store, error) {
	connURL, o, err := t.resolve(raw)
	if err != nil {
		return nil, err
	}
	switch use {
	case createTable:
		if len(o.Filters) > 0 {
			return nil, errors.New("--filter selects rows to read; generate writes a new table")
		}
		if o.OutTable != "" || o.OutColumn != "" {
			return nil, errors.New("--out-table and --out-column are where rotate writes; generate writes the table itself")
		}
		return pgstore.Create(ctx, connURL, o)
	case rotateTable:
		o.Prepare = true
	}
	return pgstore.Open(ctx, connURL, o)
}

// openTableView opens a table to read as a rotation would see it. When
// its output table or columns are not made yet, every row is as the table
// holds it, and note says so.
func openTableView(ctx context.Context, raw string, t tableOptions) (st *pgstore.Store, note string, err error) {
	connURL, o, err := t.resolve(raw)
	if err != nil {
		return nil, "", err
	}
	st, err = pgstore.Open(ctx, connURL, o)
	if errors.Is(err, pgstore.ErrNoOutput) {
		note = err.Error() + ": rotate makes it"
		o.OutTable, o.OutColumn = "", ""
		st, err = pgstore.Open(ctx, connURL, o)
	}
	return st, note, err
}

// runRotateTable rotates a PostgreSQL table in place.
func runRotateTable(ctx context.Context, e *env, o rotateOptions, alg string) error {
	stdout, stderr := e.stdout, e.stderr
	if o.Out != "" {
		return fmt.Errorf("--out %s: a postgres:// --in is rotated in place, or to --out-table or --out-column; leave out --out", o.Out)
	}
	var st *pgstore.Store
	var err error
	if o.DryRun {
		var note string
		if st, note, err = openTableView(ctx, o.In, o.tableOptions); note != "" {
			fmt.Fprintln(stdout, note)
		}
	} else {
		st, err = openTable(ctx, o.In, o.tableOptions, rotateTable)
	}
	if err != nil {
		return err
	}
	defer st.Close()
	if o.Journal == "" {
		o.Journal = journal.DefaultPath(st.Table() + ".rotate")
	}
	if o.Rejects == "" {
		o.Rejects = st.Table() + ".rotate.rejects"
	}
	if o.DryRun {
		o.Sessions = 1
	}
	v, err := openEnvelope(ctx, e, o.envelopeOptions)
	if err != nil {
		return err
	}
	defer v.close(ctx)
	if o.DryRun {
		return tableDryRun(ctx, stdout, o.Output, v, st)
	}
	j, err := journal.Open(o.Journal, journal.Options{Command: "rotate", BatchSize: 16})
	if err != nil {
		return err
	}
	defer j.Close()
	if j.TookOver != nil {
		e.log.Warn("the previous run of this journal died without closing it; resuming", "journal", o.Journal, "was", j.TookOver.String())
	}
	cfg := rotate.TableConfig{Source: v.src.side(), Target: v.target(), From: v.from, To: v.to, Table: st,
		Alg: alg, OnError: o.OnError, Batch: o.Batch, Workers: o.Workers, Log: e.log}
	if !o.NoProgress {
		cfg.Progress = runner.NewProgress(stderr, isTerminal(stderr), e.log, "rows", 5*time.Second)
	}
	rep, err := rotate.RunTable(ctx, j, cfg)
	err = masterFlag(err)
	if rep.Rejected > 0 {
		if werr := rotate.WriteTableRejects(o.Rejects, rep.Rejects); werr != nil && err == nil {
			err = werr
		}
	}
	where := "in place"
	if st.Output() != "" {
		where = "to the " + st.Output() + "; the old values are as they were"
	}
	if perr := printTableReport(stdout, o.Output, rep, where, o.Journal, o.Rejects); perr != nil && err == nil {
		err = perr
	}
	var re *rotate.RowError
	switch {
	case errors.As(err, &re):
		return fmt.Errorf("%v; fix the row, or run with --on-error skip to set such rows aside (their keys go to the rejects file) and go on", err)
	case err != nil && ctx.Err() != nil:
		return errInterrupted
	}
	return err
}

func printTableReport(w io.Writer, out outputFormat, rep rotate.TableReport, where, journalPath, rejects string) error {
	if rep.Run == "" {
		return nil
	}
	if out == outputJSON {
		return writeJSON(w, struct {
			Journal string             `json:"journal"`
			Report  rotate.TableReport `json:"report"`
		}{journalPath, rep})
	}
	status := "done"
	if !rep.Finished {
		status = "not finished"
	}
	fmt.Fprintf(w, "status: %s\n", status)
	t := newTable(w)
	t.row("table", rep.Table)
	t.row("from", rep.From)
	t.row("to", rep.To)
	t.row("rotated", fmt.Sprintf("%d (%s)", rep.Rotated, where))
	t.row("already rotated", fmt.Sprint(rep.Already))
	rej := fmt.Sprint(rep.Rejected)
	if rep.Rejected > 0 {
		rej += " → " + rejects
	}
	t.row("rejected", rej)
	if rep.Vanished > 0 {
		t.row("deleted meanwhile", fmt.Sprint(rep.Vanished))
	}
	t.row("final pass", fmt.Sprintf("%d row(s) written under the old master during the run", rep.FinalPass))
	if rep.Unsettled > 0 {
		t.row("unsettled", fmt.Sprintf("%d row(s) changed again under the final pass: run again", rep.Unsettled))
	}
	if rep.Resumed {
		t.row("resumed", "yes")
	}
	if rep.Elapsed > 0 {
		t.row("time", fmt.Sprintf("%s (%.0f rows/s)", rep.Elapsed.Round(time.Millisecond), rep.Rate()))
	}
	t.row("journal", journalPath)
	t.flush()
	return nil
}

// tableDryRun counts the rows by master and alg and says what a rotation
// would do with them.
func tableDryRun(ctx context.Context, w io.Writer, out outputFormat, v *envelope, st *pgstore.Store) error {
	rc := rotate.Config{Source: v.src.side(), Target: v.target(), From: v.from, To: v.to}
	from, to, err := rotate.Masters(ctx, &rc)
	if err != nil {
		return masterFlag(err)
	}
	census, err := st.Census(ctx)
	if err != nil {
		return err
	}
	rate, err := rotate.EstimateTable(ctx, rotate.TableConfig{Source: v.src.side(), Target: v.target(), From: v.from, To: v.to, Table: st}, 1000)
	if err != nil {
		return err
	}
	var todo, other int64
	for _, c := range census {
		switch c.KCV {
		case from.KCV.String():
			todo += c.Rows - c.Nulls
			other += c.Nulls
		case to.KCV.String():
		default:
			other += c.Rows
		}
	}
	if out == outputJSON {
		if err := writeJSON(w, struct {
			Table  string             `json:"table"`
			Census []rotate.CensusRow `json:"census"`
			ToDo   int64              `json:"to-rotate"`
			Bad    int64              `json:"bad"`
			Rate   float64            `json:"sampled-rows-per-second,omitempty"`
		}{st.String(), census, todo, other, rate}); err != nil {
			return err
		}
	} else {
		fmt.Fprintln(w, "dry run: nothing is written to either cluster or the table")
		t := newTable(w)
		t.row("table", st.String())
		t.row("from", from.String())
		t.row("to", to.String())
		for _, c := range census {
			role := "another master: rejected"
			switch c.KCV {
			case from.KCV.String():
				role = "old master: to rotate"
			case to.KCV.String():
				role = "new master: already rotated"
			}
			line := fmt.Sprintf("%d (%s)", c.Rows, role)
			if c.Nulls > 0 {
				line += fmt.Sprintf(", %d with a NULL column", c.Nulls)
			}
			t.row(fmt.Sprintf("kcv %s %s", orDash(c.KCV), orDash(c.Alg)), line)
		}
		if rate > 0 {
			eta := time.Duration(float64(todo) / rate * float64(time.Second))
			t.row("estimate", fmt.Sprintf("%s for %d row(s) (a sample re-encrypted inside the HSMs at %.0f rows/s, one session; more --sessions go faster)", eta.Round(time.Second), todo, rate))
		}
		t.flush()
	}
	if other > 0 {
		return fmt.Errorf("%s has %d row(s) rotate would reject: fix them, or rotate with --on-error skip to set them aside", st, other)
	}
	if todo > 0 {
		return errChangesPending
	}
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// runVerifyTable checks every row of a PostgreSQL table inside the HSMs.
func runVerifyTable(ctx context.Context, e *env, o verifyKeysOptions) error {
	stdout := e.stdout
	st, err := openTable(ctx, o.In, o.tableOptions, readTable)
	if errors.Is(err, pgstore.ErrNoOutput) {
		return fmt.Errorf("%w: nothing has been rotated to it; run keymig rotate with the same --out-table or --out-column first", err)
	}
	if err != nil {
		return err
	}
	defer st.Close()
	v, err := openEnvelope(ctx, e, o.envelopeOptions)
	if err != nil {
		return err
	}
	defer v.close(ctx)
	cfg := rotate.TableVerifyConfig{Source: v.src.side(), Target: v.target(), From: v.from, To: v.to, Table: st, Workers: o.Workers}
	if st.Output() != "" {
		cfg.Originals = st.Originals()
	}
	rep, err := rotate.VerifyTable(ctx, cfg)
	if err != nil {
		if ctx.Err() != nil {
			return errInterrupted
		}
		return masterFlag(err)
	}
	if o.Output == outputJSON {
		if err := writeJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		t := newTable(stdout)
		t.row("table", rep.Table)
		t.row("rows", fmt.Sprint(rep.Rows))
		t.row("under the new master", fmt.Sprintf("%d (unwrapped inside the HSMs)", rep.UnderNew))
		t.row("under the old master", fmt.Sprint(rep.UnderOld))
		if cfg.Originals != nil {
			t.row("same as the original", fmt.Sprintf("%d (compared inside the HSMs with the value each was rotated from)", rep.Compared))
		}
		t.row("bad", fmt.Sprint(rep.Bad))
		t.row("fingerprint", rep.Fingerprint+" (of every row's key and data-key KCV: compare before and after)")
		t.row("time", fmt.Sprintf("%s (%.0f rows/s)", rep.Elapsed.Round(time.Millisecond), float64(rep.Rows)/max(rep.Elapsed.Seconds(), 1e-9)))
		t.flush()
		for _, p := range rep.Problems {
			fmt.Fprintf(stdout, "  %s\n", p)
		}
	}
	switch {
	case rep.Bad > 0:
		return fmt.Errorf("%s: %d row(s) do not unwrap under the master they name (see above)", rep.Table, rep.Bad)
	case rep.UnderOld > 0:
		return fmt.Errorf("%s: %d row(s) are still under the old master: run keymig rotate on the table (again)", rep.Table, rep.UnderOld)
	}
	return nil
}
