package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/journal"
)

// TestMigrateRotationSurvivesKills migrates a non-extractable master key
// with its data keys (plan --datakeys) and a few ordinary keys, killing
// keymig migrate with SIGKILL at random moments and resuming it each
// time. Then: the target holds exactly one new master, with the old one's
// label and id and new key material; every data key is in the rotated file
// and is the same data key inside (datakeys verify, by KCV in the HSMs);
// nothing is left half-written; the journal checks clean; the old master
// is unchanged.
func TestMigrateRotationSurvivesKills(t *testing.T) {
	records, kills := 20_000, 6
	if testing.Short() {
		records, kills = 4_000, 2
	}
	records = envInt("KEYMIG_ROTATE_CRASH_RECORDS", records)
	bin := keymigBin(t)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	newCrashCluster(t, src, 2)
	newCrashCluster(t, dst, 2)
	pin := crashUser + ":" + crashPass
	t.Setenv(envPIN, pin)
	t.Setenv(envSourcePIN, pin)
	t.Setenv(envTargetPIN, pin)
	keymig := func(want int, args ...string) string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		if code := run(append([]string{"keymig"}, args...), nil, &stdout, &stderr); code != want {
			t.Fatalf("keymig %v: exit %d, want %d\n%s%s", args, code, want, stdout.String(), stderr.String())
		}
		return stdout.String()
	}

	var old hsm.KeyInfo
	withUser(t, src, func(s hsm.Session) {
		ctx := context.Background()
		var err error
		if old, err = s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
			Label: "tde", ID: hsm.Bytes("tde-1"),
			Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: false, hsm.AttrWrap: true, hsm.AttrUnwrap: true},
		}}); err != nil {
			t.Fatal(err)
		}
		for i := range 5 {
			if _, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "app", ID: hsm.Bytes(fmt.Sprintf("app-%d", i))}}); err != nil {
				t.Fatal(err)
			}
		}
	})
	in := filepath.Join(dir, "tde.jsonl")
	keymig(exitOK, "datakeys", "generate", "--cluster", src, "--master", "attr.label=tde", "--count", fmt.Sprint(max(1, records/10)), "--out", in, "--no-progress")
	multiply(t, in, 10, records)
	before, err := os.ReadFile(in)
	if err != nil {
		t.Fatal(err)
	}

	planPath := filepath.Join(dir, "plan.json")
	keymig(exitPending, "plan", "--source", src, "--target", dst, "--datakeys", "tde="+in, "--out", planPath)

	migrateCmd := func() *exec.Cmd {
		cmd := exec.Command(bin, "migrate", "--plan", planPath, "--no-progress")
		cmd.Env = append(os.Environ(), envSourcePIN+"="+pin, envTargetPIN+"="+pin)
		return cmd
	}
	killed, runs, finished := 0, 0, false
	for killed < kills && runs < 4*kills && !finished {
		runs++
		k, _ := runAndKill(t, fmt.Sprintf("migrate run %d", runs), migrateCmd(), 400*time.Millisecond+rand.N(1200*time.Millisecond))
		if k {
			killed++
		} else {
			finished = true
		}
	}
	t.Logf("%d data keys, %d runs, %d killed by SIGKILL", records, runs, killed)
	if killed == 0 {
		t.Fatal("no kill landed: the job finished first; give it more records")
	}
	out, err := migrateCmd().CombinedOutput()
	if err != nil {
		t.Fatalf("final migrate: %v\n%s", err, out)
	}
	t.Logf("final run:\n%s", lastLines(string(out), 12))

	rotated := in + ".rotated"
	if got := keymig(exitOK, "datakeys", "verify", "--source", src, "--from-key", "attr.label=tde", "--in", in,
		"--target", dst, "--to-key", "attr.label=tde", "--rotated", rotated); !strings.Contains(got, fmt.Sprintf("verified    %d", records)) {
		t.Errorf("datakeys verify:\n%s", got)
	}
	for _, p := range []string{rotated + ".partial", rotated + ".rejects", rotated + ".rejects.partial"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s is left behind", p)
		}
	}
	if after, _ := os.ReadFile(in); !bytes.Equal(before, after) {
		t.Error("the data-key file was changed")
	}
	keymig(exitOK, "verify", "--plan", planPath)

	withUser(t, dst, func(s hsm.Session) {
		keys, err := s.ListKeys(context.Background(), hsm.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		var masters []hsm.KeyInfo
		for _, k := range keys {
			if !k.Attrs.Token {
				t.Errorf("session object %s (%q) is visible on the target", k.Ref, k.Label)
			}
			if k.Label == "tde" {
				masters = append(masters, k)
			}
		}
		if len(masters) != 1 {
			t.Fatalf("%d new masters on the target, want exactly 1: %v", len(masters), masters)
		}
		m := masters[0]
		if m.ID.String() != old.ID.String() || m.KCV.String() == old.KCV.String() || m.Attrs.Extractable || m.Coverage.Count() < 2 {
			t.Errorf("new master %s: id %s kcv %s extractable %v on %d HSMs; old id %s kcv %s", m.Ref, m.ID, m.KCV, m.Attrs.Extractable, m.Coverage.Count(), old.ID, old.KCV)
		}
		if len(keys) != 6 {
			t.Errorf("%d keys on the target, want the new master and 5 transferred keys", len(keys))
		}
	})
	withUser(t, src, func(s hsm.Session) {
		k, err := s.GetKey(context.Background(), old.Ref)
		if err != nil || k.KCV.String() != old.KCV.String() || k.Attrs != old.Attrs {
			t.Errorf("the old master changed: %+v, %v", k, err)
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
