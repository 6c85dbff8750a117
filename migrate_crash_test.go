package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/plan"
	"github.com/sourcegraph/conc/pool"
)

const (
	crashOfficer = "admin:crash-admin-pass"
	crashUser    = "alice"
	crashPass    = "crash-alice-pass"
)

// newCrashCluster makes an n-HSM cluster with a crypto user, cheaply.
func newCrashCluster(t *testing.T, dir string, hsms int) {
	t.Helper()
	ctx := context.Background()
	officer, _ := hsm.ParsePIN(crashOfficer)
	c, err := cluster.Init(ctx, cluster.InitOptions{Dir: dir, HSMs: hsms, Officer: officer, KDFIterations: 1000, KeyCapacity: 20000})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Logout(ctx)
	if err := s.CreateUser(ctx, crashUser, hsm.RoleCryptoUser, crashPass); err != nil {
		t.Fatal(err)
	}
}

// withUser opens the cluster at dir and runs fn logged in as the crypto user.
func withUser(t *testing.T, dir string, fn func(s hsm.Session)) {
	t.Helper()
	ctx := context.Background()
	c, err := cluster.Open(ctx, dir, cluster.OpenOptions{LockTimeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.Login(ctx, hsm.Credentials{User: crashUser, Password: crashPass})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Logout(ctx)
	fn(s)
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// TestMigrateSurvivesKills runs keymig migrate as a real process on
// thousands of keys, kills it with SIGKILL at random moments, resumes it
// each time, and then checks every key: on the target exactly once, with
// the source's check value, on at least two HSMs; the journal checks clean;
// no transport key is left behind. make torture runs it bigger.
func TestMigrateSurvivesKills(t *testing.T) {
	keys := envInt("KEYMIG_TORTURE_KEYS", 2000)
	kills := envInt("KEYMIG_TORTURE_KILLS", 20)
	if testing.Short() {
		keys, kills = 300, 5
	}
	bin := keymigBin(t)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	newCrashCluster(t, src, 2)
	newCrashCluster(t, dst, 2)

	// Source keys: AES-256 with distinct ids, made concurrently.
	want := map[string]hsm.Bytes{} // id hex → KCV
	withUser(t, src, func(s hsm.Session) {
		p := pool.NewWithResults[hsm.KeyInfo]().WithErrors().WithMaxGoroutines(16)
		for i := 0; i < keys; i++ {
			p.Go(func() (hsm.KeyInfo, error) {
				return s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
					Label: "crash", ID: hsm.Bytes(fmt.Sprintf("k%05d", i)),
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

	pin := crashUser + ":" + crashPass
	t.Setenv(envSourcePIN, pin)
	t.Setenv(envTargetPIN, pin)
	planPath := filepath.Join(dir, "plan.json")
	// rsa-aes: one RSA operation per key keeps each run long enough to be
	// killed in the middle.
	var stdout, stderr bytes.Buffer
	if code := run([]string{"keymig", "plan", "--source", src, "--target", dst, "--transport", "rsa-aes", "--transport-bits", "2048", "--out", planPath}, nil, &stdout, &stderr); code != exitPending {
		t.Fatalf("plan exit %d: %s", code, stderr.String())
	}

	// Few workers: the job is about surviving kills, and a slow one is cut
	// many times.
	migrateCmd := func(extra ...string) *exec.Cmd {
		cmd := exec.Command(bin, append([]string{"migrate", "--plan", planPath, "--workers", "4", "--no-progress"}, extra...)...)
		cmd.Env = append(os.Environ(), envSourcePIN+"="+pin, envTargetPIN+"="+pin)
		return cmd
	}
	// A dry run takes about as long as a run takes to start moving keys:
	// kill from a little before that moment on, so most kills land mid-job
	// however fast this machine is.
	start := time.Now()
	if out, err := migrateCmd("--dry-run").CombinedOutput(); exitStatus(err) != exitPending {
		t.Fatalf("migrate --dry-run: %v, want exit %d\n%s", err, exitPending, lastLines(string(out), 5))
	}
	startup := time.Since(start)
	killed, runs, finished := 0, 0, false
	for killed < kills && runs < 4*kills && !finished {
		runs++
		if k, _ := runAndKill(t, fmt.Sprintf("migrate run %d", runs), migrateCmd(), startup*3/4+time.Duration(rand.IntN(500))*time.Millisecond); k {
			killed++
		} else {
			finished = true // nothing left to kill
		}
	}
	t.Logf("%d keys, %d runs, %d killed by SIGKILL (start-up %s)", keys, runs, killed, startup.Round(time.Millisecond))
	if killed < kills && !testing.Short() {
		t.Errorf("the job finished after %d kills, before the %d wanted: make each run slower or the kills sooner", killed, kills)
	}

	// The last run finishes the job.
	out, err := migrateCmd().CombinedOutput()
	if err != nil {
		t.Fatalf("final migrate: %v\n%s", err, out)
	}
	t.Logf("final run:\n%s", out)

	// Every key exactly once, with its KCV, on two HSMs; no transport keys.
	withUser(t, dst, func(s hsm.Session) {
		got, err := s.ListKeys(context.Background(), hsm.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]int{}
		for _, k := range got {
			if strings.HasPrefix(k.Label, plan.TransportLabelPrefix) {
				t.Errorf("transport key %s left on the target", k.Ref)
				continue
			}
			id := k.ID.String()
			seen[id]++
			if kcv, ok := want[id]; !ok {
				t.Errorf("unexpected key %s id %s on the target", k.Ref, id)
			} else if kcv.String() != k.KCV.String() {
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
	j, err := journal.Open(journal.DefaultPath(planPath), journal.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if errs := j.Check(); len(errs) > 0 {
		t.Fatalf("journal check: %v", errs)
	}
}

// TestMigrateStopsCleanlyOnSIGINT interrupts keymig migrate with SIGINT:
// it exits 130, leaves no item between the target call and its commit, and
// the next run finishes the job.
func TestMigrateStopsCleanlyOnSIGINT(t *testing.T) {
	bin := keymigBin(t)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	newCrashCluster(t, src, 2)
	newCrashCluster(t, dst, 2)
	withUser(t, src, func(s hsm.Session) {
		for i := 0; i < 600; i++ {
			if _, err := s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "int", ID: hsm.Bytes(fmt.Sprintf("i%04d", i))}}); err != nil {
				t.Fatal(err)
			}
		}
	})
	pin := crashUser + ":" + crashPass
	t.Setenv(envSourcePIN, pin)
	t.Setenv(envTargetPIN, pin)
	planPath := filepath.Join(dir, "plan.json")
	var stdout, stderr bytes.Buffer
	if code := run([]string{"keymig", "plan", "--source", src, "--target", dst, "--transport", "rsa-aes", "--transport-bits", "2048", "--out", planPath}, nil, &stdout, &stderr); code != exitPending {
		t.Fatalf("plan exit %d: %s", code, stderr.String())
	}
	cmd := exec.Command(bin, "migrate", "--plan", planPath, "--workers", "4", "--no-progress")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	cmd.Process.Signal(os.Interrupt)
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitInterrupted {
		t.Fatalf("migrate after SIGINT: %v, want exit %d\n%s", err, exitInterrupted, out.String())
	}
	if !strings.Contains(out.String(), "run the same command again to resume") {
		t.Errorf("no resume hint after SIGINT:\n%s", out.String())
	}
	j, err := journal.Open(journal.DefaultPath(planPath), journal.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	r, info, err := j.Run(mustPlanDigest(t, planPath))
	if err != nil {
		t.Fatal(err)
	}
	counts, _ := r.Counts()
	j.Close()
	if info.Status != journal.RunInterrupted || counts["acting"] != 0 || counts["done"] == 0 || counts["pending"] == 0 {
		t.Fatalf("after SIGINT: status %s, states %v; want interrupted, some done, some pending, none acting", info.Status, counts)
	}
	if out, err := exec.Command(bin, "migrate", "--plan", planPath, "--no-progress").CombinedOutput(); err != nil {
		t.Fatalf("resume: %v\n%s", err, out)
	}
}

func mustPlanDigest(t *testing.T, path string) string {
	t.Helper()
	p, err := plan.Read(path)
	if err != nil {
		t.Fatal(err)
	}
	return p.Digest
}
