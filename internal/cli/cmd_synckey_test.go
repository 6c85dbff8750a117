package cli

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/testcluster"
	"github.com/urfave/cli/v2"
)

// TestServeUnitParses: the systemd unit's ExecStart is a command keymig
// accepts (the instance name %i stands for an HSM id).
func TestServeUnitParses(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "examples", "network", "keymig-hsm-serve@.service"))
	if err != nil {
		t.Fatal(err)
	}
	var args []string
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
			args = strings.Fields(strings.ReplaceAll(v, "%i", "hsm-abcdefghijk"))
		}
	}
	if len(args) < 3 || filepath.Base(args[0]) != "keymig" || args[1] != "hsm" || args[2] != "serve" {
		t.Fatalf("ExecStart %q is not keymig hsm serve", args)
	}
	var stderr bytes.Buffer
	app := newApp(strings.NewReader(""), io.Discard, &stderr)
	for _, c := range app.Commands {
		if c.Name == "hsm" {
			c.Subcommands = serveOnlyParses(c.Subcommands)
		}
	}
	if err := app.Run(args); err != nil || stderr.Len() > 0 {
		t.Fatalf("keymig refuses the unit's command %q: %v %s", args[1:], err, stderr.String())
	}
}

// serveOnlyParses replaces hsm serve's action: the flags parse, nothing runs.
func serveOnlyParses(cmds []*cli.Command) []*cli.Command {
	for _, c := range cmds {
		if c.Name == "serve" {
			c.Action = func(*cli.Context) error { return nil }
		}
	}
	return cmds
}

// exampleCommands extracts the keymig command lines of the scheduled-sync
// examples: the systemd unit's ExecStart, the cron line and the CronJob's
// args, each as the arguments after the binary.
func exampleCommands(t *testing.T) map[string][]string {
	t.Helper()
	dir := filepath.Join("..", "..", "examples", "sync")
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	afterKeymig := func(line string) []string {
		fields := strings.Fields(line)
		for i, f := range fields {
			if filepath.Base(f) == "keymig" {
				var args []string
				for _, a := range fields[i+1:] {
					if strings.HasPrefix(a, ">") || a == "|" || a == "2>&1" {
						break
					}
					args = append(args, a)
				}
				return args
			}
		}
		return nil
	}
	out := map[string][]string{}
	for _, line := range strings.Split(read("keymig-synckey.service"), "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
			out["keymig-synckey.service"] = afterKeymig(v)
		}
	}
	for _, line := range strings.Split(read("crontab"), "\n") {
		if line != "" && !strings.HasPrefix(line, "#") {
			out["crontab"] = afterKeymig(line)
		}
	}
	// The CronJob's args: the "- value" lines of the args: block.
	sc := bufio.NewScanner(strings.NewReader(read("cronjob.yaml")))
	in := false
	var args []string
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "args:":
			in = true
		case in && strings.HasPrefix(line, "- "):
			args = append(args, strings.Trim(strings.TrimPrefix(line, "- "), `"'`))
		case in:
			in = false
		}
	}
	out["cronjob.yaml"] = args
	if !strings.Contains(read("keymig-synckey.timer"), "OnUnitActiveSec=") {
		t.Errorf("keymig-synckey.timer has no OnUnitActiveSec")
	}
	return out
}

// flagNames lists a flag set's names and aliases.
func flagNames(fs []cli.Flag) map[string]bool {
	m := map[string]bool{"help": true, "h": true}
	for _, f := range fs {
		for _, n := range f.Names() {
			m[n] = true
		}
	}
	return m
}

// TestSyncExamplesNameRealCommands checks that the systemd unit, the cron
// line and the Kubernetes CronJob call commands and flags that exist: it
// walks the real app's commands, and then parses each line with --help
// through the real app.
func TestSyncExamplesNameRealCommands(t *testing.T) {
	for name, args := range exampleCommands(t) {
		t.Run(name, func(t *testing.T) {
			if len(args) == 0 {
				t.Fatal("no keymig command line found")
			}
			app := newApp(nil, io.Discard, io.Discard)
			global := flagNames(app.Flags)
			cmds := app.Commands
			var cmd *cli.Command
			var local map[string]bool
			for i := 0; i < len(args); i++ {
				a := args[i]
				if flag, ok := strings.CutPrefix(a, "--"); ok {
					flag, _, hasValue := strings.Cut(flag, "=")
					known := global
					if cmd != nil {
						known = local
					}
					if !known[flag] {
						t.Fatalf("%s: flag --%s is not a flag of %s", strings.Join(args, " "), flag, commandName(cmd))
					}
					// Skip the value of a flag that takes one.
					if !hasValue && takesValue(flagsOf(app, cmd), flag) {
						i++
					}
					continue
				}
				var next *cli.Command
				for _, c := range cmds {
					if c.HasName(a) {
						next = c
					}
				}
				if next == nil {
					t.Fatalf("%s: %q is not a command of %s", strings.Join(args, " "), a, commandName(cmd))
				}
				cmd, cmds, local = next, next.Subcommands, flagNames(next.Flags)
			}
			if cmd == nil || cmd.Name != "synckey" {
				t.Fatalf("%s: runs %s, want synckey", strings.Join(args, " "), commandName(cmd))
			}
			// The real parser agrees: the line with --help parses and prints help.
			var stdout, stderr bytes.Buffer
			if code := Run(append(append([]string{"keymig"}, args...), "--help"), nil, &stdout, &stderr); code != exitOK {
				t.Fatalf("keymig %s --help: exit %d\n%s", strings.Join(args, " "), code, stderr.String())
			}
			if !strings.Contains(stdout.String(), "synckey") {
				t.Errorf("keymig %s --help printed no synckey help:\n%s", strings.Join(args, " "), stdout.String())
			}
		})
	}
}

func commandName(c *cli.Command) string {
	if c == nil {
		return "keymig"
	}
	return "keymig " + c.Name
}

func flagsOf(app *cli.App, c *cli.Command) []cli.Flag {
	if c == nil {
		return app.Flags
	}
	return c.Flags
}

// takesValue reports whether the flag named name takes a value.
func takesValue(fs []cli.Flag, name string) bool {
	for _, f := range fs {
		for _, n := range f.Names() {
			if n == name {
				if dv, ok := f.(cli.DocGenerationFlag); ok {
					return dv.TakesValue()
				}
				return true
			}
		}
	}
	return false
}

func TestSynckeyJournalPath(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	os.Mkdir(src, 0o700)
	if _, err := synckeyJournalPath(src, dst); err == nil || !strings.Contains(err.Error(), src) {
		t.Fatalf("no cluster.json: %v, want an error naming %s", err, src)
	}
	os.WriteFile(filepath.Join(src, "cluster.json"), []byte(`{"cluster-id": "cluster-abc", "hsms": [{"hsm-id": "hsm-1"}]}`), 0o600)
	got, err := synckeyJournalPath(src, dst)
	if err != nil || got != filepath.Join(dst, "synckey-cluster-abc.journal") {
		t.Fatalf("got %q, %v", got, err)
	}
	os.WriteFile(filepath.Join(src, "cluster.json"), []byte(`{"cluster-id": "../x", "hsms": [{"hsm-id": "hsm-1"}]}`), 0o600)
	if _, err := synckeyJournalPath(src, dst); err == nil || !strings.Contains(err.Error(), "--journal") {
		t.Fatalf("a cluster id with a slash: %v, want an error suggesting --journal", err)
	}
}

func TestSynckeyRefusesBadOptions(t *testing.T) {
	e := &env{stdin: nil, stdout: io.Discard, stderr: io.Discard, getenv: func(string) string { return "" }}
	base := synckeyOptions{pairOptions: pairOptions{SourceDir: "a", TargetDir: "b"}, Jitter: "10%"}
	for _, tc := range []struct {
		name string
		edit func(*synckeyOptions)
		want string
	}{
		{"yes without prune", func(o *synckeyOptions) { o.Yes = true }, "--yes confirms --prune"},
		{"dry run every", func(o *synckeyOptions) { o.DryRun, o.Every = true, 1 }, "--dry-run and --every"},
		{"same dir", func(o *synckeyOptions) { o.TargetDir = "./a" }, "same cluster directory"},
		{"jitter", func(o *synckeyOptions) { o.Jitter = "80%" }, "--jitter"},
		{"filter", func(o *synckeyOptions) { o.Filter = []string{"attr.bogus=1"} }, "bogus"},
		{"no pin", func(o *synckeyOptions) {}, "KEYMIG_SOURCE_PIN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := base
			tc.edit(&o)
			err := runSynckey(context.Background(), withStreams(e, io.Discard, io.Discard), o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// TestRunSynckeyInProcess syncs a clone through runSynckey, the way the
// command does: a dry run (changes pending), a sync, a second sync with
// nothing to do.
func TestRunSynckeyInProcess(t *testing.T) {
	src, dst := testcluster.ClonePair(t, keymigtest.TempDir(t))
	testcluster.GenerateAES(t, src, "p", 4, map[hsm.Attr]bool{hsm.AttrExtractable: false})
	pin := testcluster.PIN
	e := &env{stdout: io.Discard, stderr: io.Discard, getenv: func(k string) string {
		if k == envSourcePIN || k == envTargetPIN {
			return pin
		}
		return ""
	}}
	e.log, _ = newLogger(io.Discard, "text", "info")
	o := synckeyOptions{pairOptions: pairOptions{SourceDir: src, TargetDir: dst}, Jitter: "10%", Workers: 4, NoProgress: true, Output: outputText}
	var out bytes.Buffer
	dry := o
	dry.DryRun = true
	if err := runSynckey(context.Background(), withStreams(e, &out, io.Discard), dry); !errors.Is(err, errChangesPending) {
		t.Fatalf("dry run: %v, want changes pending\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "0 same, 4 to copy") {
		t.Errorf("dry run:\n%s", out.String())
	}
	for i, want := range []string{"0 same, 4 copied, 0 failed", "4 same, 0 copied, 0 failed"} {
		out.Reset()
		if err := runSynckey(context.Background(), withStreams(e, &out, io.Discard), o); err != nil {
			t.Fatalf("sync %d: %v\n%s", i+1, err, out.String())
		}
		if !strings.Contains(out.String(), want) {
			t.Errorf("sync %d: want %q in\n%s", i+1, want, out.String())
		}
	}
}
