package cli

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/plan"
	"github.com/keymig/keymig/rotate"
	"github.com/keymig/keymig/rotate/pgstore"
	"github.com/urfave/cli/v2"
)

// planOptions are the flags of keymig plan.
type planOptions struct {
	pairOptions
	Filter        []string
	Transport     string
	Hash          string
	TransportBits int
	Out           string
	Force         bool
	Output        outputFormat
	Workers       int
	DataKeys      []string // LABEL=FILE
}

func planCommand(e *env) *cli.Command {
	return &cli.Command{
		Name:      "plan",
		Usage:     "inventory two clusters and write a migration plan (changes nothing)",
		UsageText: "keymig plan --source DIR --target DIR [--filter attr.NAME=VALUE ...] [--transport auto] --out plan.json",
		Description: `plan lists both clusters once and classifies every source key the filters
select:
  transfer  extractable and owned by the source user: wrapped on the source,
            unwrapped on the target (rsa-oaep, rsa-aes or session-kek)
  sync      the clusters are clones: copied as a masked object, handle kept,
            non-extractable keys included
  rotate    cannot leave its HSM, but its data keys were given with
            --datakeys LABEL=FILE: migrate makes a new key with its label,
            id and attributes on the target and re-encrypts every data key
            in FILE under it into FILE.rotated (plaintext never on the host)
  skip      already on the target with the same id and check value
  blocked   cannot move, with the reason and what to do

It writes a plan file (canonical JSON with its own SHA-256 digest and a digest
of each cluster's inventory; never key material) for keymig migrate, and
prints a summary. Exit status: 0 nothing to do, 2 work to do, 1 error.

PINs come from KEYMIG_SOURCE_PIN and KEYMIG_TARGET_PIN, --source-pin-file and
--target-pin-file, or prompts.

Example:
  export KEYMIG_SOURCE_PIN=alice:pass1 KEYMIG_TARGET_PIN=alice:pass2
  keymig plan --source ./old --target ./new --filter attr.key-type=aes --out plan.json
  keymig plan --source ./old --target ./new --datakeys tde-master=tde-keys.jsonl --out plan.json`,
		Flags: append(pairFlags(true),
			&cli.StringSliceFlag{Name: "filter", Usage: "select source keys: key-reference=0x... or attr.NAME=VALUE (repeatable, ANDed)"},
			&cli.StringFlag{Name: "transport", Value: "auto", Usage: "how keys travel: auto, rsa-aes, rsa-oaep or session-kek"},
			&cli.StringFlag{Name: "hash", Usage: "OAEP hash of the transport: sha1, sha224, sha256, sha384 or sha512 (default: sha256, or the strongest both sides take)"},
			&cli.IntFlag{Name: "transport-bits", Value: 3072, Usage: "size of the RSA transport key: 2048, 3072 or 4096"},
			&cli.StringFlag{Name: "out", Required: true, Usage: "write the plan to `FILE`"},
			&cli.BoolFlag{Name: "force", Usage: "replace an existing plan file"},
			&cli.IntFlag{Name: "workers", Value: 64, Usage: "workers the time estimate assumes (as keymig migrate --workers)"},
			&cli.StringSliceFlag{Name: "datakeys", Usage: "`LABEL=FILE`: FILE (JSON Lines) holds the data keys of the non-extractable master key labelled LABEL; migrate rotates them under a new key on the target (repeatable)"},
			outputFlag(),
		),
		Action: func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			return runPlan(c.Context, e, planOptions{
				pairOptions: pairOptionsFrom(c), Filter: c.StringSlice("filter"), Transport: c.String("transport"),
				Hash: c.String("hash"), TransportBits: c.Int("transport-bits"), Out: c.String("out"),
				Force: c.Bool("force"), Output: out, Workers: c.Int("workers"), DataKeys: c.StringSlice("datakeys"),
			})
		},
	}
}

// planSummary is what plan prints: counts, the transport, an estimate and
// the blocked keys.
type planSummary struct {
	Plan      string         `json:"plan"`
	Digest    string         `json:"digest"`
	Source    plan.Cluster   `json:"source"`
	Target    plan.Cluster   `json:"target"`
	Actions   map[string]int `json:"actions"`
	Reasons   map[string]int `json:"blocked-reasons"`
	Transport plan.Transport `json:"transport"`
	Estimate  string         `json:"estimate"`
	Blocked   []plan.Item    `json:"blocked"`
	Rotations []plan.Item    `json:"rotations,omitempty"`
	// NotPreserved are the keys that move without something the target
	// cannot keep (their shares).
	NotPreserved []plan.Item `json:"not-preserved,omitempty"`
}

// planFlagError names the flag of an option plan could not use.
func planFlagError(err error) error {
	var oe *plan.OptionError
	if !errors.As(err, &oe) {
		return err
	}
	if oe.Value == "" {
		return fmt.Errorf("--%s: %s", oe.Option, oe.Problem)
	}
	return fmt.Errorf("--%s %s: %s", oe.Option, oe.Value, oe.Problem)
}

// planAdvice tells what to do about a blocked key with the flags of this CLI.
func planAdvice(code string, it plan.Item) string {
	if code == plan.ReasonNotExtractable {
		return fmt.Sprintf("give its data keys with --datakeys %s=FILE (or =postgres://USER@HOST/DB?table=SCHEMA.TABLE) to have migrate re-encrypt them under a new key on the target, or restore a backup into a clone and sync it", it.Label)
	}
	return ""
}

func runPlan(ctx context.Context, e *env, o planOptions) error {
	stdout := e.stdout
	// Check the options before logging in anywhere.
	opts := plan.Options{Filter: o.Filter, Transport: o.Transport, Hash: o.Hash, TransportBits: o.TransportBits, Advice: planAdvice}
	if err := opts.Validate(); err != nil {
		return planFlagError(err)
	}
	dataKeys, err := parseDataKeys(o.DataKeys)
	if err != nil {
		return err
	}
	p, err := openPair(ctx, e, o.pairOptions)
	if err != nil {
		return err
	}
	defer p.close(ctx)
	src, err := p.src.inventory(ctx)
	if err != nil {
		return err
	}
	dst, err := p.dst.inventory(ctx)
	if err != nil {
		return err
	}
	if err := scanDataKeys(ctx, dataKeys, src.Keys, dst.Keys); err != nil {
		return err
	}
	opts.DataKeys = dataKeys
	pl, err := plan.Build(src, dst, opts, time.Now())
	err = planFlagError(err)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	if err := pl.Write(&buf); err != nil {
		return err
	}
	if err := writeFileAtomic(o.Out, buf.Bytes(), 0o600, o.Force); err != nil {
		return err
	}
	sum := planSummary{
		Plan: o.Out, Digest: pl.Digest, Source: pl.Source, Target: pl.Target,
		Actions: map[string]int{}, Reasons: map[string]int{}, Transport: pl.Transport, Blocked: []plan.Item{},
	}
	for a, n := range pl.Counts() {
		sum.Actions[string(a)] = n
	}
	for _, it := range pl.Items {
		switch it.Action {
		case plan.Blocked:
			sum.Reasons[it.ReasonCode]++
			sum.Blocked = append(sum.Blocked, it)
		case plan.Rotate:
			sum.Rotations = append(sum.Rotations, it)
		}
		if it.NotPreserved != "" {
			sum.NotPreserved = append(sum.NotPreserved, it)
		}
	}
	sum.Estimate = estimate(ctx, p, src.Keys, dst.Keys, pl, o.Workers)
	if o.Output == outputJSON {
		err = writeJSON(stdout, sum)
	} else {
		err = printPlanSummary(stdout, sum)
	}
	if err != nil {
		return err
	}
	if pl.Work() > 0 {
		return errChangesPending
	}
	return nil
}

func printPlanSummary(w io.Writer, s planSummary) error {
	fmt.Fprintf(w, "plan %s (%s)\n", s.Plan, s.Digest)
	fmt.Fprintf(w, "source %s (%s, %s) as %s → target %s (%s, %s) as %s\n\n",
		s.Source.Dir, s.Source.ID, s.Source.Region, s.Source.User, s.Target.Dir, s.Target.ID, s.Target.Region, s.Target.User)
	t := newTable(w, "ACTION", "KEYS")
	for _, a := range []plan.Action{plan.Transfer, plan.Sync, plan.Rotate, plan.Skip, plan.Blocked} {
		t.row(string(a), fmt.Sprint(s.Actions[string(a)]))
	}
	t.flush()
	if len(s.Reasons) > 0 {
		fmt.Fprintln(w)
		t = newTable(w, "BLOCKED BECAUSE", "KEYS")
		for _, r := range sortedKeys(s.Reasons) {
			t.row(r, fmt.Sprint(s.Reasons[r]))
		}
		t.flush()
	}
	if s.Actions[string(plan.Transfer)] > 0 {
		fmt.Fprintf(w, "\ntransport: %s, RSA-%d with %s — %s\n", s.Transport.Method, s.Transport.Bits, s.Transport.Hash, s.Transport.Why)
	}
	fmt.Fprintf(w, "estimate: %s\n", s.Estimate)
	if len(s.Rotations) > 0 {
		fmt.Fprintln(w, "\nrotated (a new master on the target, data keys re-encrypted under it):")
		for _, it := range s.Rotations {
			made := ""
			if it.TargetRef != 0 {
				made = fmt.Sprintf(" (new master %s already made)", it.TargetRef)
			}
			fmt.Fprintf(w, "  %s %q: %d data keys, %s%s\n", it.Ref, it.Label, it.Rotation.Records, it.Rotation.Route(), made)
		}
	}
	if len(s.NotPreserved) > 0 {
		fmt.Fprintln(w, "\nnot preserved:")
		for _, it := range s.NotPreserved {
			fmt.Fprintf(w, "  %s %q: %s\n", it.Ref, it.Label, it.NotPreserved)
		}
	}
	if len(s.Blocked) > 0 {
		fmt.Fprintln(w, "\nblocked keys:")
		for i, it := range s.Blocked {
			if i == 50 {
				fmt.Fprintf(w, "  ... and %d more (see the plan file or --output json)\n", len(s.Blocked)-50)
				break
			}
			fmt.Fprintf(w, "  %s %q: %s\n", it.Ref, it.Label, it.Reason)
		}
	}
	if s.Actions[string(plan.Transfer)]+s.Actions[string(plan.Sync)]+s.Actions[string(plan.Rotate)] > 0 {
		fmt.Fprintf(w, "\nnext: keymig migrate --plan %s\n", s.Plan)
	} else {
		fmt.Fprintln(w, "\nnothing to move.")
	}
	return nil
}

func sortedKeys(m map[string]int) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// estimate guesses how long migrate will take, from round trips measured
// now on each cluster and, for per-key RSA transports, the speed of an RSA
// private-key operation on this machine (unwraps are CPU-bound here, since
// the included HSMs run in-process).
func estimate(ctx context.Context, p *pair, srcKeys, dstKeys []hsm.KeyInfo, pl *plan.Plan, workers int) string {
	n := pl.Work()
	if n == 0 {
		return "nothing to do"
	}
	workers = max(1, workers)
	rttSrc, rttDst := p.src.measureRTT(ctx, srcKeys), p.dst.measureRTT(ctx, dstKeys)
	if rttDst == 0 {
		rttDst = rttSrc
	}
	// Per key: wrap on the source; unwrap, share and coverage on the target.
	perKey := rttSrc + 3*rttDst
	total := time.Duration(n) * perKey / time.Duration(workers)
	cpu := ""
	if m := pl.Transport.Method; m == plan.MethodRSAAES || m == plan.MethodRSAOAEP {
		op := rsaOpTime(pl.Transport.Bits)
		if bound := time.Duration(n) * op / time.Duration(runtime.NumCPU()); bound > total {
			total = bound
			cpu = fmt.Sprintf(", bound by RSA-%d decryption at %s per key on %d cores", pl.Transport.Bits, op.Round(time.Microsecond), runtime.NumCPU())
		}
	}
	return fmt.Sprintf("about %s for %d keys with %d workers (round trip %s source, %s target%s)",
		total.Round(time.Second/10), n, workers, rttSrc.Round(time.Microsecond), rttDst.Round(time.Microsecond), cpu)
}

// rsaOpTime measures one RSA private-key operation of a 2048-bit key and
// scales it to bits (cost grows about with the cube of the size).
func rsaOpTime(bits int) time.Duration {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return 0
	}
	opts := &rsa.OAEPOptions{Hash: crypto.SHA256}
	ct, err := rsa.EncryptOAEPWithOptions(rand.Reader, &k.PublicKey, make([]byte, 32), opts)
	if err != nil {
		return 0
	}
	const n = 5
	start := time.Now()
	for i := 0; i < n; i++ {
		k.Decrypt(rand.Reader, ct, opts)
	}
	per := time.Since(start) / n
	f := float64(bits) / 2048
	return time.Duration(float64(per) * f * f * f)
}

// parseDataKeys reads --datakeys LABEL=FILE values; the files are read
// once the source keys are known (scanDataKeys).
func parseDataKeys(vals []string) ([]plan.DataKeys, error) {
	var out []plan.DataKeys
	for _, v := range vals {
		label, file, ok := strings.Cut(v, "=")
		if !ok || label == "" || file == "" {
			return nil, fmt.Errorf("--datakeys %q: want LABEL=FILE, the master key's label and its data-key file (JSON Lines), or LABEL=postgres://USER@HOST/DB?table=SCHEMA.TABLE", pgstore.Redact(v))
		}
		if pgstore.IsURL(file) {
			dk, err := dataKeyTable(label, file)
			if err != nil {
				return nil, fmt.Errorf("--datakeys %s=%s: %w", label, pgstore.Redact(file), err)
			}
			out = append(out, dk)
			continue
		}
		if _, err := os.Stat(file); err != nil {
			return nil, fmt.Errorf("--datakeys %s: %w", v, err)
		}
		out = append(out, plan.DataKeys{Label: label, In: file}) // plan.Build names the output
	}
	return out, nil
}

// dataKeyTable checks a data-key table's address for the plan file, which
// records it: the table named in it, no password.
func dataKeyTable(label, raw string) (plan.DataKeys, error) {
	if pgstore.HasPassword(raw) {
		return plan.DataKeys{}, errors.New("the plan file records this address, so it must not hold a password: put the password in PGPASSWORD, PGPASSFILE or ~/.pgpass")
	}
	connURL, o, err := pgstore.ParseAddress(raw)
	if err != nil {
		return plan.DataKeys{}, err
	}
	if o.Table == "" {
		return plan.DataKeys{}, errors.New("name the table in the address: add table=SCHEMA.TABLE to its query")
	}
	return plan.DataKeys{Label: label, In: pgstore.Address(connURL, o), Table: true}, nil
}

// scanDataKeys reads each data-key file once: its records, its bad lines
// (checked against the source key with its label) and its SHA-256. A
// label that is on no source key, or on several, is left to plan.Build to
// report.
func scanDataKeys(ctx context.Context, dks []plan.DataKeys, srcKeys, dstKeys []hsm.KeyInfo) error {
	for i := range dks {
		dk := &dks[i]
		var masters []hsm.KeyInfo
		for _, k := range srcKeys {
			if k.Label == dk.Label {
				masters = append(masters, k)
			}
		}
		if len(masters) != 1 {
			continue
		}
		if dk.Table {
			if err := censusDataKeys(ctx, dk, masters[0], dstKeys); err != nil {
				return fmt.Errorf("--datakeys %s=%s: %w", dk.Label, dk.In, err)
			}
			continue
		}
		rep, err := rotate.Scan(dk.In, masters[0])
		if err != nil {
			return fmt.Errorf("--datakeys %s=%s: %w", dk.Label, dk.In, err)
		}
		dk.SHA256, dk.Records, dk.Bad = rep.SHA256, rep.Records, rep.Bad
		if len(rep.Problems) > 0 {
			dk.Problem = rep.Problems[0]
		}
	}
	return nil
}

// censusDataKeys counts a data-key table's rows for the plan: those under
// the master to rotate, and those rotate would reject (a NULL, an unknown
// alg, another master). Rows under a key of the target with the master's
// label (a new master an earlier run made) are already rotated.
func censusDataKeys(ctx context.Context, dk *plan.DataKeys, master hsm.KeyInfo, dstKeys []hsm.KeyInfo) error {
	st, _, err := openTableView(ctx, dk.In, tableOptions{})
	if err != nil {
		return err
	}
	defer st.Close()
	census, err := st.Census(ctx)
	if err != nil {
		return err
	}
	rotated := map[string]bool{}
	for _, k := range dstKeys {
		if k.Label == master.Label {
			rotated[k.KCV.String()] = true
		}
	}
	var problems []string
	for _, c := range census {
		switch {
		case rotated[c.KCV]:
		case c.KCV != master.KCV.String():
			dk.Bad += c.Rows
			problems = append(problems, fmt.Sprintf("%d under master kcv %s, not %q's %s: narrow the address's filter=COLUMN=VALUE to this master's rows", c.Rows, orDash(c.KCV), master.Label, master.KCV))
		case c.Alg != rotate.AlgKWP && c.Alg != rotate.AlgGCM:
			dk.Bad += c.Rows
			problems = append(problems, fmt.Sprintf("%d with alg %q", c.Rows, c.Alg))
		default:
			dk.Records += c.Rows - c.Nulls
			if c.Nulls > 0 {
				dk.Bad += c.Nulls
				problems = append(problems, fmt.Sprintf("%d with a NULL column", c.Nulls))
			}
		}
	}
	dk.Problem = strings.Join(problems, "; ")
	return nil
}
