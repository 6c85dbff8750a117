package failpoint

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestEnable(t *testing.T) {
	tests := []struct {
		spec    string
		wantErr string
	}{
		{"", ""},
		{"  ", ""},
		{"migrate/after-target-unwrap=kill@137", ""},
		{"journal/before-commit=kill@3; rotate/after-batch-write=error", ""},
		{"runner/before-item=pause(/tmp/a@b)@100", ""},
		{"synckey/between-syncs=mark(/tmp/m)", ""},
		{"migrate/after-target-unwrap", "want POINT=ACTION"},
		{"migrate/after-targt-unwrap=kill", "unknown failpoint"},
		{"migrate/after-target-unwrap=explode", "want kill, error"},
		{"migrate/after-target-unwrap=kill@0", "a number from 1"},
		{"migrate/after-target-unwrap=kill@x", "a number from 1"},
		{"migrate/after-target-unwrap=mark()", "want kill, error"},
		{"migrate/after-target-unwrap=pause(/tmp/p)", "pause needs a point that waits"},
		{"journal/before-commit=kill;journal/before-commit=error", "set twice"},
	}
	for _, tt := range tests {
		t.Run(tt.spec, func(t *testing.T) {
			t.Cleanup(func() { Enable("") })
			err := Enable(tt.spec)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("Enable(%q) = %v", tt.spec, err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("Enable(%q) = %v, want an error containing %q", tt.spec, err, tt.wantErr)
			}
		})
	}
}

func TestErrorOnNthPass(t *testing.T) {
	t.Cleanup(func() { Enable("") })
	if err := Enable("rotate/after-batch-write=error@3"); err != nil {
		t.Fatal(err)
	}
	for pass := 1; pass <= 5; pass++ {
		err := Hit(RotateAfterBatchWrite)
		if got, want := err != nil, pass == 3; got != want {
			t.Fatalf("pass %d: Hit = %v, want an error only on pass 3", pass, err)
		}
		if err != nil && !errors.Is(err, ErrInjected) {
			t.Fatalf("pass %d: %v does not wrap ErrInjected", pass, err)
		}
		if err := Hit(RotateAfterFsync); err != nil {
			t.Fatalf("an unset point failed: %v", err)
		}
	}
}

func TestMarkAndPause(t *testing.T) {
	t.Cleanup(func() { Enable("") })
	dir := t.TempDir()
	marks, paused := filepath.Join(dir, "marks"), filepath.Join(dir, "paused")
	if err := Enable("synckey/between-syncs=mark(" + marks + ");runner/before-item=pause(" + paused + ")@2"); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		Hit(SynckeyBetweenSyncs)
	}
	if b, _ := os.ReadFile(marks); string(b) != "1\n2\n3\n" {
		t.Fatalf("marks = %q, want one line per pass", b)
	}

	ctx, cancel := context.WithCancel(context.Background())
	Wait(ctx, RunnerBeforeItem) // pass 1: nothing
	if _, err := os.Stat(paused); err == nil {
		t.Fatal("pass 1 wrote the pause marker")
	}
	done := make(chan struct{})
	go func() { Wait(ctx, RunnerBeforeItem); close(done) }()
	select {
	case <-done:
		t.Fatal("pause returned before its context was done")
	default:
	}
	cancel()
	<-done
	if b, _ := os.ReadFile(paused); string(b) != "2\n" {
		t.Fatalf("pause marker = %q, want pass 2", b)
	}
}

// TestKill runs this test binary again with a kill failpoint and checks
// that it dies by SIGKILL at the second pass, not before.
func TestKill(t *testing.T) {
	if os.Getenv("FAILPOINT_TEST_CHILD") == "1" {
		if err := Enable(os.Getenv(EnvVar)); err != nil {
			os.Exit(2)
		}
		Hit(NodeAfterCommit)
		os.Stdout.WriteString("first pass\n")
		Hit(NodeAfterCommit)
		os.Stdout.WriteString("second pass\n")
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestKill$")
	cmd.Env = append(os.Environ(), "FAILPOINT_TEST_CHILD=1", EnvVar+"=node/after-commit=kill@2")
	out, err := cmd.Output()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child: %v, want death by SIGKILL; output %q", err, out)
	}
	if string(out) != "first pass\n" {
		t.Fatalf("child printed %q, want only the first pass", out)
	}
}

func TestEveryPointIsDocumented(t *testing.T) {
	seen := map[Point]bool{}
	for _, d := range All() {
		if seen[d.Point] {
			t.Errorf("%s is listed twice", d.Point)
		}
		seen[d.Point] = true
		if !strings.Contains(string(d.Point), "/") {
			t.Errorf("%s: want PACKAGE/WHEN", d.Point)
		}
	}
}

func BenchmarkHitUnset(b *testing.B) {
	Enable("")
	for b.Loop() {
		Hit(MigrateAfterTargetUnwrap)
	}
}
