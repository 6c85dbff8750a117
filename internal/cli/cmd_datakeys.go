package cli

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/rotate/pgstore"

	"github.com/keymig/keymig/internal/atomicfile"
	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/runner"
	"github.com/urfave/cli/v2"
)

func datakeysCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:  "datakeys",
		Usage: "make and check data-key files (the input and output of keymig rotate)",
		Description: `A data-key file is JSON Lines, one data key per line, wrapped under a master
key that stays in the HSM:
  {"id": "...", "master": {"label": "...", "kcv": "a1b2c3"}, "alg": "aes-kwp", "ciphertext": "<base64>"}`,
		Subcommands: []*cli.Command{datakeysGenerateCommand(e), datakeysVerifyCommand(e)},
	}
}

// generateOptions are the flags of keymig datakeys generate.
type generateOptions struct {
	tableOptions
	Dir         string
	PINFile     string
	Master      []string
	Count       int
	Alg         string
	Out         string
	Force       bool
	Sessions    int
	Workers     int
	LockTimeout time.Duration
	NoProgress  bool
}

func datakeysGenerateCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:      "generate",
		Usage:     "have the HSM make data keys and write them wrapped under a master key",
		UsageText: "keymig datakeys generate --cluster DIR --master FILTER --count N [--alg aes-kwp] --out datakeys.jsonl|postgres://USER@HOST/DB [--table SCHEMA.TABLE]",
		Description: `Each data key (AES-256) is generated inside the HSM as a session object,
wrapped under the master and deleted; only the ciphertext reaches the file.
For demos, tests and benchmarks. The PIN comes from KEYMIG_PIN or --pin-file.

With --out postgres://USER@HOST:PORT/DB?sslmode=... and --table, generate
creates the table in the documented layout (id text primary key,
master_label, master_kcv, alg text, wrapped_key bytea; the column flags
rename them) and fills it; a table that exists is refused. The database
password comes from PGPASSWORD, PGPASSFILE or ~/.pgpass, never the URL.

Example:
  KEYMIG_PIN=alice:pass keymig datakeys generate --cluster ./hsm1 --master attr.label=tde-old --count 1000 --out datakeys.jsonl`,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "cluster", Aliases: []string{"c"}, Required: true, Usage: "the cluster `DIR`ectory"},
			&cli.StringSliceFlag{Name: "master", Required: true, Usage: "the master key: CloudHSM CLI `FILTER` conditions, e.g. attr.label=tde-2019"},
			&cli.IntFlag{Name: "count", Required: true, Usage: "how many data keys to make"},
			&cli.StringFlag{Name: "alg", Value: rotate.AlgKWP, Usage: "aes-kwp or aes-gcm"},
			&cli.StringFlag{Name: "out", Required: true, Usage: "the data-key `FILE` to write (must not exist unless --force), or a postgres:// URL with --table"},
			&cli.BoolFlag{Name: "force", Usage: "replace --out if it exists"},
			pinFileFlag(),
			&cli.IntFlag{Name: "sessions", Value: 8, Usage: "sessions (lanes) to spread the work over the HSMs"},
			&cli.IntFlag{Name: "workers", Value: 64, Usage: "data keys made at once"},
			&cli.DurationFlag{Name: "lock-timeout", Value: defaultLockTimeout, Usage: "how long to wait for another keymig process using the cluster"},
			&cli.BoolFlag{Name: "no-progress", Usage: "no progress bar or progress log lines"},
		}, tableFlags()...),
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			return runDatakeysGenerate(c.Context, e, generateOptions{
				tableOptions: tableOptionsFrom(c),
				Dir:          c.String("cluster"), PINFile: c.String("pin-file"), Master: c.StringSlice("master"),
				Count: c.Int("count"), Alg: c.String("alg"), Out: c.String("out"), Force: c.Bool("force"),
				Sessions: c.Int("sessions"), Workers: c.Int("workers"), LockTimeout: c.Duration("lock-timeout"),
				NoProgress: c.Bool("no-progress"),
			})
		},
	}
}

func runDatakeysGenerate(ctx context.Context, e *env, o generateOptions) (err error) {
	stdout, stderr := e.stdout, e.stderr
	if o.Count <= 0 {
		return fmt.Errorf("--count %d: want at least 1", o.Count)
	}
	alg, err := rotate.ParseAlg(o.Alg)
	if err != nil {
		return fmt.Errorf("--%w", err)
	}
	master, err := parseKeyFilter("master", o.Master)
	if err != nil {
		return err
	}
	toTable := pgstore.IsURL(o.Out)
	var table *pgstore.Store
	if toTable {
		if o.Force {
			return errors.New("--force: generate never replaces a table; drop it or name another --table")
		}
		if table, err = openTable(ctx, o.Out, o.tableOptions, createTable); err != nil {
			return err
		}
		defer table.Close()
	} else if err := o.notForFiles("--out", o.Out); err != nil {
		return err
	} else if !o.Force {
		if _, err := os.Lstat(o.Out); err == nil {
			return fmt.Errorf("%s already exists: choose another --out or pass --force: %w", o.Out, fs.ErrExist)
		}
	}
	creds, err := loadBackendPIN(e, envPIN, o.PINFile, o.Dir, sideName(o.Dir))
	if err != nil {
		return err
	}
	oc, err := openClusterSessions(ctx, o.Dir, creds, o.Sessions, o.LockTimeout)
	if err != nil {
		return err
	}
	defer oc.close(ctx)

	var progress runner.Progress
	if !o.NoProgress {
		progress = runner.NewProgress(stderr, isTerminal(stderr), e.log, "data keys", 5*time.Second)
		progress.Start(o.Count, 0)
	}
	start := time.Now()
	cfg := rotate.GenerateConfig{Cluster: oc.side(), Master: master, Count: o.Count, Alg: alg, Workers: o.Workers}
	if progress != nil {
		cfg.Progress = progress
	}
	var m hsm.KeyInfo
	out := o.Out
	commit := func() error { return nil }
	if toTable {
		out = table.String()
		m, err = rotate.GenerateTable(ctx, cfg, table)
	} else {
		// Written beside --out and moved into place only when complete.
		tmp, terr := atomicfile.New(o.Out, 0o600)
		if terr != nil {
			return terr
		}
		defer tmp.Abort()
		commit = tmp.CommitNew
		if o.Force {
			commit = tmp.Commit
		}
		m, err = rotate.Generate(ctx, cfg, tmp)
	}
	err = masterFlag(err)
	if progress != nil {
		progress.Stop()
	}
	if err != nil {
		if ctx.Err() != nil {
			return errInterrupted
		}
		return err
	}
	if err := commit(); err != nil {
		return err
	}
	el := time.Since(start)
	fmt.Fprintf(stdout, "%s wrapped under %q (%s, kcv %s) with %s → %s in %s (%.0f/s)\n",
		plural(o.Count, "data key"), m.Label, m.Ref, m.KCV, alg, out, el.Round(time.Millisecond), float64(o.Count)/el.Seconds())
	return nil
}

// verifyKeysOptions are the flags of keymig datakeys verify.
type verifyKeysOptions struct {
	envelopeOptions
	tableOptions
	In, Rotated, Rejects string
	Output               outputFormat
}

func datakeysVerifyCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:      "verify",
		Usage:     "check that a rotated file holds the same data keys as its input, inside the HSMs",
		UsageText: "keymig datakeys verify --source DIR --from-key FILTER --in datakeys.jsonl [--target DIR] --to-key FILTER --rotated rotated.jsonl [--rejects FILE]\n   keymig datakeys verify --source DIR --from-key FILTER [--target DIR] --to-key FILTER --in postgres://USER@HOST/DB --table SCHEMA.TABLE",
		Description: `For each record, the input's ciphertext is unwrapped under the old master and
the rotated one under the new master, each into a session object; the HSMs'
check values (KCV) are compared and the objects deleted. No data key leaves
an HSM. Records must be in the same order with the same other fields; input
lines listed in --rejects are expected to be missing from the rotated file.

With --in postgres://... and --table, every row is unwrapped under the master
it names (old or new) inside the HSMs; the report counts the rows under each
and prints a fingerprint of every row's key and data-key KCV, the same before
and after a rotation that kept every data key. With --out-table or
--out-column, the rotated values are checked, and each is compared inside
the HSMs with the value it was rotated from: the same data key, or the row
is named. Only when every row passes is the cut-over safe.

Exit status: 0 every record verified, 1 otherwise.`,
		Flags: append(append(envelopeFlags(),
			&cli.StringFlag{Name: "in", Required: true, Usage: "the original data-key `FILE`, or a postgres:// URL with --table"},
			&cli.StringFlag{Name: "rotated", Usage: "the `FILE` keymig rotate wrote (files only)"},
			&cli.StringFlag{Name: "rejects", Usage: "the rejects `FILE` of the rotation, if it had one"},
			outputFlag(),
		), append(tableFlags(), outFlags()...)...),
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			return runDatakeysVerify(c.Context, e, verifyKeysOptions{
				envelopeOptions: envelopeOptionsFrom(c), tableOptions: tableOptionsFrom(c),
				In: c.String("in"), Rotated: c.String("rotated"), Rejects: c.String("rejects"), Output: out,
			})
		},
	}
}

func runDatakeysVerify(ctx context.Context, e *env, o verifyKeysOptions) error {
	stdout := e.stdout
	if pgstore.IsURL(o.In) {
		return runVerifyTable(ctx, e, o)
	}
	if err := o.notForFiles("--in", o.In); err != nil {
		return err
	}
	if o.Rotated == "" {
		return errors.New("--rotated FILE is needed: the file keymig rotate wrote from --in")
	}
	v, err := openEnvelope(ctx, e, o.envelopeOptions)
	if err != nil {
		return err
	}
	defer v.close(ctx)
	rep, err := rotate.Verify(ctx, rotate.VerifyConfig{
		Source: v.src.side(), Target: v.target(), From: v.from, To: v.to,
		In: o.In, Rotated: o.Rotated, Rejects: o.Rejects, Workers: o.Workers,
	})
	err = masterFlag(err)
	if err != nil {
		if ctx.Err() != nil {
			return errInterrupted
		}
		return err
	}
	if o.Output == outputJSON {
		if err := writeJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		t := newTable(stdout)
		t.row("records", fmt.Sprint(rep.Records))
		t.row("verified", fmt.Sprintf("%d (same data key, compared by KCV inside the HSMs)", rep.Verified))
		if rep.Rejected > 0 {
			t.row("rejected", fmt.Sprintf("%d (listed in %s)", rep.Rejected, o.Rejects))
		}
		t.row("missing", fmt.Sprint(rep.Missing))
		t.row("mismatched", fmt.Sprint(rep.Mismatched))
		t.row("time", fmt.Sprintf("%s (%.0f records/s)", rep.Elapsed.Round(time.Millisecond), float64(rep.Records)/max(rep.Elapsed.Seconds(), 1e-9)))
		t.flush()
		for _, p := range rep.Problems {
			fmt.Fprintf(stdout, "  %s\n", p)
		}
	}
	if !rep.OK() {
		return errors.New(verifyFailure(rep, o))
	}
	return nil
}

func verifyFailure(rep rotate.VerifyReport, o verifyKeysOptions) string {
	return fmt.Sprintf("%s does not hold every data key of %s: %d missing, %d mismatched (see above); rotate again into a new file, or check --from-key and --to-key",
		o.Rotated, o.In, rep.Missing, rep.Mismatched)
}
