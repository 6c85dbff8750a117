// Package keymigtest holds what keymig's tests share beyond one package:
// the consistency check that runs after every test that made HSM files or
// journals (as bbolt's btesting checks every database a test opened), and
// the script commands that damage files and wait for markers.
package keymigtest

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm/node"
	"github.com/keymig/keymig/journal"
)

// CheckTree checks every HSM file (NAME.db with NAME.db.audit beside it)
// and every journal (*.journal) under dir: bbolt's consistency check on
// each, the audit hash chain of each HSM, and every journal record. Files
// a test damaged on purpose are skipped if their name says so (it holds
// "bad", "damaged", "tampered" or "truncated").
func CheckTree(dir string) []error {
	var errs []error
	filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || damagedOnPurpose(d.Name()) {
			return nil
		}
		switch {
		case strings.HasSuffix(path, ".db"):
			if _, err := os.Stat(node.AuditPath(path)); err != nil {
				return nil // not an HSM file
			}
			if _, err := node.CheckFile(path); err != nil {
				errs = append(errs, err)
			}
		case strings.HasSuffix(path, ".journal"):
			j, err := journal.Open(path, journal.Options{ReadOnly: true})
			if err != nil {
				errs = append(errs, err)
				return nil
			}
			for _, e := range j.Check() {
				errs = append(errs, fmt.Errorf("journal %s: %w", path, e))
			}
			j.Close()
		}
		return nil
	})
	return errs
}

func damagedOnPurpose(name string) bool {
	for _, w := range []string{"bad", "damaged", "tampered", "truncated"} {
		if strings.Contains(name, w) {
			return true
		}
	}
	return false
}

// Flip damages a file so that it always changes: at a byte offset it XORs
// that byte with 0x01; at LINE:FIELD it decodes the base64 string FIELD of
// the JSON object on line LINE (from 1), XORs its first byte with 0x01 and
// writes it back, so that the value stays valid base64 but decodes to
// other bytes. A negative offset counts from the end.
func Flip(path, where string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if lineNo, field, ok := strings.Cut(where, ":"); ok {
		n, err := strconv.Atoi(lineNo)
		if err != nil || n < 1 {
			return fmt.Errorf("flip %s %s: want LINE:FIELD with LINE from 1", path, where)
		}
		lines := strings.SplitAfter(string(b), "\n")
		if n > len(lines) {
			return fmt.Errorf("flip %s: there is no line %d", path, n)
		}
		line, err := flipField(lines[n-1], field)
		if err != nil {
			return fmt.Errorf("flip %s line %d: %w", path, n, err)
		}
		lines[n-1] = line
		return os.WriteFile(path, []byte(strings.Join(lines, "")), 0o600)
	}
	off, err := strconv.Atoi(where)
	if err != nil {
		return fmt.Errorf("flip %s %s: want a byte offset or LINE:FIELD", path, where)
	}
	if off < 0 {
		off += len(b)
	}
	if off < 0 || off >= len(b) {
		return fmt.Errorf("flip %s: offset %s is outside its %d bytes", path, where, len(b))
	}
	b[off] ^= 0x01
	return os.WriteFile(path, b, 0o600)
}

// flipField changes the base64 value of field in the JSON object line,
// keeping every other byte of the line.
func flipField(line, field string) (string, error) {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal([]byte(line), &obj); err != nil {
		return "", err
	}
	raw, ok := obj[field]
	if !ok {
		return "", fmt.Errorf("no field %q", field)
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", fmt.Errorf("field %q is not a string", field)
	}
	v, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(v) == 0 {
		return "", fmt.Errorf("field %q is not a non-empty base64 string", field)
	}
	v[0] ^= 0x01
	quoted := `"` + s + `"`
	if strings.Count(line, quoted) != 1 {
		return "", errors.New("the value occurs more than once on the line")
	}
	return strings.Replace(line, quoted, `"`+base64.StdEncoding.EncodeToString(v)+`"`, 1), nil
}

// TempDir is t.TempDir, checked when the test ends: every HSM file and
// journal left in it must pass CheckTree.
func TempDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	CheckAfter(t, dir)
	return dir
}

// CheckAfter runs CheckTree on dir when the test ends, after the cleanups
// registered later (closing the clusters the test opened) have run.
func CheckAfter(t testing.TB, dir string) {
	t.Cleanup(func() {
		for _, err := range CheckTree(dir) {
			t.Errorf("after the test: %v", err)
		}
	})
}

// MarkerLines is how many lines the marker file at path holds (0 if it
// does not exist yet). A failpoint mark or pause appends one per pass.
func MarkerLines(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "\n")
}

// NeedComponent settles a test's need of a real component (PostgreSQL,
// SoftHSM2) from the error of starting it: nil goes on; absent skips with
// err's message (which names the Debian package), or fails when the
// variable requireEnv is "1", as CI sets it; any other error fails.
func NeedComponent(t testing.TB, err, absent error, requireEnv string) {
	t.Helper()
	switch {
	case err == nil:
	case errors.Is(err, absent) && os.Getenv(requireEnv) == "1":
		t.Fatalf("%v, and %s=1 requires it", err, requireEnv)
	case errors.Is(err, absent):
		t.Skip(err.Error())
	default:
		t.Fatal(err)
	}
}
