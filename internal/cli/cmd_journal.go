package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/keymig/keymig/journal"
	"github.com/urfave/cli/v2"
)

// journalOptions are the flags of the keymig journal commands.
type journalOptions struct {
	Path   string
	Run    string
	State  string
	Kind   string
	Keep   int
	Output outputFormat
}

func journalCommand(e *env) *cli.Command {
	flags := func(extra ...cli.Flag) []cli.Flag {
		return append([]cli.Flag{
			&cli.StringFlag{Name: "journal", Aliases: []string{"j"}, Required: true, Usage: "the journal `FILE` (default of migrate: plan.json.journal)"},
			outputFlag(),
		}, extra...)
	}
	runFlag := &cli.StringFlag{Name: "run", Usage: "the run `ID` (plan digest); default: the newest run"}
	action := func(fn func(context.Context, *env, journalOptions) error) cli.ActionFunc {
		return func(c *cli.Context) error {
			out, err := commandOutput(c)
			if err != nil {
				return err
			}
			return fn(c.Context, e, journalOptions{Path: c.String("journal"), Run: c.String("run"), State: c.String("state"),
				Kind: c.String("kind"), Keep: c.Int("keep"), Output: out})
		}
	}
	return &cli.Command{
		Name:  "journal",
		Usage: "inspect, check or unlock a job's journal",
		Description: `Each migrate, rotate or synckey job records every step in a journal (a bbolt
file, by default beside the plan). It never holds key material or PINs.`,
		Subcommands: []*cli.Command{
			{Name: "status", Usage: "show each run: status, counts per state, times", Flags: flags(), Action: action(runJournalStatus)},
			{Name: "show", Usage: "list the items of a run with state, attempts, result and last error",
				Flags: flags(runFlag, &cli.StringFlag{Name: "state", Usage: "only items in `STATE` (e.g. failed)"}), Action: action(runJournalShow)},
			{Name: "export", Usage: "write a run's items as JSON lines", Flags: flags(runFlag), Action: action(runJournalExport)},
			{Name: "check", Usage: "check the file (bbolt consistency) and every record", Flags: flags(), Action: action(runJournalCheck)},
			{Name: "unlock", Usage: "release the lock left by a keymig process that died",
				Description: "unlock refuses while the process that holds the journal is alive.", Flags: flags(), Action: action(runJournalUnlock)},
			{Name: "prune", Usage: "delete the oldest finished runs of a kind, keeping the newest N",
				UsageText: "keymig journal prune --journal FILE --kind synckey --keep 100",
				Description: `A scheduled keymig synckey adds a run to its journal each time; prune keeps
the newest --keep finished (done) runs of --kind and deletes the older ones
with their items. Runs that are running, failed or interrupted are never
deleted. It takes the journal's lock, so it waits for (or refuses) a job
that has it open. synckey --keep-runs does this after every run.

Example:
  keymig journal prune --journal ./clone/synckey-cluster-abc.journal --kind synckey --keep 100`,
				Flags: flags(
					&cli.StringFlag{Name: "kind", Required: true, Usage: "the kind of run to prune: synckey, rotate or migrate"},
					&cli.IntFlag{Name: "keep", Value: 100, Usage: "finished runs to keep, the newest"},
				), Action: action(runJournalPrune)},
		},
	}
}

func openJournalRO(path string) (*journal.Journal, error) {
	return journal.Open(path, journal.Options{ReadOnly: true})
}

func runJournalStatus(_ context.Context, e *env, o journalOptions) error {
	w := e.stdout
	j, err := openJournalRO(o.Path)
	if err != nil {
		return err
	}
	defer j.Close()
	runs, err := j.Runs()
	if err != nil {
		return err
	}
	type runStatus struct {
		journal.RunInfo
		States map[string]int `json:"states"`
	}
	var out []runStatus
	for _, ri := range runs {
		r, _, err := j.Run(ri.ID)
		if err != nil {
			return err
		}
		c, err := r.Counts()
		if err != nil {
			return err
		}
		out = append(out, runStatus{ri, c})
	}
	if o.Output == outputJSON {
		return writeJSON(w, out)
	}
	if len(out) == 0 {
		fmt.Fprintf(w, "journal %s has no runs\n", o.Path)
		return nil
	}
	t := newTable(w, "RUN", "KIND", "STATUS", "UPDATED", "ITEMS")
	for _, r := range out {
		var parts []string
		for _, s := range sortedKeys(r.States) {
			parts = append(parts, fmt.Sprintf("%s=%d", s, r.States[s]))
		}
		t.row(r.ID, r.Kind, r.Status, r.Updated.Format(time.RFC3339), strings.Join(parts, " "))
	}
	return t.flush()
}

func pickRun(j *journal.Journal, id string) (*journal.Run, error) {
	if id != "" {
		r, _, err := j.Run(id)
		return r, err
	}
	runs, err := j.Runs()
	if err != nil {
		return nil, err
	}
	if len(runs) == 0 {
		return nil, fmt.Errorf("journal %s has no runs", j.Path())
	}
	r, _, err := j.Run(runs[len(runs)-1].ID)
	return r, err
}

func runJournalShow(_ context.Context, e *env, o journalOptions) error {
	w := e.stdout
	j, err := openJournalRO(o.Path)
	if err != nil {
		return err
	}
	defer j.Close()
	r, err := pickRun(j, o.Run)
	if err != nil {
		return err
	}
	var items []journal.Item
	if err := r.Items(func(it journal.Item) error {
		if o.State == "" || it.State == o.State {
			items = append(items, it)
		}
		return nil
	}); err != nil {
		return err
	}
	if o.Output == outputJSON {
		return writeJSON(w, nonNil(items))
	}
	t := newTable(w, "ITEM", "STATE", "ATTEMPTS", "RESULT", "LAST ERROR")
	for _, it := range items {
		t.row(it.Key, it.State, fmt.Sprint(it.Attempts), it.Result, it.LastError)
	}
	return t.flush()
}

func runJournalExport(_ context.Context, e *env, o journalOptions) error {
	w := e.stdout
	j, err := openJournalRO(o.Path)
	if err != nil {
		return err
	}
	defer j.Close()
	r, err := pickRun(j, o.Run)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(w)
	return r.Items(func(it journal.Item) error { return enc.Encode(it) })
}

func runJournalCheck(_ context.Context, e *env, o journalOptions) error {
	w := e.stdout
	j, err := openJournalRO(o.Path)
	if err != nil {
		return err
	}
	defer j.Close()
	errs := j.Check()
	if len(errs) == 0 {
		fmt.Fprintf(w, "journal %s: ok\n", o.Path)
		return nil
	}
	for _, e := range errs {
		fmt.Fprintf(w, "journal %s: %v\n", o.Path, e)
	}
	return fmt.Errorf("journal %s: %d problem(s); move it aside and re-run the job — it adopts keys already on the target", o.Path, len(errs))
}

func runJournalUnlock(_ context.Context, e *env, o journalOptions) error {
	w := e.stdout
	l, err := journal.Unlock(o.Path)
	if err != nil {
		return err
	}
	if l == nil {
		fmt.Fprintf(w, "journal %s was not locked\n", o.Path)
		return nil
	}
	fmt.Fprintf(w, "journal %s: released the lock of %s, which is no longer running\n", o.Path, l)
	return nil
}

func runJournalPrune(_ context.Context, e *env, o journalOptions) error {
	w := e.stdout
	switch o.Kind {
	case "synckey", "rotate", "migrate":
	default:
		return fmt.Errorf("--kind %q: want synckey, rotate or migrate", o.Kind)
	}
	if _, err := os.Stat(o.Path); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	j, err := journal.Open(o.Path, journal.Options{Command: "journal prune"})
	if err != nil {
		return err
	}
	defer j.Close()
	n, err := j.Prune(o.Kind, o.Keep)
	if err != nil {
		return err
	}
	if o.Output == outputJSON {
		return writeJSON(w, struct {
			Journal string `json:"journal"`
			Kind    string `json:"kind"`
			Removed int    `json:"removed"`
			Kept    int    `json:"kept"`
		}{o.Path, o.Kind, n, o.Keep})
	}
	fmt.Fprintf(w, "journal %s: deleted %d finished %s run(s), kept at most the newest %d\n", o.Path, n, o.Kind, o.Keep)
	return nil
}
