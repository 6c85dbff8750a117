package crashtest

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/pkcs11"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/internal/softhsmtest"
	"github.com/keymig/keymig/internal/testcluster"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/plan"
)

// tokenPoints are the points a transfer into or out of a PKCS#11 token
// passes in keymig itself (a token has no cluster or node points).
var tokenPoints = []failpoint.Point{
	failpoint.MigrateAfterSourceExport,
	failpoint.MigrateAfterActing,
	failpoint.MigrateAfterTargetUnwrap,
	failpoint.MigrateBeforeDone,
}

// tokenMu serialises this process's use of the module with making
// tokens: SoftHSM reads its token list at C_Initialize, so a token made
// while the module is loaded here would not be seen until it is reloaded.
var tokenMu sync.Mutex

// newToken makes a token while this process has the module unloaded.
func newToken(t *testing.T, e *softhsmtest.Env) string {
	tokenMu.Lock()
	defer tokenMu.Unlock()
	return e.NewToken(t, "crash")
}

// withToken opens the token labelled label in this process, logged in.
func withToken(t *testing.T, e *softhsmtest.Env, label string, fn func(s hsm.Session)) {
	t.Helper()
	tokenMu.Lock()
	defer tokenMu.Unlock()
	u, err := pkcs11.ParseURI(e.URI(label))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := pkcs11.Open(context.Background(), u, pkcs11.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close() // the last Close finalises the module, so the next open sees what keymig wrote
	s, err := tok.Login(context.Background(), hsm.Credentials{Password: softhsmtest.UserPIN})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Logout(context.Background())
	fn(s)
}

// tokenCase is one migration between a token and a cluster, killed once.
type tokenCase struct {
	t         *testing.T
	e         *softhsmtest.Env
	toToken   bool
	label     string // the token
	cluster   string
	planPath  string
	want      map[string]hsm.Bytes // id → KCV
	srcPIN    string
	dstPIN    string
	migrateAr []string
}

func (c *tokenCase) env() []string {
	return []string{"KEYMIG_SOURCE_PIN=" + c.srcPIN, "KEYMIG_TARGET_PIN=" + c.dstPIN}
}

func (c *tokenCase) run(failpoints string) result {
	return keymigWith(c.t, c.env(), failpoints, c.migrateAr...)
}
func (c *tokenCase) command() []string { return c.migrateAr }

// keymigWith is keymig with extra environment (later entries win).
func keymigWith(t *testing.T, extra []string, failpoints string, args ...string) result {
	t.Helper()
	cmd := exec.Command(keymigBin, args...)
	cmd.Env = append(keymigEnv(failpoints), extra...)
	out, err := cmd.CombinedOutput()
	return ended(args, string(out), err, t)
}

// newTokenCase makes a token and a 2-HSM cluster, n AES keys on the
// source side, and plans the migration.
func newTokenCase(t *testing.T, toToken bool, n int) *tokenCase {
	t.Helper()
	e := softhsmtest.Shared(t)
	c := &tokenCase{t: t, e: e, toToken: toToken, label: newToken(t, e), cluster: filepath.Join(t.TempDir(), "c")}
	c.planPath = filepath.Join(t.TempDir(), "plan.json")
	testcluster.New(t, c.cluster, 2)
	tok := e.URI(c.label)
	src, dst := tok, c.cluster
	c.srcPIN, c.dstPIN = softhsmtest.UserPIN, testcluster.PIN
	if toToken {
		src, dst = c.cluster, tok
		c.srcPIN, c.dstPIN = testcluster.PIN, softhsmtest.UserPIN
		c.want = testcluster.GenerateAES(t, c.cluster, "k", n, nil)
	} else {
		c.want = map[string]hsm.Bytes{}
		withToken(t, e, c.label, func(s hsm.Session) {
			for i := range n {
				k, err := s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
					Label: fmt.Sprint("k", i), ID: hsm.Bytes(fmt.Sprint("k-", i)), Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: true}}})
				if err != nil {
					t.Fatal(err)
				}
				c.want[k.ID.String()] = k.KCV
			}
		})
	}
	if r := keymigWith(t, c.env(), "", "plan", "--source", src, "--target", dst, "--transport", "session-kek", "--transport-bits", "2048", "--out", c.planPath); r.code != 2 {
		t.Fatalf("plan: %s", r)
	}
	c.migrateAr = []string{"migrate", "--plan", c.planPath, "--workers", "4", "--no-progress"}
	return c
}

// finish resumes, then checks that every key is on the target exactly
// once with its KCV, nothing of keymig's own is left, and the journal is
// done.
func (c *tokenCase) finish() {
	t := c.t
	t.Helper()
	if r := c.run(""); r.code != 0 {
		if c.toToken {
			withToken(t, c.e, c.label, func(s hsm.Session) {
				keys, _ := s.ListKeys(context.Background(), hsm.Filter{})
				for _, k := range keys {
					t.Logf("on the token: %s %q id %s %s kcv %s bits %d %+v", k.Ref, k.Label, k.ID, k.Class, k.KCV, k.Bits, k.Attrs)
				}
			})
		}
		t.Fatalf("the last run: %s", r)
	}
	if !c.toToken {
		checkTarget(t, c.cluster, keyCheck{want: c.want, only: true})
	} else {
		withToken(t, c.e, c.label, func(s hsm.Session) {
			keys, err := s.ListKeys(context.Background(), hsm.Filter{})
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]int{}
			for _, k := range keys {
				if strings.HasPrefix(k.Label, plan.TransportLabelPrefix) {
					t.Errorf("transport key %s (%q) left on the token", k.Ref, k.Label)
					continue
				}
				kcv, ok := c.want[k.ID.String()]
				if !ok {
					t.Errorf("unexpected key %s (%q) on the token", k.Ref, k.Label)
					continue
				}
				seen[k.ID.String()]++
				if kcv.String() != k.KCV.String() {
					t.Errorf("key id %s: KCV %s on the token, want %s", k.ID, k.KCV, kcv)
				}
			}
			for id := range c.want {
				if seen[id] != 1 {
					t.Errorf("key id %s is on the token %d times, want exactly 1", id, seen[id])
				}
			}
		})
	}
	checkJournal(t, journal.DefaultPath(c.planPath))
	if r := keymigWith(t, c.env(), "", "verify", "--plan", c.planPath); r.code != 0 || !strings.Contains(r.out, "0 errors") {
		t.Errorf("verify: %s", r)
	}
}

// TestTokenMigrateKilled kills keymig migrate between a SoftHSM token and
// an included cluster, both ways, at every point of keymig's own, in the
// middle of the job; the resumed run adopts what an interrupted attempt
// made (on a token: found by CKA_ID, label, class and check value) and
// every key arrives exactly once.
func TestTokenMigrateKilled(t *testing.T) {
	const n = 8
	for _, toToken := range []bool{false, true} {
		name := "token-to-cluster"
		if toToken {
			name = "cluster-to-token"
		}
		t.Run(name, func(t *testing.T) {
			for _, p := range tokenPoints {
				t.Run(strings.ReplaceAll(string(p), "/", "-"), func(t *testing.T) {
					t.Parallel()
					c := newTokenCase(t, toToken, n)
					if r := c.run(fmt.Sprintf("%s=kill@%d", p, n/2)); !r.killed {
						t.Fatalf("not killed at pass %d of %s: %s", n/2, p, r)
					}
					c.finish()
				})
			}
		})
	}
}
