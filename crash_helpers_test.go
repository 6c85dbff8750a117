package main

import (
	"bytes"
	"errors"
	"os/exec"
	"syscall"
	"testing"
	"time"
)

// keymigBin is the keymig command that the testscript harness puts on
// PATH, for tests that run it as a real process.
func keymigBin(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("keymig")
	if err != nil {
		t.Fatalf("the keymig command testscript puts on PATH is missing: %v", err)
	}
	return bin
}

// runAndKill starts cmd and kills it with SIGKILL after d unless it ends
// first. It reports whether the kill landed (false: the command finished
// on its own, successfully) and what the command printed. A command that
// fails on its own fails the test: a crash test must only see its kills.
func runAndKill(t *testing.T, what string, cmd *exec.Cmd, d time.Duration) (killed bool, out string) {
	t.Helper()
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s failed before it was killed: %v\n%s", what, err, buf.String())
		}
		return false, buf.String()
	case <-time.After(d):
		cmd.Process.Signal(syscall.SIGKILL)
		err := <-done
		var ee *exec.ExitError
		if errors.As(err, &ee) && !ee.Exited() {
			return true, buf.String()
		}
		if err != nil {
			t.Fatalf("%s: %v\n%s", what, err, buf.String())
		}
		return false, buf.String()
	}
}
