package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/synckey"
	"github.com/sourcegraph/conc/pool"
)

// newClonePair makes a 2-HSM source cluster with a crypto user (see
// newCrashCluster) and a 2-HSM clone of it in dir/dst, as backup + restore.
func newClonePair(t *testing.T, dir string) (src, dst string) {
	t.Helper()
	ctx := context.Background()
	src, dst = filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	newCrashCluster(t, src, 2)
	c, err := cluster.Open(ctx, src, cluster.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	backup := filepath.Join(dir, "src.backup")
	if _, err := c.Backup(ctx, backup); err != nil {
		t.Fatal(err)
	}
	c.Close()
	clone, err := cluster.Restore(ctx, cluster.RestoreOptions{Backup: backup, Dir: dst, Region: "eu-west-1", HSMs: 2, KDFIterations: 1000})
	if err != nil {
		t.Fatal(err)
	}
	clone.Close()
	return src, dst
}

// generateKeys makes n AES-256 keys with ids prefix%05d on the cluster at
// dir, concurrently, and returns id → KCV.
func generateKeys(t *testing.T, dir, prefix string, n int, attrs map[hsm.Attr]bool) map[string]hsm.Bytes {
	t.Helper()
	want := map[string]hsm.Bytes{}
	withUser(t, dir, func(s hsm.Session) {
		p := pool.NewWithResults[hsm.KeyInfo]().WithErrors().WithMaxGoroutines(16)
		for i := 0; i < n; i++ {
			p.Go(func() (hsm.KeyInfo, error) {
				return s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
					Label: prefix, ID: hsm.Bytes(fmt.Sprintf("%s%05d", prefix, i)), Attrs: attrs,
				}})
			})
		}
		infos, err := p.Wait()
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range infos {
			want[k.ID.String()] = k.KCV
		}
	})
	return want
}

// checkSynced checks that every wanted key is on the target exactly once,
// with its KCV, on at least two HSMs.
func checkSynced(t *testing.T, dst string, want map[string]hsm.Bytes) {
	t.Helper()
	withUser(t, dst, func(s hsm.Session) {
		got, err := s.ListKeys(context.Background(), hsm.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]int{}
		for _, k := range got {
			id := k.ID.String()
			kcv, ok := want[id]
			if !ok {
				continue
			}
			seen[id]++
			if kcv.String() != k.KCV.String() {
				t.Errorf("key id %s: KCV %s on the target, %s on the source", id, k.KCV, kcv)
			}
			if k.Coverage.Count() < 2 {
				t.Errorf("key id %s on %d HSMs: %s", id, k.Coverage.Count(), k.Coverage)
			}
		}
		for id := range want {
			if seen[id] != 1 {
				t.Errorf("key id %s is on the target %d times, want exactly 1", id, seen[id])
			}
		}
	})
}

// synckeyRuns reads the sync runs of a journal, oldest first, and checks
// the file.
func synckeyRuns(t *testing.T, path string) []synckey.Summary {
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
	var out []synckey.Summary
	for _, r := range runs {
		var s synckey.Summary
		if len(r.Summary) > 0 {
			if err := json.Unmarshal(r.Summary, &s); err != nil {
				t.Fatalf("run %s: summary: %v", r.ID, err)
			}
		}
		s.Run, s.Status = r.ID, r.Status
		out = append(out, s)
	}
	return out
}

// TestSynckeySurvivesKills runs keymig synckey as a real process on 3,000
// keys made on the source after the clone, kills it with SIGKILL at random
// moments at least 10 times, resuming each time, then checks every key: on
// the target exactly once, with its KCV, on two HSMs; the journal checks
// clean and its last run is done.
func TestSynckeySurvivesKills(t *testing.T) {
	keys := envInt("KEYMIG_TORTURE_KEYS", 3000)
	kills := envInt("KEYMIG_TORTURE_KILLS", 10)
	if testing.Short() {
		keys, kills = 300, 3
	}
	bin := keymigBin(t)
	src, dst := newClonePair(t, t.TempDir())
	want := generateKeys(t, src, "s", keys, nil)
	// A round trip per HSM call keeps each run long enough to be killed
	// in the middle, as a remote region would.
	if err := cluster.SetFault(dst, cluster.AllHSMs, cluster.Fault{Latency: time.Millisecond}); err != nil {
		t.Fatal(err)
	}

	pin := crashUser + ":" + crashPass
	syncCmd := func() *exec.Cmd {
		cmd := exec.Command(bin, "synckey", "--source", src, "--target", dst, "--workers", "4", "--no-progress")
		cmd.Env = append(os.Environ(), envSourcePIN+"="+pin, envTargetPIN+"="+pin)
		return cmd
	}
	// A dry run takes as long as a sync takes to start copying: kill
	// around and after that moment, so that most kills land mid-copy.
	start := time.Now()
	dry := syncCmd()
	dry.Args = append(dry.Args, "--dry-run")
	if out, err := dry.CombinedOutput(); exitStatus(err) != exitPending {
		t.Fatalf("synckey --dry-run: %v, want exit %d\n%s", err, exitPending, lastLines(string(out), 5))
	}
	startup := time.Since(start)
	killed, runs, finished := 0, 0, false
	for killed < kills && runs < 4*kills && !finished {
		runs++
		if k, _ := runAndKill(t, fmt.Sprintf("synckey run %d", runs), syncCmd(), startup*3/4+time.Duration(rand.IntN(600))*time.Millisecond); k {
			killed++
		} else {
			finished = true
		}
	}
	t.Logf("%d keys, %d runs, %d killed by SIGKILL (start-up %s)", keys, runs, killed, startup.Round(time.Millisecond))
	if killed < kills {
		t.Errorf("the sync finished after %d kills, before the %d wanted: make each run slower or the kills sooner", killed, kills)
	}
	cluster.ClearFault(dst, cluster.AllHSMs)

	out, err := syncCmd().CombinedOutput()
	if err != nil {
		t.Fatalf("final synckey: %v\n%s", err, out)
	}
	t.Logf("final run:\n%s", lastLines(string(out), 3))
	checkSynced(t, dst, want)

	jpath, err := synckeyJournalPath(src, dst)
	if err != nil {
		t.Fatal(err)
	}
	// Each key was copied by exactly one run, most of them by runs that
	// were killed and resumed; a last sync finds nothing to do.
	sums := synckeyRuns(t, jpath)
	copied := 0
	for _, s := range sums {
		if s.Status != journal.RunDone {
			t.Errorf("run %s: %s, want done", s.Run, s.Status)
		}
		copied += s.Copied
	}
	if copied != keys {
		t.Errorf("the runs' summaries count %d keys copied, want %d", copied, keys)
	}
	if last := sums[len(sums)-1]; last.Copied == keys {
		t.Errorf("the final run copied every key: no kill landed during a copy (start-up %s)", startup)
	}
	out, err = syncCmd().CombinedOutput()
	if err != nil || !strings.Contains(string(out), fmt.Sprintf("done; %d same, 0 copied, 0 failed", keys)) {
		t.Errorf("a sync after the end: %v\n%s", err, lastLines(string(out), 3))
	}
}

// exitStatus is the exit code of a finished command's error, 0 for nil.
func exitStatus(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// TestSynckeyEvery runs keymig synckey --every with a short period as a
// real process: three runs happen, a key added on the source between runs
// is copied by the next one, and SIGTERM between runs ends it with exit 0.
func TestSynckeyEvery(t *testing.T) {
	bin := keymigBin(t)
	src, dst := newClonePair(t, t.TempDir())
	generateKeys(t, src, "a", 5, nil)
	pin := crashUser + ":" + crashPass
	cmd := exec.Command(bin, "synckey", "--source", src, "--target", dst, "--every", "300ms", "--jitter", "10%", "--no-progress")
	cmd.Env = append(os.Environ(), envSourcePIN+"="+pin, envTargetPIN+"="+pin)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()

	// Every log line, and a signal each time the loop goes to sleep.
	var (
		mu   sync.Mutex
		logs strings.Builder
	)
	sleeping := make(chan struct{}, 16)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			mu.Lock()
			logs.WriteString(sc.Text() + "\n")
			mu.Unlock()
			if strings.Contains(sc.Text(), `msg="next sync"`) {
				sleeping <- struct{}{}
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	wait := func(what string) {
		t.Helper()
		select {
		case <-sleeping:
		case <-time.After(30 * time.Second):
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("no %s within 30s; stderr:\n%s", what, logs.String())
		}
	}
	wait("first run")
	added := generateKeys(t, src, "late", 1, map[hsm.Attr]bool{hsm.AttrExtractable: false})
	wait("second run")
	wait("third run")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	mu.Lock()
	log := logs.String()
	mu.Unlock()
	if err != nil {
		t.Fatalf("synckey --every after SIGTERM: %v, want exit 0\nstderr:\n%s", err, log)
	}
	if !strings.Contains(log, "stopped between syncs") {
		t.Errorf("no 'stopped between syncs' in the log:\n%s", log)
	}
	checkSynced(t, dst, added)

	jpath, err := synckeyJournalPath(src, dst)
	if err != nil {
		t.Fatal(err)
	}
	sums := synckeyRuns(t, jpath)
	if len(sums) < 3 {
		t.Fatalf("%d runs in the journal, want at least 3", len(sums))
	}
	var copies []int
	for _, s := range sums {
		if s.Status != journal.RunDone {
			t.Errorf("run %s: %s, want done", s.Run, s.Status)
		}
		copies = append(copies, s.Copied)
	}
	// The first run copies the 5 keys made after the clone, a later one
	// the key added between runs, and the rest nothing.
	if copies[0] != 5 || !containsAfter(copies, 1, 1) {
		t.Errorf("keys copied per run: %v; want 5 first and 1 in a later run", copies)
	}
	if n := strings.Count(log, `msg="sync run finished"`); n != len(sums) {
		t.Errorf("%d 'sync run finished' log lines for %d runs", n, len(sums))
	}
}

func containsAfter(xs []int, from, v int) bool {
	for _, x := range xs[min(from, len(xs)):] {
		if x == v {
			return true
		}
	}
	return false
}
