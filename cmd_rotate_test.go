package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/journal"
)

// TestRotateSurvivesKills runs keymig rotate as a real process on 200,000
// data keys, kills it with SIGKILL at random moments at least 10 times,
// resumes it each time, and checks that the final output is byte for byte
// that of an uninterrupted run (aes-kwp), that datakeys verify confirms it,
// that the journal checks clean, and that no session object and no new
// token key is left in the cluster. Under the race detector it rotates
// 10,000 keys, under -short 5,000 with 3 kills; KEYMIG_ROTATE_CRASH_RECORDS
// and KEYMIG_ROTATE_CRASH_KILLS override.
func TestRotateSurvivesKills(t *testing.T) {
	records, kills := 200_000, 10
	switch {
	case testing.Short():
		records, kills = 5_000, 3
	case rotateRace:
		records = 10_000
	}
	records = envInt("KEYMIG_ROTATE_CRASH_RECORDS", records)
	kills = envInt("KEYMIG_ROTATE_CRASH_KILLS", kills)
	bin := keymigBin(t)
	dir := t.TempDir()
	cl := filepath.Join(dir, "hsm")
	newCrashCluster(t, cl, 2)
	pin := crashUser + ":" + crashPass
	t.Setenv(envPIN, pin)
	run := func(args ...string) string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		if code := run(append([]string{"keymig"}, args...), nil, &stdout, &stderr); code != exitOK {
			t.Fatalf("keymig %v: exit %d\n%s%s", args, code, stdout.String(), stderr.String())
		}
		return stdout.String()
	}
	var tokenKeys int
	withUser(t, cl, func(s hsm.Session) {
		for _, label := range []string{"tde-old", "tde-new"} {
			if _, err := s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
				Label: label, Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: false, hsm.AttrWrap: true, hsm.AttrUnwrap: true},
			}}); err != nil {
				t.Fatal(err)
			}
		}
		keys, err := s.ListKeys(context.Background(), hsm.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		tokenKeys = len(keys)
	})

	// Distinct data keys from the HSM, each copied 10 times with its own id.
	in := filepath.Join(dir, "datakeys.jsonl")
	run("datakeys", "generate", "--cluster", cl, "--master", "attr.label=tde-old", "--count", fmt.Sprint(max(1, records/10)), "--out", in, "--no-progress")
	multiply(t, in, 10, records)

	rotateArgs := func(out string) []string {
		return []string{"rotate", "--source", cl, "--from-key", "attr.label=tde-old", "--to-key", "attr.label=tde-new",
			"--in", in, "--out", out, "--batch", "1000", "--no-progress"}
	}
	ref := filepath.Join(dir, "reference.jsonl")
	start := time.Now()
	run(rotateArgs(ref)...)
	full := time.Since(start)
	t.Logf("uninterrupted run of %d records: %s", records, full)

	out := filepath.Join(dir, "rotated.jsonl")
	killed, runs := 0, 0
	for killed < kills && runs < 4*kills {
		runs++
		cmd := exec.Command(bin, rotateArgs(out)...)
		cmd.Env = append(os.Environ(), envPIN+"="+pin)
		// Kill within the first part of a run, so that most runs are cut.
		window := max(300*time.Millisecond, full/time.Duration(2*(kills+1)))
		if k, _ := runAndKill(t, fmt.Sprintf("rotate run %d", runs), cmd, 200*time.Millisecond+rand.N(window)); !k {
			t.Fatalf("rotate run %d finished before it was killed after %d kills: give it more records", runs, killed)
		}
		killed++
	}
	t.Logf("%d records, %d runs, %d killed by SIGKILL", records, runs, killed)
	if killed < kills {
		t.Fatalf("only %d of %d kills landed", killed, kills)
	}
	final := run(rotateArgs(out)...)
	t.Logf("final run:\n%s", final)

	a, err := os.ReadFile(ref)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatalf("the output after %d kills differs from an uninterrupted run's (%d and %d bytes)", killed, len(b), len(a))
	}
	if n := bytes.Count(b, []byte("\n")); n != records {
		t.Fatalf("%d records in the output, want %d", n, records)
	}
	for _, p := range []string{out + ".partial", out + ".rejects", out + ".rejects.partial"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s is left behind", p)
		}
	}
	if got := run("datakeys", "verify", "--source", cl, "--from-key", "attr.label=tde-old", "--in", in,
		"--to-key", "attr.label=tde-new", "--rotated", out); !bytes.Contains([]byte(got), []byte(fmt.Sprintf("verified    %d", records))) {
		t.Errorf("datakeys verify:\n%s", got)
	}
	j, err := journal.Open(journal.DefaultPath(out), journal.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if errs := j.Check(); len(errs) > 0 {
		t.Fatalf("journal check: %v", errs)
	}
	withUser(t, cl, func(s hsm.Session) {
		keys, err := s.ListKeys(context.Background(), hsm.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		if len(keys) != tokenKeys {
			t.Errorf("%d keys in the cluster after the rotation, %d before", len(keys), tokenKeys)
		}
		for _, k := range keys {
			if !k.Attrs.Token {
				t.Errorf("session object %s (%q) is visible after the rotation", k.Ref, k.Label)
			}
		}
	})
}

// multiply rewrites path with each line copied times times, each copy with
// its own id, keeping at most limit lines.
func multiply(t *testing.T, path string, times, limit int) {
	t.Helper()
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.Split(bytes.TrimSuffix(src, []byte("\n")), []byte("\n"))
	var out bytes.Buffer
	n := 0
	for c := 0; c < times && n < limit; c++ {
		for _, l := range lines {
			if n == limit {
				break
			}
			// {"id":"dk-00000001",... → {"id":"dk-00000001-c3",...
			l = bytes.Replace(l, []byte(`","master"`), []byte(fmt.Sprintf(`-c%d","master"`, c)), 1)
			out.Write(l)
			out.WriteByte('\n')
			n++
		}
	}
	if err := os.WriteFile(path, out.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}
