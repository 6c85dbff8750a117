package crashtest

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"sync/atomic"
	"testing"

	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/pgtest"
)

// tablePoints are the points an in-place rotation of a PostgreSQL table
// passes, each killed by TestRotateTableKilledAtEveryPoint: mid-page
// (a data key in a session object), before a page's UPDATE, after it
// commits but before the journal records it, and around journal commits.
var tablePoints = []failpoint.Point{
	failpoint.RotateAfterSessionUnwrap,
	failpoint.RotateBeforeTableSwap,
	failpoint.RotateAfterTableSwap,
	failpoint.JournalBeforeCommit,
	failpoint.JournalAfterCommit,
}

// tableFixture is a cluster with two masters and a database whose table
// holds data keys under the old one; each case gets a copy of both (the
// database by CREATE DATABASE ... TEMPLATE).
type tableFixture struct {
	srv         *pgtest.Server
	cluster, db string
	rows        int
	tokenKeys   int
	fingerprint string
	n           *atomic.Int64
}

// tableFixtures numbers the fixtures' databases: the server is shared by
// every test of the binary (and every -count round).
var tableFixtures atomic.Int64

var fingerprintRe = regexp.MustCompile(`fingerprint +([0-9a-f]{64})`)

func newTableFixture(t *testing.T, rows int) tableFixture {
	t.Helper()
	srv := pgtest.Shared(t)
	dir := t.TempDir()
	f := tableFixture{srv: srv, cluster: filepath.Join(dir, "hsm"), rows: rows, n: new(atomic.Int64)}
	f.db = fmt.Sprintf("crash_%d_%d", srv.Port(), tableFixtures.Add(1))
	if _, err := srv.CreateDB(f.db); err != nil {
		t.Fatal(err)
	}
	f.tokenKeys = newMasterCluster(t, f.cluster)
	must(t, 0, "datakeys", "generate", "--cluster", f.cluster, "--master", "attr.label=tde-old", "--count", fmt.Sprint(rows),
		"--out", srv.URL(f.db), "--table", "public.data_keys", "--no-progress")
	v := keymig(t, "", f.verifyArgs(f.cluster, srv.URL(f.db))...)
	m := fingerprintRe.FindStringSubmatch(v.out)
	if m == nil {
		t.Fatalf("no fingerprint: %s", v)
	}
	f.fingerprint = m[1]
	return f
}

func (f tableFixture) verifyArgs(cluster, url string) []string {
	return []string{"datakeys", "verify", "--source", cluster, "--from-key", "attr.label=tde-old", "--to-key", "attr.label=tde-new",
		"--in", url, "--table", "public.data_keys"}
}

// tableRotation is one case: a copy of the cluster and of the database.
type tableRotation struct {
	t                     *testing.T
	f                     tableFixture
	cluster, url, journal string
}

func (f tableFixture) rotation(t *testing.T) *tableRotation {
	dir := keymigtest.TempDir(t)
	r := &tableRotation{t: t, f: f, cluster: filepath.Join(dir, "hsm"), journal: filepath.Join(dir, "rotate.journal")}
	copyDir(t, f.cluster, r.cluster)
	name := fmt.Sprintf("%s_case%d", f.db, f.n.Add(1))
	if err := f.srv.Exec(context.Background(), "postgres", fmt.Sprintf("CREATE DATABASE %s TEMPLATE %s", name, f.db)); err != nil {
		t.Fatal(err)
	}
	r.url = f.srv.URL(name)
	return r
}

func (r *tableRotation) command() []string { return r.args(r.journal) }
func (r *tableRotation) args(journal string) []string {
	return []string{"rotate", "--source", r.cluster, "--from-key", "attr.label=tde-old", "--to-key", "attr.label=tde-new",
		"--in", r.url, "--table", "public.data_keys", "--journal", journal, "--batch", "100", "--workers", "16", "--no-progress"}
}
func (r *tableRotation) run(failpoints string) result { return keymig(r.t, failpoints, r.command()...) }

// finish resumes the rotation to its end and checks it: every row under
// the new master holding the data key it held before (the fingerprint of
// all of them is the one taken before any rotation), the journal clean,
// no session object or new key left in the cluster, and a second run with
// a new journal changes nothing.
func (r *tableRotation) finish() {
	t := r.t
	t.Helper()
	if res := r.run(""); res.code != 0 {
		t.Fatalf("the last run: %s", res)
	}
	v := keymig(t, "", r.f.verifyArgs(r.cluster, r.url)...)
	if v.code != 0 || !regexp.MustCompile(fmt.Sprintf(`under the new master +%d `, r.f.rows)).MatchString(v.out) {
		t.Fatalf("datakeys verify after the kills: %s", v)
	}
	if m := fingerprintRe.FindStringSubmatch(v.out); m == nil || m[1] != r.f.fingerprint {
		t.Fatalf("the data keys changed: fingerprint %v, before %s", m, r.f.fingerprint)
	}
	checkJournal(t, r.journal)
	if keys := checkTarget(t, r.cluster, keyCheck{}); len(keys) != r.f.tokenKeys {
		t.Errorf("%d keys in the cluster after the rotation, %d before", len(keys), r.f.tokenKeys)
	}
	again := must(t, 0, r.args(r.journal+".again")...)
	if !regexp.MustCompile(`rotated +0 `).MatchString(again.out) {
		t.Fatalf("a second run changed rows: %s", again)
	}
}

// TestRotateTableKilledAtEveryPoint kills an in-place rotation of a
// PostgreSQL table at every point, early, in the middle and late, and
// resumes it: every row ends under the new master exactly once.
func TestRotateTableKilledAtEveryPoint(t *testing.T) {
	f := newTableFixture(t, 1000)
	passes := countPasses(t, tablePoints, f.rotation(t).run)
	killAtEveryPass(t, tablePoints, passes, func(t *testing.T) killCase { return f.rotation(t) })
}
