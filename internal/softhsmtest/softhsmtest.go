// Package softhsmtest gives tests their own SoftHSM2 tokens: a temporary
// SOFTHSM2_CONF and token directory per test, tokens initialised with
// softhsm2-util, and pkcs11-tool for making keys the way a user would.
// Where SoftHSM2 is absent the tests skip, naming the Debian packages;
// with KEYMIG_REQUIRE_SOFTHSM=1 (set by CI) they fail instead.
//
// SOFTHSM2_CONF is read by the module at C_Initialize, once per process,
// so a test binary has one configuration: the first test that asks for
// tokens sets it (t.Setenv cannot be used, since the module outlives the
// test), and later tests add tokens to the same directory, each under a
// label of its own.
package softhsmtest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keymig/keymig/internal/keymigtest"
)

// RequireEnv, set to 1, turns a missing SoftHSM2 into a failure.
const RequireEnv = "KEYMIG_REQUIRE_SOFTHSM"

// The PINs of every test token. They are test fixtures, not secrets.
const (
	SOPIN   = "12345678"
	UserPIN = "123456"
)

// modules are where Debian and others install the SoftHSM2 module.
var modules = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// ErrAbsent says SoftHSM2 or pkcs11-tool is not installed.
var ErrAbsent = errors.New("SoftHSM2 is not installed (apt-get install softhsm2 opensc)")

// Env is the test binary's SoftHSM2 configuration.
type Env struct {
	Module string // the module's path
	Conf   string // the SOFTHSM2_CONF file
	Dir    string // the token directory
	n      atomic.Int64
}

var (
	shared     *Env
	sharedErr  error
	sharedOnce sync.Once
)

// Required reports whether a missing SoftHSM2 is a failure.
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// Get returns the test binary's configuration, writing it on first use,
// or ErrAbsent.
func Get() (*Env, error) {
	sharedOnce.Do(func() { shared, sharedErr = setup() })
	return shared, sharedErr
}

// Shared returns the configuration or skips the test (fails it under
// KEYMIG_REQUIRE_SOFTHSM=1) when SoftHSM2 is absent.
func Shared(t testing.TB) *Env {
	t.Helper()
	e, err := Get()
	keymigtest.NeedComponent(t, err, ErrAbsent, RequireEnv)
	return e
}

// Cleanup removes the token directory; call it from TestMain.
func Cleanup() {
	if shared != nil {
		os.RemoveAll(filepath.Dir(shared.Conf))
	}
}

func setup() (*Env, error) {
	mod := os.Getenv("KEYMIG_SOFTHSM_MODULE")
	if mod == "" {
		for _, m := range modules {
			if _, err := os.Stat(m); err == nil {
				mod = m
				break
			}
		}
	}
	if mod == "" {
		return nil, ErrAbsent
	}
	for _, tool := range []string{"softhsm2-util", "pkcs11-tool"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: %w", tool, ErrAbsent)
		}
	}
	root, err := os.MkdirTemp("", "keymig-softhsm-")
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(root, "tokens")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, err
	}
	conf := filepath.Join(root, "softhsm2.conf")
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\nslots.mechanisms = ALL\nlibrary.reset_on_fork = false\n", dir)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		return nil, err
	}
	// The module reads it at C_Initialize; every child (pkcs11-tool,
	// keymig run by a script) inherits it.
	os.Setenv("SOFTHSM2_CONF", conf)
	return &Env{Module: mod, Conf: conf, Dir: dir}, nil
}

// NewToken initialises a token with a label unique to this test binary
// (prefix and a number) and returns its label.
func (e *Env) NewToken(t testing.TB, prefix string) string {
	t.Helper()
	label, err := e.Token(prefix)
	if err != nil {
		t.Fatal(err)
	}
	return label
}

// Token is NewToken for callers without a testing.TB (script commands).
func (e *Env) Token(prefix string) (string, error) {
	label := fmt.Sprintf("%s-%d", prefix, e.n.Add(1))
	if len(label) > 32 {
		return "", fmt.Errorf("token label %q is longer than PKCS#11's 32 characters", label)
	}
	_, err := e.run("softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SOPIN, "--pin", UserPIN)
	return label, err
}

// URI is the PKCS#11 URI of the token labelled label.
func (e *Env) URI(label string) string {
	return "pkcs11:token=" + label + "?module-path=" + e.Module
}

// Tool runs pkcs11-tool on the token labelled label, logged in, with args.
func (e *Env) Tool(t testing.TB, label string, args ...string) string {
	t.Helper()
	return e.Run(t, "pkcs11-tool", append([]string{"--module", e.Module, "--token-label", label, "--login", "--pin", UserPIN}, args...)...)
}

// Run runs a SoftHSM2 or OpenSC tool with this configuration and returns
// its output, failing the test if it fails.
func (e *Env) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := e.run(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (e *Env) run(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+e.Conf)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %v\n%s", name, strings.Join(redact(args), " "), err, out.String())
	}
	return out.String(), nil
}

// redact hides PIN arguments in failure messages.
func redact(args []string) []string {
	out := append([]string(nil), args...)
	for i := range out {
		if i > 0 && (out[i-1] == "--pin" || out[i-1] == "--so-pin") {
			out[i] = "<pin>"
		}
	}
	return out
}
