package rotate_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/rotate"
)

var (
	officer = hsm.Credentials{User: "admin", Password: "admin-pass-1"}
	user    = hsm.Credentials{User: "alice", Password: "alice-pass-1"}
)

// testCluster makes an n-HSM cluster with a crypto user and returns
// `sessions` sessions of that user.
func testCluster(t testing.TB, dir string, hsms, sessions int) (*cluster.Cluster, []rotate.Session) {
	t.Helper()
	ctx := context.Background()
	keymigtest.CheckAfter(t, dir)
	c, err := cluster.Init(ctx, cluster.InitOptions{Dir: dir, HSMs: hsms, Officer: officer, KDFIterations: 1000})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	co, err := c.Login(ctx, officer)
	if err != nil {
		t.Fatal(err)
	}
	if err := co.(hsm.Users).CreateUser(ctx, user.User, hsm.RoleCryptoUser, user.Password); err != nil {
		t.Fatal(err)
	}
	co.Logout(ctx)
	var ss []rotate.Session
	for range sessions {
		s, err := c.Login(ctx, user)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Logout(context.Background()) })
		ss = append(ss, s.(rotate.Session))
	}
	return c, ss
}

// master makes a non-extractable AES-256 master key and returns a filter
// that selects it.
func master(t testing.TB, s hsm.Session, label string) (hsm.KeyInfo, hsm.Filter) {
	t.Helper()
	k, err := s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
		Label: label, Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: false, hsm.AttrWrap: true, hsm.AttrUnwrap: true},
	}})
	if err != nil {
		t.Fatal(err)
	}
	return k, hsm.Filter{Ref: k.Ref}
}

// generate writes n data keys under m to path.
func generate(t testing.TB, side rotate.Side, m hsm.Filter, n int, alg, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := rotate.Generate(context.Background(), rotate.GenerateConfig{Cluster: side, Master: m, Count: n, Alg: alg}, f); err != nil {
		t.Fatal(err)
	}
}

// replicate writes path again with each line repeated times times, ids
// made unique: the same HSM work per record, for big files made quickly.
func replicate(t testing.TB, path string, times int) {
	t.Helper()
	src, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	lines := bytes.Split(bytes.TrimSuffix(src, []byte("\n")), []byte("\n"))
	for r := range times {
		for _, l := range lines {
			fmt.Fprintf(w, "{\"copy\":%d,%s\n", r, l[1:])
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// openJournal opens a journal in dir, closed at the end of the test.
func openJournal(t testing.TB, path string) *journal.Journal {
	t.Helper()
	j, err := journal.Open(path, journal.Options{Command: "rotate-test", NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

// noSessionObjects fails if a session can see keys rotate labelled.
func noSessionObjects(t testing.TB, ss ...rotate.Session) {
	t.Helper()
	for _, s := range ss {
		keys, err := s.ListKeys(context.Background(), hsm.Filter{Attrs: map[hsm.Attr]bool{hsm.AttrToken: false}})
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			if k.Label == "keymig-rotate" {
				t.Errorf("session object %s (%q) left behind", k.Ref, k.Label)
			}
		}
	}
}

func tempPaths(t testing.TB) (in, out string) {
	d := t.TempDir()
	return filepath.Join(d, "datakeys.jsonl"), filepath.Join(d, "rotated.jsonl")
}

func errorsAs(err error, target any) bool { return errors.As(err, target) }
