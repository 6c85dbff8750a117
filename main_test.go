package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
)

// TestMain lets testscript run the real keymig command in-process: a script
// line "exec keymig ..." calls run exactly as the binary's main would.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"keymig": func() { os.Exit(run(os.Args, os.Stdin, os.Stdout, os.Stderr)) },
	})
}

// TestScripts runs the end-to-end scripts in testdata/script, each a user's
// shell session against the real CLI.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(e *testscript.Env) error {
			// Scripts get a private HOME so nothing leaks between them.
			e.Setenv("HOME", e.WorkDir)
			return nil
		},
	})
}

func TestExitCodes(t *testing.T) {
	live := context.Background()
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name string
		ctx  context.Context
		err  error
		want int
	}{
		{"success", live, nil, exitOK},
		{"error", live, errors.New("boom"), exitError},
		{"pending", live, fmt.Errorf("plan: %w", errChangesPending), exitPending},
		{"interrupted", live, errInterrupted, exitInterrupted},
		{"cancelled by signal", cancelled, fmt.Errorf("run: %w", context.Canceled), exitInterrupted},
		{"cancelled without signal", live, context.Canceled, exitError},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if got := exitCode(tt.ctx, tt.err, &stderr); got != tt.want {
				t.Fatalf("exitCode = %d, want %d (stderr %q)", got, tt.want, stderr.String())
			}
		})
	}
}
