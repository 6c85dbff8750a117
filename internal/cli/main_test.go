package cli

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/pgtest"
	"github.com/keymig/keymig/internal/softhsmtest"

	"github.com/rogpeppe/go-internal/testscript"
)

// TestMain lets testscript run the real keymig command in-process: a script
// line "exec keymig ..." calls run exactly as the binary's main would.
func TestMain(m *testing.M) {
	code := testscript.RunMain(m, map[string]func() int{
		"keymig": func() int { return Run(os.Args, os.Stdin, os.Stdout, os.Stderr) },
	})
	pgtest.Stop() // the scripts' PostgreSQL, if one was started
	softhsmtest.Cleanup()
	os.Exit(code)
}

// TestScripts runs the end-to-end scripts in testdata/script, each a user's
// shell session against the real CLI.
func TestScripts(t *testing.T) {
	var dbs atomic.Int64
	examples, err := filepath.Abs(filepath.Join("..", "..", "examples"))
	if err != nil {
		t.Fatal(err)
	}
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(e *testscript.Env) error {
			// Scripts get a private HOME so nothing leaks between them.
			e.Setenv("HOME", e.WorkDir)
			// A race-detector build sleeps 1s at every exit by default.
			e.Setenv("GORACE", "atexit_sleep_ms=0")
			// Cheap password hashing: hsm init and restore read it.
			e.Setenv("KEYMIG_KDF_ITERATIONS", "1000")
			e.Setenv("EXAMPLES", examples)
			// A script that needs PostgreSQL says [!postgres] skip and
			// gets a database of its own in $PGURL.
			if srv, err := pgtest.Get(); err == nil {
				url, err := srv.CreateDB(fmt.Sprintf("script%d", dbs.Add(1)))
				if err != nil {
					return err
				}
				e.Setenv("PGURL", url)
				e.Setenv("PGPASSWORD", pgtest.Password)
			} else if !errors.Is(err, pgtest.ErrAbsent) || pgtest.Required() {
				return fmt.Errorf("PostgreSQL for the scripts: %w", err)
			}
			// A script that needs SoftHSM2 says [!softhsm] skip and makes
			// tokens with softhsm-token.
			if sh, err := softhsmtest.Get(); err == nil {
				e.Setenv("SOFTHSM2_CONF", sh.Conf)
				e.Setenv("SOFTHSM_MODULE", sh.Module)
			} else if !errors.Is(err, softhsmtest.ErrAbsent) || softhsmtest.Required() {
				return fmt.Errorf("SoftHSM2 for the scripts: %w", err)
			}
			e.Defer(func() {
				for _, err := range keymigtest.CheckTree(e.WorkDir) {
					e.T().Log(err)
					e.T().FailNow()
				}
			})
			return nil
		},
		Condition: func(cond string) (bool, error) {
			if cond == "postgres" {
				_, err := pgtest.Get()
				return err == nil, nil
			}
			if cond == "softhsm" {
				_, err := softhsmtest.Get()
				return err == nil, nil
			}
			return false, fmt.Errorf("unknown condition %q", cond)
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"flip":          cmdFlip,
			"waitfile":      cmdWaitfile,
			"sigterm":       cmdSigterm,
			"softhsm-token": cmdSoftHSMToken,
		},
	})
}

// cmdFlip is the script command "flip FILE OFFSET|LINE:FIELD": damage a
// file in a way that always changes it (see keymigtest.Flip).
func cmdFlip(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: flip FILE OFFSET|LINE:FIELD")
	}
	if err := keymigtest.Flip(ts.MkAbs(args[0]), args[1]); err != nil {
		ts.Fatalf("%v", err)
	}
}

// cmdSoftHSMToken is the script command "softhsm-token NAME": initialise
// a SoftHSM2 token (user PIN 123456) and set $NAME to its pkcs11: URI and
// $NAME_LABEL to its label, unique in the test binary.
func cmdSoftHSMToken(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: softhsm-token NAME")
	}
	sh, err := softhsmtest.Get()
	if err != nil {
		ts.Fatalf("%v", err)
	}
	label, err := sh.Token(args[0])
	if err != nil {
		ts.Fatalf("%v", err)
	}
	ts.Setenv(args[0], sh.URI(label))
	ts.Setenv(args[0]+"_LABEL", label)
}

// cmdWaitfile is the script command "waitfile FILE [LINES]": wait until a
// marker the program writes (a failpoint mark) exists, or holds LINES
// lines. The bound only keeps a broken program from hanging the test.
func cmdWaitfile(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 1 || len(args) > 2 {
		ts.Fatalf("usage: waitfile FILE [LINES]")
	}
	want := 1
	if len(args) == 2 {
		n, err := strconv.Atoi(args[1])
		if err != nil || n < 1 {
			ts.Fatalf("waitfile: LINES %q: want a number from 1", args[1])
		}
		want = n
	}
	path := ts.MkAbs(args[0])
	for deadline := time.Now().Add(2 * time.Minute); keymigtest.MarkerLines(path) < want; {
		if time.Now().After(deadline) {
			ts.Fatalf("waitfile: %s has %d of %d lines after 2 minutes: the program never reached its marker", args[0], keymigtest.MarkerLines(path), want)
		}
		time.Sleep(10 * time.Millisecond) // polling for a marker the program writes
	}
}

// cmdSigterm is the script command "sigterm FILE": send SIGTERM to the
// process whose "(pid N)" the first line of FILE names, as keymig hsm
// serve writes to its --ready-file (testscript's kill knows only INT and
// KILL).
func cmdSigterm(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: sigterm FILE")
	}
	b, err := os.ReadFile(ts.MkAbs(args[0]))
	ts.Check(err)
	m := regexp.MustCompile(`\(pid (\d+)\)`).FindSubmatch(b)
	if m == nil {
		ts.Fatalf("sigterm: %s names no (pid N)", args[0])
	}
	pid, _ := strconv.Atoi(string(m[1]))
	ts.Check(syscall.Kill(pid, syscall.SIGTERM))
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
