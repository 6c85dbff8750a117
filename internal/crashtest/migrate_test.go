package crashtest

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/testcluster"
	"github.com/keymig/keymig/journal"
	"github.com/keymig/keymig/plan"
)

// migratePoints are the points a transfer passes, each killed by
// TestMigrateKilledAtEveryPoint.
var migratePoints = []failpoint.Point{
	failpoint.RunnerBeforeItem,
	failpoint.MigrateAfterSourceExport,
	failpoint.JournalBeforeCommit,
	failpoint.JournalAfterCommit,
	failpoint.MigrateAfterActing,
	failpoint.NodeAfterAuditAppend,
	failpoint.NodeAfterCommit,
	failpoint.ClusterAfterHomeWrite,
	failpoint.ClusterAfterCopy,
	failpoint.MigrateAfterTargetUnwrap,
	failpoint.MigrateBeforeDone,
}

// migrateFixture is a source cluster with keys to move and an empty
// target, made once and copied for each case.
type migrateFixture struct {
	src, dst string
	want     map[string]hsm.Bytes // id → KCV of every key to move
}

// newMigrateFixture makes n AES keys and an extractable RSA key pair on a
// 2-HSM source, and an empty 2-HSM target.
func newMigrateFixture(t *testing.T, n int) migrateFixture {
	t.Helper()
	dir := t.TempDir()
	f := migrateFixture{src: filepath.Join(dir, "src"), dst: filepath.Join(dir, "dst")}
	testcluster.New(t, f.src, 2)
	testcluster.New(t, f.dst, 2)
	f.want = testcluster.GenerateAES(t, f.src, "k", n, nil)
	testcluster.WithUser(t, f.src, func(s hsm.Session) {
		pub, priv, err := s.GenerateKeyPair(context.Background(), hsm.KeyPairSpec{Type: hsm.TypeRSA, Bits: 2048,
			Public:  hsm.Template{Label: "signing", ID: hsm.Bytes("rsa-1"), Attrs: map[hsm.Attr]bool{hsm.AttrVerify: true}},
			Private: hsm.Template{Label: "signing", ID: hsm.Bytes("rsa-1"), Attrs: map[hsm.Attr]bool{hsm.AttrSign: true, hsm.AttrExtractable: true}},
		})
		if err != nil {
			t.Fatal(err)
		}
		if pub.KCV.String() != priv.KCV.String() {
			t.Fatalf("the halves of a key pair have check values %s and %s", pub.KCV, priv.KCV)
		}
	})
	return f
}

// migration is one case: copies of the fixture, planned.
type migration struct {
	t          *testing.T
	f          migrateFixture
	src, dst   string
	plan       string
	migrateArg []string
}

func (f migrateFixture) migration(t *testing.T, transport string, extra ...string) *migration {
	t.Helper()
	dir := keymigtest.TempDir(t)
	m := &migration{t: t, f: f, src: filepath.Join(dir, "src"), dst: filepath.Join(dir, "dst"), plan: filepath.Join(dir, "plan.json")}
	copyDir(t, f.src, m.src)
	copyDir(t, f.dst, m.dst)
	must(t, 2, "plan", "--source", m.src, "--target", m.dst, "--transport", transport, "--transport-bits", "2048", "--out", m.plan)
	m.migrateArg = append([]string{"migrate", "--plan", m.plan, "--workers", "4", "--no-progress"}, extra...)
	return m
}

func (m *migration) run(failpoints string) result { return keymig(m.t, failpoints, m.migrateArg...) }
func (m *migration) command() []string            { return m.migrateArg }

// finish runs the migration to the end and checks everything: every key
// on the target once, with its KCV, on two HSMs, nothing else; the
// journal clean and done; keymig verify content.
func (m *migration) finish() {
	t, f := m.t, m.f
	t.Helper()
	if r := m.run(""); r.code != 0 {
		t.Fatalf("the last run: %s", r)
	}
	want := map[string]hsm.Bytes{}
	for id, kcv := range f.want {
		want[id] = kcv
	}
	keys := checkTarget(t, m.dst, keyCheck{want: want})
	pair := 0
	for _, k := range keys {
		if k.Label == "signing" {
			pair++
		} else if _, ok := want[k.ID.String()]; !ok {
			t.Errorf("unexpected key %s (%q) on the target", k.Ref, k.Label)
		}
	}
	if pair != 2 {
		t.Errorf("%d halves of the RSA key pair on the target, want 2", pair)
	}
	checkJournal(t, journal.DefaultPath(m.plan))
	if r := must(t, 0, "verify", "--plan", m.plan); !strings.Contains(r.out, "0 errors") {
		t.Errorf("verify: %s", r)
	}
}

// TestMigrateKilledAtEveryPoint kills keymig migrate at every point a key
// passes between two durable effects, early, in the middle and late in the
// job, resumes it after each kill, and checks that every key arrived
// exactly once.
func TestMigrateKilledAtEveryPoint(t *testing.T) {
	keys := 24
	if testing.Short() {
		keys = 12
	}
	f := newMigrateFixture(t, keys)
	passes := countPasses(t, migratePoints, f.migration(t, "session-kek").run)
	killAtEveryPass(t, migratePoints, passes, func(t *testing.T) killCase { return f.migration(t, "session-kek") })
}

// TestMigrateInjectedErrors makes a step fail, instead of killing the
// process, after the target HSM made the key and before the migration
// recorded it: the key fails with the cause named, and the next run adopts
// it rather than making it twice. One worker makes pass 3 the same step
// of the second key every time.
func TestMigrateInjectedErrors(t *testing.T) {
	f := newMigrateFixture(t, 12)
	for _, p := range []failpoint.Point{failpoint.MigrateAfterTargetUnwrap, failpoint.ClusterAfterHomeWrite} {
		t.Run(strings.ReplaceAll(string(p), "/", "-"), func(t *testing.T) {
			t.Parallel()
			m := f.migration(t, "session-kek")
			r := keymig(t, fmt.Sprintf("%s=error@3", p), "migrate", "--plan", m.plan, "--workers", "1", "--no-progress")
			if r.code != 1 || !strings.Contains(r.out, "failed       1") || !strings.Contains(r.out, "injected failure") {
				t.Fatalf("want one key failed by the injected failure: %s", r)
			}
			m.finish()
		})
	}
}

// TestMigrateStopsCleanlyOnSIGINT interrupts keymig migrate with SIGINT
// while it is paused before its 30th key: it exits 130 with the resume
// hint, leaves no key between its target call and its commit, and the next
// run finishes the job.
func TestMigrateStopsCleanlyOnSIGINT(t *testing.T) {
	f := newMigrateFixture(t, 60)
	m := f.migration(t, "rsa-aes")
	marker := filepath.Join(t.TempDir(), "paused")
	proc := startKeymig(t, fmt.Sprintf("%s=pause(%s)@30", failpoint.RunnerBeforeItem, marker), m.migrateArg...)
	proc.waitMarker(marker, 1)
	proc.signal(syscall.SIGINT)
	r := proc.wait()
	if r.code != 130 || !strings.Contains(r.out, "run the same command again to resume") {
		t.Fatalf("after SIGINT: want exit 130 and the resume hint: %s", r)
	}
	j, err := journal.Open(journal.DefaultPath(m.plan), journal.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	p, err := plan.Read(m.plan)
	if err != nil {
		t.Fatal(err)
	}
	run, info, err := j.Run(p.Digest)
	if err != nil {
		t.Fatal(err)
	}
	counts, _ := run.Counts()
	j.Close()
	// 29 items were started before the pause, and each was let finish.
	if info.Status != journal.RunInterrupted || counts["acting"] != 0 || counts["done"] != 29 || counts["pending"] != len(p.Items)-29 {
		t.Fatalf("after SIGINT: run %s, states %v; want interrupted, 29 done, %d pending, none acting", info.Status, counts, len(p.Items)-29)
	}
	m.finish()
}

// TestEveryPointIsKilled checks that the crash tests together kill the
// process at every failpoint keymig has.
func TestEveryPointIsKilled(t *testing.T) {
	covered := map[failpoint.Point]bool{}
	for _, list := range [][]failpoint.Point{migratePoints, migrateRotationPoints, rotatePoints, tablePoints, synckeyPoints, synckeyPrunePoints, {failpoint.SynckeyBetweenSyncs}} {
		for _, p := range list {
			covered[p] = true
		}
	}
	for _, d := range failpoint.All() {
		if !covered[d.Point] {
			t.Errorf("no crash test kills keymig at %s", d.Point)
		}
	}
}
