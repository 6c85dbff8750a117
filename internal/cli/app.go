// Package cli is keymig's command line: one file per command (cmd_*.go),
// each with an options struct, its flags, and a runX function that does
// the work and that tests call directly; PIN loading, output formats and
// key files. Only here are backends picked and flag names spoken: the
// packages below take options and return errors in their own words, which
// the commands restate with their flags.
//
// This file wires the commands together and owns the one place where
// errors become exit codes. The end-to-end tests are testscript scripts in
// testdata/script, each a user's shell session against the real command.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/keymig/keymig/internal/failpoint"
	"github.com/urfave/cli/v2"
)

// Exit codes, the same for every command.
const (
	exitOK          = 0
	exitError       = 1
	exitPending     = 2 // plan-like commands: there is work to do
	exitInterrupted = 130
)

// errChangesPending is returned by plan-like commands that succeeded and
// found work to do; main maps it to exit status 2.
var errChangesPending = errors.New("changes pending")

// errInterrupted reports that a signal stopped the command after it had
// committed everything it did.
var errInterrupted = errors.New("interrupted")

// Run executes keymig with args (args[0] is the program name) and returns
// the process exit code. It never calls os.Exit, so tests and testscript
// can drive it in-process.
func Run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := failpoint.Enable(os.Getenv(failpoint.EnvVar)); err != nil {
		fmt.Fprintf(stderr, "keymig: %v\n", err)
		return exitError
	}

	app := newApp(stdin, stdout, stderr)
	err := app.RunContext(ctx, args)
	return exitCode(ctx, err, stderr)
}

// exitCode maps a command's error to the process exit status and prints it.
func exitCode(ctx context.Context, err error, stderr io.Writer) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errChangesPending):
		return exitPending
	case errors.Is(err, errInterrupted), errors.Is(err, context.Canceled) && ctx.Err() != nil:
		fmt.Fprintln(stderr, "keymig: interrupted; everything done so far is committed, run the same command again to resume")
		return exitInterrupted
	default:
		fmt.Fprintf(stderr, "keymig: %v\n", err)
		return exitError
	}
}

// env is what every command needs from the process: its streams and
// environment, injected so tests can run commands in-process.
type env struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
	log    *slog.Logger
}

func newApp(stdin io.Reader, stdout, stderr io.Writer) *cli.App {
	e := &env{stdin: stdin, stdout: stdout, stderr: stderr, getenv: os.Getenv}
	app := &cli.App{
		Name:  "keymig",
		Usage: "move keys between HSM clusters and keep cloned clusters in sync",
		Description: `keymig plans a migration, then executes the plan as a resumable job
recorded in a journal: a run killed at any moment resumes without losing or
duplicating a key.

Credentials (user:password) are read from the environment (KEYMIG_PIN, or
KEYMIG_SOURCE_PIN and KEYMIG_TARGET_PIN), from a file readable by its owner
only, or from a prompt; never from a flag's value.`,
		Reader:               stdin,
		Writer:               stdout,
		ErrWriter:            stderr,
		EnableBashCompletion: true,
		HideHelpCommand:      true,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format on stderr: text or json"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "log level: debug, info, warn or error"},
		},
		Before: func(c *cli.Context) error {
			l, err := newLogger(stderr, c.String("log-format"), c.String("log-level"))
			if err != nil {
				return err
			}
			e.log = l
			return nil
		},
		// Errors are printed once, by exitCode.
		ExitErrHandler: func(*cli.Context, error) {},
		Commands:       commands(e),
	}
	return app
}

// commands lists every top-level command; each is defined in its cmd_*.go.
func commands(e *env) []*cli.Command {
	return []*cli.Command{
		wrapCommand(e),
		unwrapCommand(e),
		hsmCommand(e),
		planCommand(e),
		migrateCommand(e),
		verifyCommand(e),
		journalCommand(e),
		synckeyCommand(e),
		rotateCommand(e),
		datakeysCommand(e),
	}
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(format) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("--log-format %q: want text or json", format)
	}
}

// withStreams is e (or an empty env) writing to stdout and stderr.
func withStreams(e *env, stdout, stderr io.Writer) *env {
	c := env{getenv: os.Getenv, log: slog.New(slog.DiscardHandler)}
	if e != nil {
		c = *e
	}
	c.stdout, c.stderr = stdout, stderr
	return &c
}
