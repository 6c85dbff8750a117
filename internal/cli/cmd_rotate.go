package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/keymig/keymig/rotate/pgstore"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/runner"
	"github.com/urfave/cli/v2"
)

// rotateOptions are the flags of keymig rotate.
type rotateOptions struct {
	envelopeOptions
	tableOptions
	In, Out, Rejects string
	Journal          string
	Alg              string
	OnError          rotate.OnError
	Batch            int
	DryRun           bool
	NoProgress       bool
	Output           outputFormat
}

// envelopeOptions are what rotate and datakeys verify share: the clusters,
// the two master keys, credentials and parallelism.
type envelopeOptions struct {
	SourceDir, TargetDir         string
	PINFile                      string // one cluster: --pin-file
	SourcePINFile, TargetPINFile string // two clusters
	From, To                     []string
	Sessions, Workers            int
	LockTimeout                  time.Duration
}

func envelopeFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "source", Required: true, Usage: "the cluster `DIR`ectory that holds the old master key"},
		&cli.StringFlag{Name: "target", Usage: "the cluster `DIR`ectory that holds the new master key (default: the source cluster)"},
		&cli.StringSliceFlag{Name: "from-key", Required: true, Usage: "the old master: CloudHSM CLI `FILTER` conditions, e.g. attr.label=tde-2019 or key-reference=0x...; repeat or separate with spaces to AND them"},
		&cli.StringSliceFlag{Name: "to-key", Required: true, Usage: "the new master: `FILTER` conditions, as --from-key"},
		pinFileFlag(),
		&cli.StringFlag{Name: "source-pin-file", Usage: "with --target: read the source PIN from `FILE` (mode 0600) instead of " + envSourcePIN},
		&cli.StringFlag{Name: "target-pin-file", Usage: "with --target: read the target PIN from `FILE` (mode 0600) instead of " + envTargetPIN},
		&cli.IntFlag{Name: "sessions", Value: 8, Usage: "sessions per cluster (lanes): each session's objects live on one HSM, so several spread the work over the HSMs"},
		&cli.IntFlag{Name: "workers", Value: 64, Usage: "data keys in flight at once"},
		&cli.DurationFlag{Name: "lock-timeout", Value: defaultLockTimeout, Usage: "how long to wait for another keymig process using a cluster"},
	}
}

func envelopeOptionsFrom(c *cli.Context) envelopeOptions {
	return envelopeOptions{
		SourceDir: c.String("source"), TargetDir: c.String("target"),
		PINFile: c.String("pin-file"), SourcePINFile: c.String("source-pin-file"), TargetPINFile: c.String("target-pin-file"),
		From: c.StringSlice("from-key"), To: c.StringSlice("to-key"),
		Sessions: c.Int("sessions"), Workers: c.Int("workers"), LockTimeout: c.Duration("lock-timeout"),
	}
}

// parseKeyFilter reads FILTER flag values; each may hold several
// space-separated conditions.
func parseKeyFilter(flag string, vals []string) (hsm.Filter, error) {
	var conds []string
	for _, v := range vals {
		conds = append(conds, strings.Fields(v)...)
	}
	if len(conds) == 0 {
		return hsm.Filter{}, fmt.Errorf("--%s needs a filter such as attr.label=NAME or key-reference=0x...", flag)
	}
	f, err := hsm.ParseFilter(conds)
	if err != nil {
		return hsm.Filter{}, fmt.Errorf("--%s: %w", flag, err)
	}
	return f, nil
}

func rotateCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:      "rotate",
		Usage:     "re-encrypt data keys under a new master key; plaintext never leaves the HSMs",
		UsageText: "keymig rotate --source DIR --from-key FILTER [--target DIR] --to-key FILTER --in datakeys.jsonl --out rotated.jsonl [--journal FILE] [--workers N] [--batch N] [--on-error stop|skip] [--dry-run]\n   keymig rotate --source DIR --from-key FILTER [--target DIR] --to-key FILTER --in postgres://USER@HOST/DB --table SCHEMA.TABLE [--filter COLUMN=VALUE] [--journal FILE] [--dry-run]",
		Description: `rotate reads a data-key file (JSON Lines: {"id", "master": {"label", "kcv"},
"alg": "aes-kwp"|"aes-gcm", "ciphertext": base64, ...}) and writes each record
again under the new master, in the same order, with every other field kept
byte for byte. Inside the HSM each data key is unwrapped under the old master
into a session object, wrapped under the new master, and the object deleted.
With --target, the key crosses to the other cluster under a session KEK
moved once per session by RSA-OAEP. The old master is never changed.

The job is recorded in a journal (OUT.journal by default), one entry per
batch of records. If it is stopped, run the same command again: it resumes
from the last committed batch and produces the same file. The output is
written to OUT.partial and renamed to OUT only once complete and checked.

A bad record (malformed line, unknown alg, bad base64, another master, a
ciphertext that does not unwrap) is reported with its line number. With
--on-error stop (the default) the run stops there; with --on-error skip it is
written to the rejects file (OUT.rejects) with the reason, and the run goes on.

A PostgreSQL table (--in postgres://USER@HOST:PORT/DB?sslmode=... --table T)
is rotated in place. Rows are read in pages by primary key, re-encrypted inside
the HSMs and written back one page per statement, each row only where it still
holds the ciphertext read under the old master: a row rotated by a killed run,
or changed by the application meanwhile, is never rotated twice or
overwritten. A final pass takes rows the application wrote under the old
master during the run. The journal (TABLE.rotate.journal by default) records
each page; run the same command again to resume. Bad rows (a NULL, an unknown
alg, another master, a ciphertext that does not unwrap) are named by primary
key; under --on-error skip their keys and reasons go to --rejects
(TABLE.rotate.rejects). Columns default to id, master_label, master_kcv, alg
and wrapped_key (bytea); the column flags rename them. The database password
comes from PGPASSWORD, PGPASSFILE or ~/.pgpass, and is never shown.

For a cut-over that can be rolled back, --out-table T2 or --out-column C
writes the rotated data keys beside the old ones, which stay as they are:
T2 has the table's layout plus source_sha256 (the SHA-256 of the value each
row was rotated from); C adds the columns C, C_master_label, C_master_kcv,
C_alg and C_source_sha256. Both are made if missing. A row the application
rewrites after it was rotated no longer matches its source_sha256 and is
rotated again by the final pass. Rows already under the new master (from
an earlier in-place run) are left where they are, not copied. Check with
keymig datakeys verify and the
same flags (every new value must hold the same data key as the old one),
move the application to the new values, then drop the old ones yourself.

PINs: one cluster reads KEYMIG_PIN (or --pin-file); with --target, KEYMIG_SOURCE_PIN
and KEYMIG_TARGET_PIN (or --source-pin-file and --target-pin-file).

Exit status: 0 done, 1 error or bad record, 130 interrupted (run again to resume).

Example:
  KEYMIG_PIN=alice:pass keymig rotate --source ./hsm1 --from-key attr.label=tde-old \
    --to-key attr.label=tde-new --in datakeys.jsonl --out rotated.jsonl`,
		Flags: append(append(envelopeFlags(),
			&cli.StringFlag{Name: "in", Required: true, Usage: "the data-key `FILE` to rotate (JSON Lines), or a postgres:// URL with --table to rotate in place"},
			&cli.StringFlag{Name: "out", Usage: "where to write the rotated data keys; must not exist (files only)"},
			&cli.StringFlag{Name: "rejects", Usage: "where --on-error skip writes bad records (default: OUT.rejects)"},
			&cli.StringFlag{Name: "journal", Usage: "the journal `FILE` (default: OUT.journal)"},
			&cli.StringFlag{Name: "alg", Usage: "write every record with this alg, aes-kwp or aes-gcm (default: keep each record's)"},
			&cli.StringFlag{Name: "on-error", Value: "stop", Usage: "a bad record stops the run (stop) or goes to the rejects file (skip)"},
			&cli.IntFlag{Name: "batch", Usage: "records per journal commit (default 1000); for a table, rows per page and UPDATE (default 2500)"},
			&cli.BoolFlag{Name: "dry-run", Usage: "check every record and both master keys; change nothing"},
			&cli.BoolFlag{Name: "no-progress", Usage: "no progress bar or progress log lines"},
			outputFlag(),
		), append(tableFlags(), outFlags()...)...),
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			onErr, err := rotate.ParseOnError(c.String("on-error"))
			if err != nil {
				return fmt.Errorf("--on-error %w", err)
			}
			return runRotate(c.Context, e, rotateOptions{
				envelopeOptions: envelopeOptionsFrom(c), tableOptions: tableOptionsFrom(c),
				In: c.String("in"), Out: c.String("out"), Rejects: c.String("rejects"), Journal: c.String("journal"),
				Alg: c.String("alg"), OnError: onErr, Batch: c.Int("batch"), DryRun: c.Bool("dry-run"),
				NoProgress: c.Bool("no-progress"), Output: out,
			})
		},
	}
}

// openedCluster is one cluster (or token) open with several sessions of one user.
type openedCluster struct {
	dir      string
	cluster  backend
	sessions []hsm.Session
	lanes    []rotate.Session // the same sessions, as a rotation uses them
}

func (o *openedCluster) side() rotate.Side {
	return rotate.Side{Name: o.dir, Sessions: o.lanes}
}

// rotationLanesOf checks that sessions can do what a rotation needs of
// them (delete the session objects it makes) and returns them as lanes.
func rotationLanesOf(dir string, sessions []hsm.Session) ([]rotate.Session, error) {
	lanes := make([]rotate.Session, len(sessions))
	for i, s := range sessions {
		l, err := capable[rotate.Session](dir, s, "delete the session objects a rotation unwraps data keys into")
		if err != nil {
			return nil, err
		}
		lanes[i] = l
	}
	return lanes, nil
}

func (o *openedCluster) close(ctx context.Context) {
	logoutAll(ctx, o.sessions)
	if o.cluster != nil {
		o.cluster.Close()
	}
}

// openClusterSessions opens dir and logs in n times with creds.
func openClusterSessions(ctx context.Context, dir string, creds hsm.Credentials, n int, lockTimeout time.Duration) (*openedCluster, error) {
	cl, err := openBackend(ctx, dir, lockTimeout)
	if err != nil {
		return nil, err
	}
	o := &openedCluster{dir: dir, cluster: cl}
	if o.sessions, err = loginSessions(ctx, cl, dir, creds, max(1, n)); err != nil {
		cl.Close()
		return nil, err
	}
	if o.lanes, err = rotationLanesOf(dir, o.sessions); err != nil {
		o.close(ctx)
		return nil, err
	}
	return o, nil
}

// envelope is the open clusters of a rotate or verify: the source, and
// the target when it is another cluster.
type envelope struct {
	src, dst *openedCluster
	from, to hsm.Filter
}

func (v *envelope) close(ctx context.Context) {
	if v.dst != nil {
		v.dst.close(ctx)
	}
	if v.src != nil {
		v.src.close(ctx)
	}
}

func (v *envelope) target() *rotate.Side {
	if v.dst == nil {
		return nil
	}
	s := v.dst.side()
	return &s
}

// openEnvelope parses the master filters, reads the PINs (all before
// opening anything) and opens one cluster or two.
func openEnvelope(ctx context.Context, e *env, o envelopeOptions) (_ *envelope, err error) {
	v := &envelope{}
	if v.from, err = parseKeyFilter("from-key", o.From); err != nil {
		return nil, err
	}
	if v.to, err = parseKeyFilter("to-key", o.To); err != nil {
		return nil, err
	}
	if o.Sessions <= 0 {
		o.Sessions = 1
	}
	if o.TargetDir != "" && filepath.Clean(o.TargetDir) == filepath.Clean(o.SourceDir) {
		o.TargetDir = ""
	}
	if o.TargetDir == "" {
		creds, err := loadBackendPIN(e, envPIN, o.PINFile, o.SourceDir, sideName(o.SourceDir))
		if err != nil {
			return nil, err
		}
		if v.src, err = openClusterSessions(ctx, o.SourceDir, creds, o.Sessions, o.LockTimeout); err != nil {
			return nil, err
		}
		return v, nil
	}
	srcCreds, err := loadBackendPIN(e, envSourcePIN, o.SourcePINFile, o.SourceDir, "the source "+sideName(o.SourceDir))
	if err != nil {
		return nil, err
	}
	dstCreds, err := loadBackendPIN(e, envTargetPIN, o.TargetPINFile, o.TargetDir, "the target "+sideName(o.TargetDir))
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			v.close(ctx)
		}
	}()
	if v.src, err = openClusterSessions(ctx, o.SourceDir, srcCreds, o.Sessions, o.LockTimeout); err != nil {
		return nil, err
	}
	if v.dst, err = openClusterSessions(ctx, o.TargetDir, dstCreds, o.Sessions, o.LockTimeout); err != nil {
		return nil, err
	}
	return v, nil
}

func runRotate(ctx context.Context, e *env, o rotateOptions) error {
	stdout, stderr := e.stdout, e.stderr
	alg, err := rotate.ParseAlg(o.Alg)
	if err != nil {
		return fmt.Errorf("--%w", err)
	}
	if pgstore.IsURL(o.In) {
		return runRotateTable(ctx, e, o, alg)
	}
	if err := o.notForFiles("--in", o.In); err != nil {
		return err
	}
	if o.Out == "" {
		return errors.New("--out FILE is needed: where to write the rotated data keys (a postgres:// --in is rotated in place instead)")
	}
	if o.Journal == "" {
		o.Journal = journal.DefaultPath(o.Out)
	}
	if o.Rejects == "" {
		o.Rejects = o.Out + ".rejects"
	}
	sessions := o.Sessions
	if o.DryRun {
		o.Sessions = 1
	}
	v, err := openEnvelope(ctx, e, o.envelopeOptions)
	if err != nil {
		return err
	}
	defer v.close(ctx)
	o.Sessions = sessions
	if o.Batch <= 0 {
		o.Batch = 1000 // the file rotation's default, part of its run's identity
	}
	cfg := rotate.Config{
		Source: v.src.side(), Target: v.target(), From: v.from, To: v.to,
		In: o.In, Out: o.Out, Rejects: o.Rejects, Alg: alg, OnError: o.OnError,
		Batch: o.Batch, Workers: o.Workers, Log: e.log,
	}
	if o.DryRun {
		rep, err := rotate.DryRun(ctx, cfg)
		if err != nil {
			return masterFlag(err)
		}
		return printRotateDryRun(stdout, o.Output, rep, o.In)
	}
	j, err := journal.Open(o.Journal, journal.Options{Command: "rotate", BatchSize: 16})
	if err != nil {
		return err
	}
	defer j.Close()
	if j.TookOver != nil {
		e.log.Warn("the previous run of this journal died without closing it; resuming", "journal", o.Journal, "was", j.TookOver.String())
	}
	if !o.NoProgress {
		cfg.Progress = runner.NewProgress(stderr, isTerminal(stderr), e.log, "records", 5*time.Second)
	}
	rep, err := rotate.Run(ctx, j, cfg)
	err = masterFlag(err)
	if perr := printRotateReport(stdout, o.Output, rep, o.Journal); perr != nil && err == nil {
		err = perr
	}
	var rec *rotate.RecordError
	switch {
	case errors.As(err, &rec):
		return fmt.Errorf("%s; fix the record, or run with --on-error skip to write such records to the rejects file and go on", rec.Problem())
	case rep.Summary.Interrupted || (err != nil && ctx.Err() != nil):
		return errInterrupted
	case err != nil:
		return err
	case !rep.Finished:
		return fmt.Errorf("the rotation did not finish (%d batch(es) failed); see keymig journal show --journal %s, fix the cause and run the same command again", max(1, rep.Summary.Failed), o.Journal)
	}
	return nil
}

// masterFlag names the flag that selected a master key rotate could not
// find: the library says "the old master", the user typed --from-key.
func masterFlag(err error) error {
	var me *rotate.MasterError
	if !errors.As(err, &me) {
		return err
	}
	flag := map[rotate.MasterRole]string{rotate.OldMaster: "--from-key", rotate.NewMaster: "--to-key", rotate.AnyMaster: "--master"}[me.Role]
	return fmt.Errorf("cluster %s: %s: %w", me.Cluster, flag, me.Err)
}

func printRotateReport(w io.Writer, out outputFormat, rep rotate.Report, journalPath string) error {
	if rep.Run == "" {
		return nil
	}
	if out == outputJSON {
		return writeJSON(w, struct {
			Journal string        `json:"journal"`
			Report  rotate.Report `json:"report"`
		}{journalPath, rep})
	}
	status := "done"
	switch {
	case rep.Summary.Interrupted:
		status = "interrupted"
	case !rep.Finished:
		status = "not finished"
	}
	fmt.Fprintf(w, "status: %s\n", status)
	t := newTable(w)
	t.row("from", rep.From)
	t.row("to", rep.To)
	if rep.Finished {
		t.row("rotated", fmt.Sprintf("%d → %s", rep.Rotated, rep.Out))
		t.row("rejected", fmt.Sprint(rep.Rejected)+rejectsNote(rep))
		if rep.Blank > 0 {
			t.row("blank lines", fmt.Sprint(rep.Blank))
		}
	}
	t.row("lines", fmt.Sprintf("%d in %d batch(es) (%s)", rep.Lines, rep.Batches, rep.In))
	if rep.Resumed {
		t.row("resumed", fmt.Sprintf("yes (%d batch(es) redone)", rep.Redone))
	}
	if rep.Elapsed > 0 {
		t.row("time", fmt.Sprintf("%s (%.0f records/s)", rep.Elapsed.Round(time.Millisecond), rep.Rate()))
	}
	t.row("journal", journalPath)
	t.flush()
	if len(rep.Summary.Failures) > 0 {
		fmt.Fprintln(w, "failed batches:")
		fmt.Fprint(w, runner.FormatFailures(rep.Summary.Failures, 10))
	}
	return nil
}

func rejectsNote(rep rotate.Report) string {
	if rep.Rejected == 0 {
		return ""
	}
	return " → " + rep.Rejects
}

func printRotateDryRun(w io.Writer, out outputFormat, rep rotate.DryRunReport, in string) error {
	if out == outputJSON {
		if err := writeJSON(w, rep); err != nil {
			return err
		}
	} else {
		fmt.Fprintln(w, "dry run: nothing is written to either cluster or any file")
		t := newTable(w)
		t.row("from", rep.From)
		t.row("to", rep.To)
		t.row("records", fmt.Sprint(rep.Records))
		for _, a := range []string{rotate.AlgKWP, rotate.AlgGCM} {
			if rep.Algs[a] > 0 {
				t.row("  "+a, fmt.Sprint(rep.Algs[a]))
			}
		}
		t.row("bad lines", fmt.Sprint(rep.Bad))
		if rep.Blank > 0 {
			t.row("blank lines", fmt.Sprint(rep.Blank))
		}
		t.flush()
		for _, p := range rep.Problems {
			fmt.Fprintf(w, "  %s: %s\n", in, p)
		}
		if rep.Bad > int64(len(rep.Problems)) {
			fmt.Fprintf(w, "  ... and %d more\n", rep.Bad-int64(len(rep.Problems)))
		}
	}
	if rep.Bad > 0 {
		return fmt.Errorf("%s has %d bad line(s): fix them, or rotate with --on-error skip to set them aside in a rejects file", in, rep.Bad)
	}
	if rep.Records > 0 {
		return errChangesPending
	}
	return nil
}
