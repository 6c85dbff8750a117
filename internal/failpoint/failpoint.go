// Package failpoint injects crashes and errors at named points of keymig,
// so that crash tests stop the real process exactly where they mean to,
// not where a timer happens to land.
//
// The points are listed, each with a one-line doc, in points.go; Hit and
// Wait name one of them. The keymig binary reads KEYMIG_FAILPOINTS once at
// start-up (Enable): a semicolon-separated list of POINT=ACTION[@N], where
// ACTION is one of
//
//	kill         SIGKILL this process (nothing after the point happens)
//	error        make the point return an injected error (ErrInjected)
//	mark(PATH)   append the pass number to PATH and go on
//	pause(PATH)  append the pass number to PATH, then block until the
//	             caller's context is done (Wait points only)
//
// and @N fires the action on the Nth pass through the point only (counted
// from 1, over the whole process, all goroutines together); without @N it
// fires on every pass. For example:
//
//	KEYMIG_FAILPOINTS='migrate/after-target-unwrap=kill@137'
//	KEYMIG_FAILPOINTS='runner/before-item=pause(/tmp/t/started)@100'
//
// A mark is how a test waits for a moment of the program ("between syncs")
// without betting on the clock: the program writes the marker at that
// moment, the test waits for the file.
//
// When KEYMIG_FAILPOINTS is unset, a point costs one atomic load.
// Failpoints are for tests: nothing in keymig sets them, and an unknown
// point name or action is refused so that a typo does not silently test
// nothing.
package failpoint

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
)

// EnvVar is the environment variable Enable reads.
const EnvVar = "KEYMIG_FAILPOINTS"

// ErrInjected is the error an "error" action makes its point return.
var ErrInjected = errors.New("injected failure")

// Point names a place in keymig between two durable effects.
type Point string

// kind is what an action does.
type kind int

const (
	kill kind = iota + 1
	fail
	mark
	pause
)

// action is one configured failpoint.
type action struct {
	kind   kind
	path   string // mark and pause
	nth    int64  // 0: every pass
	passes atomic.Int64
}

// active is the configuration; nil when no failpoint is set.
var active atomic.Pointer[map[Point]*action]

// Enable parses spec (the value of KEYMIG_FAILPOINTS) and makes it the
// process's failpoints, replacing any before; an empty spec turns them
// all off. It refuses unknown points and malformed actions.
func Enable(spec string) error {
	spec = strings.TrimSpace(spec)
	if spec == "" {
		active.Store(nil)
		return nil
	}
	set := map[Point]*action{}
	for _, entry := range strings.FieldsFunc(spec, func(r rune) bool { return r == ';' || r == '\n' }) {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		name, act, ok := strings.Cut(entry, "=")
		if !ok {
			return fmt.Errorf("%s: %q: want POINT=ACTION[@N]", EnvVar, entry)
		}
		p := Point(strings.TrimSpace(name))
		doc, known := lookup(p)
		if !known {
			return fmt.Errorf("%s: unknown failpoint %q; the points are: %s", EnvVar, p, strings.Join(Names(), ", "))
		}
		a, err := parseAction(strings.TrimSpace(act))
		if err != nil {
			return fmt.Errorf("%s: %s: %w", EnvVar, p, err)
		}
		if a.kind == pause && !doc.Wait {
			return fmt.Errorf("%s: %s: pause needs a point that waits on a context; this one does not (see keymig's internal/failpoint/points.go)", EnvVar, p)
		}
		if _, dup := set[p]; dup {
			return fmt.Errorf("%s: failpoint %s is set twice", EnvVar, p)
		}
		set[p] = a
	}
	active.Store(&set)
	return nil
}

func parseAction(s string) (*action, error) {
	a := &action{}
	if i := strings.LastIndex(s, "@"); i >= 0 && !strings.Contains(s[i:], ")") {
		body, n := s[:i], s[i+1:]
		v, err := strconv.ParseInt(n, 10, 64)
		if err != nil || v < 1 {
			return nil, fmt.Errorf("%q: the pass after @ must be a number from 1", s)
		}
		a.nth, s = v, body
	}
	arg := func(name string) (string, bool) {
		if !strings.HasPrefix(s, name+"(") || !strings.HasSuffix(s, ")") {
			return "", false
		}
		return s[len(name)+1 : len(s)-1], true
	}
	switch {
	case s == "kill":
		a.kind = kill
	case s == "error":
		a.kind = fail
	default:
		if p, ok := arg("mark"); ok && p != "" {
			a.kind, a.path = mark, p
		} else if p, ok := arg("pause"); ok && p != "" {
			a.kind, a.path = pause, p
		} else {
			return nil, fmt.Errorf("action %q: want kill, error, mark(PATH) or pause(PATH), optionally followed by @N", s)
		}
	}
	return a, nil
}

// Hit passes point p: nil unless a failpoint is set there, in which case
// it kills the process, returns an error wrapping ErrInjected, or writes a
// marker, as configured.
func Hit(p Point) error { return Wait(nil, p) }

// Wait is Hit at a point on a path that can be cancelled: a pause action
// there blocks until ctx is done. Points that use Wait say so in points.go.
func Wait(ctx context.Context, p Point) error {
	set := active.Load()
	if set == nil {
		return nil
	}
	a := (*set)[p]
	if a == nil {
		return nil
	}
	n := a.passes.Add(1)
	if a.nth != 0 && n != a.nth {
		return nil
	}
	switch a.kind {
	case kill:
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	case fail:
		return fmt.Errorf("failpoint %s (pass %d): %w", p, n, ErrInjected)
	case mark:
		writeMarker(a.path, n)
	case pause:
		writeMarker(a.path, n)
		if ctx != nil {
			<-ctx.Done()
		}
	}
	return nil
}

// writeMarker appends n to path. A marker that cannot be written is fatal:
// the test waiting for it would otherwise wait for nothing.
func writeMarker(path string, n int64) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err == nil {
		_, err = fmt.Fprintln(f, n)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "keymig: failpoint marker %s: %v\n", path, err)
		os.Exit(3)
	}
}

// Names lists every point, sorted.
func Names() []string {
	out := make([]string, 0, len(points))
	for _, d := range points {
		out = append(out, string(d.Point))
	}
	slices.Sort(out)
	return out
}

func lookup(p Point) (Doc, bool) {
	for _, d := range points {
		if d.Point == p {
			return d, true
		}
	}
	return Doc{}, false
}
