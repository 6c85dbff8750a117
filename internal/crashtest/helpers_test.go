package crashtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/pgtest"
	"github.com/keymig/keymig/internal/softhsmtest"
	"github.com/keymig/keymig/internal/testcluster"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/plan"
)

// keymigBin is the keymig binary TestMain built.
var keymigBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "keymig-crashtest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "crashtest:", err)
		os.Exit(1)
	}
	keymigBin = filepath.Join(dir, "keymig")
	// Without the race detector even under go test -race: the killed
	// processes run the code the in-process tests race-check, and an
	// instrumented binary would make each of the hundreds of runs here
	// several times slower.
	build := exec.Command(goTool(), "build", "-o", keymigBin, "github.com/keymig/keymig")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "crashtest: building keymig: %v\n", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	pgtest.Stop()
	softhsmtest.Cleanup()
	os.RemoveAll(dir)
	os.Exit(code)
}

// goTool is the go command running these tests.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := os.Getenv("GOROOT"); root != "" {
		return filepath.Join(root, "bin", "go")
	}
	return "go"
}

// result is how one keymig process ended.
type result struct {
	args   []string
	out    string // stdout and stderr
	code   int    // exit status; -1 if killed by a signal
	killed bool   // by SIGKILL, at a failpoint
}

func (r result) String() string {
	return fmt.Sprintf("keymig %s: exit %d killed %v\n%s", strings.Join(r.args, " "), r.code, r.killed, lastLines(r.out, 15))
}

// keymigEnv is the environment of every keymig process the tests start.
func keymigEnv(failpoints string) []string {
	return append(os.Environ(),
		"KEYMIG_PIN="+testcluster.PIN, "KEYMIG_SOURCE_PIN="+testcluster.PIN, "KEYMIG_TARGET_PIN="+testcluster.PIN,
		"GORACE=atexit_sleep_ms=0", "PGPASSWORD="+pgtest.Password, failpoint.EnvVar+"="+failpoints)
}

// keymig runs the binary with failpoints (may be empty) and args.
func keymig(t *testing.T, failpoints string, args ...string) result {
	t.Helper()
	cmd := exec.Command(keymigBin, args...)
	cmd.Env = keymigEnv(failpoints)
	out, err := cmd.CombinedOutput()
	return ended(args, string(out), err, t)
}

func ended(args []string, out string, err error, t *testing.T) result {
	t.Helper()
	r := result{args: args, out: out}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			r.killed = ws.Signal() == syscall.SIGKILL
		}
	default:
		t.Fatalf("keymig %v: %v", args, err)
	}
	return r
}

// must runs keymig without failpoints and wants exit status want.
func must(t *testing.T, want int, args ...string) result {
	t.Helper()
	r := keymig(t, "", args...)
	if r.code != want || r.killed {
		t.Fatalf("want exit %d: %s", want, r)
	}
	return r
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// copyDir copies the regular files of from (a cluster directory that no
// process has open) into to, keeping modes.
func copyDir(t *testing.T, from, to string) {
	t.Helper()
	err := filepath.WalkDir(from, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, path)
		dst := filepath.Join(to, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			return os.MkdirAll(dst, info.Mode().Perm())
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(dst, b, info.Mode().Perm())
	})
	if err != nil {
		t.Fatal(err)
	}
}

// keyCheck is what checkTarget expects of the target cluster.
type keyCheck struct {
	// want is id → KCV of every key that must be there exactly once.
	want map[string]hsm.Bytes
	// only says no other key may be there.
	only bool
}

// checkTarget checks the cluster at dir as alice sees it: every wanted key
// exactly once, with its KCV, on at least two HSMs; no transport or
// session object; with only, nothing else.
func checkTarget(t *testing.T, dir string, c keyCheck) []hsm.KeyInfo {
	t.Helper()
	var keys []hsm.KeyInfo
	testcluster.WithUser(t, dir, func(s hsm.Session) {
		var err error
		if keys, err = s.ListKeys(context.Background(), hsm.Filter{}); err != nil {
			t.Fatal(err)
		}
	})
	seen := map[string]int{}
	for _, k := range keys {
		if !k.Attrs.Token {
			t.Errorf("session object %s (%q) is visible on %s", k.Ref, k.Label, dir)
		}
		if strings.HasPrefix(k.Label, plan.TransportLabelPrefix) || strings.HasPrefix(k.Label, "keymig-rotate") {
			t.Errorf("transport key %s (%q) left on %s", k.Ref, k.Label, dir)
		}
		id := k.ID.String()
		kcv, ok := c.want[id]
		if !ok {
			if c.only {
				t.Errorf("unexpected key %s (%q, id %s) on %s", k.Ref, k.Label, id, dir)
			}
			continue
		}
		seen[id]++
		if kcv.String() != k.KCV.String() {
			t.Errorf("key id %s: KCV %s on %s, want %s", id, k.KCV, dir, kcv)
		}
		if k.Coverage.Count() < 2 {
			t.Errorf("key id %s on %d HSMs of %s: %s", id, k.Coverage.Count(), dir, k.Coverage)
		}
	}
	for id := range c.want {
		if seen[id] != 1 {
			t.Errorf("key id %s is on %s %d times, want exactly 1", id, dir, seen[id])
		}
	}
	return keys
}

// checkJournal checks the journal at path and wants every run in it done.
func checkJournal(t *testing.T, path string) []journal.RunInfo {
	t.Helper()
	j, err := journal.Open(path, journal.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if errs := j.Check(); len(errs) > 0 {
		t.Fatalf("journal check: %v", errs)
	}
	runs, err := j.Runs()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range runs {
		if r.Status != journal.RunDone {
			t.Errorf("journal %s: run %s is %s, want done", path, r.ID, r.Status)
		}
	}
	return runs
}

// countPasses runs a job once, uninterrupted, with a mark at every point
// of points, and returns how often it passed each: the measure against
// which kills are placed early, in the middle and late.
func countPasses(t *testing.T, points []failpoint.Point, job func(failpoints string) result) map[failpoint.Point]int {
	t.Helper()
	dir := t.TempDir()
	var spec []string
	file := func(p failpoint.Point) string { return filepath.Join(dir, strings.ReplaceAll(string(p), "/", "_")) }
	for _, p := range points {
		spec = append(spec, fmt.Sprintf("%s=mark(%s)", p, file(p)))
	}
	if r := job(strings.Join(spec, ";")); r.code != 0 || r.killed {
		t.Fatalf("the uninterrupted run: %s", r)
	}
	out := map[failpoint.Point]int{}
	for _, p := range points {
		out[p] = keymigtest.MarkerLines(file(p))
		if out[p] == 0 {
			t.Errorf("an uninterrupted run never passes %s: the point is misplaced, or this test does not exercise it", p)
		}
	}
	return out
}

// killPasses are the passes through a point at which a job is killed:
// early, in the middle and late in a job that passes the point total
// times (fewer when the point is passed only a few times). Each kill is a
// case of its own, started afresh from the same state as the run that
// counted the passes, so the pass it waits for always comes, whatever the
// other workers were doing when the first passes went by.
func killPasses(total int) []int {
	var out []int
	for _, n := range []int{max(1, total/10), max(1, total/2), max(1, total*9/10)} {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// killCase is a job to kill at a failpoint, afresh.
type killCase interface {
	// run runs the job's command once with failpoints set.
	run(failpoints string) result
	// command is the arguments of that command.
	command() []string
	// finish runs the job to its end and checks everything.
	finish()
}

// killAtEveryPass runs, for each point of points and each of its kill
// passes, a fresh case made by newCase, killed there; then it finishes
// the job and checks it. passes is what countPasses measured.
func killAtEveryPass(t *testing.T, points []failpoint.Point, passes map[failpoint.Point]int, newCase func(t *testing.T) killCase) {
	t.Helper()
	var wg sync.WaitGroup
	busy := make(chan struct{}, casesAtOnce)
	for _, p := range points {
		for _, n := range killPasses(passes[p]) {
			busy <- struct{}{}
			wg.Go(func() {
				defer func() { <-busy }()
				t.Run(fmt.Sprintf("%s@%d", strings.ReplaceAll(string(p), "/", "-"), n), func(t *testing.T) {
					c := newCase(t)
					if r := c.run(fmt.Sprintf("%s=kill@%d", p, n)); !r.killed {
						t.Fatalf("not killed at pass %d of %s (an uninterrupted run passes it %d times): %s", n, p, passes[p], r)
					}
					c.finish()
				})
			})
		}
	}
	wg.Wait()
}

// casesAtOnce bounds the kill cases run at once. A case waits on its
// processes' fsyncs more than on the CPU, so more cases than cores keep
// both cores busy (the crash tests took 58s with 2 at once, 42s with 8).
const casesAtOnce = 6

// running is a keymig process started by startKeymig.
type running struct {
	t      *testing.T
	cmd    *exec.Cmd
	out    syncBuffer
	exited chan error
}

// startKeymig starts keymig with failpoints and args, and kills it when
// the test ends if it is still running.
func startKeymig(t *testing.T, failpoints string, args ...string) *running {
	t.Helper()
	r := &running{t: t, cmd: exec.Command(keymigBin, args...), exited: make(chan error, 1)}
	r.cmd.Env = keymigEnv(failpoints)
	r.cmd.Stdout, r.cmd.Stderr = &r.out, &r.out
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { r.exited <- r.cmd.Wait() }()
	t.Cleanup(func() { r.cmd.Process.Kill() })
	return r
}

// signal sends sig to the process.
func (r *running) signal(sig os.Signal) {
	r.t.Helper()
	if err := r.cmd.Process.Signal(sig); err != nil {
		r.t.Fatal(err)
	}
}

// wait waits for the process to end and says how.
func (r *running) wait() result {
	r.t.Helper()
	err := <-r.exited
	return ended(r.cmd.Args[1:], r.out.String(), err, r.t)
}

// waitMarker waits until the marker file at path holds lines lines, or
// fails the test when the process exits first. The bound only keeps a
// broken binary from hanging the test.
func (r *running) waitMarker(path string, lines int) {
	r.t.Helper()
	tick := time.NewTicker(10 * time.Millisecond) // polling for a marker the program writes
	defer tick.Stop()
	deadline := time.After(2 * time.Minute)
	for keymigtest.MarkerLines(path) < lines {
		select {
		case err := <-r.exited:
			r.exited <- err
			r.t.Fatalf("keymig ended (%v) before writing marker %s line %d:\n%s", err, path, lines, lastLines(r.out.String(), 15))
		case <-deadline:
			r.t.Fatalf("keymig never wrote marker %s line %d:\n%s", path, lines, lastLines(r.out.String(), 15))
		case <-tick.C:
		}
	}
}

// syncBuffer is an output buffer a test may read while a process writes it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
