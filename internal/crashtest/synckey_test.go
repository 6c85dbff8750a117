package crashtest

import (
	"encoding/json"
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
	"github.com/keymig/keymig/synckey"
)

// synckeyPoints are the points a sync passes when it copies keys, each
// killed by TestSynckeyKilledAtEveryPoint.
var synckeyPoints = []failpoint.Point{
	failpoint.RunnerBeforeItem,
	failpoint.JournalBeforeCommit,
	failpoint.JournalAfterCommit,
	failpoint.SynckeyAfterInserting,
	failpoint.NodeAfterAuditAppend,
	failpoint.NodeAfterCommit,
	failpoint.ClusterAfterHomeWrite,
	failpoint.ClusterAfterCopy,
	failpoint.SynckeyAfterInsert,
}

// synckeyPrunePoints are the points a sync passes when it deletes keys
// only on the target (--prune --yes).
var synckeyPrunePoints = []failpoint.Point{
	failpoint.SynckeyAfterDeleting,
	failpoint.NodeAfterCommit,
}

// syncFixture is a clone pair with keys made on the source after the
// clone, made once and copied for each case.
type syncFixture struct {
	src, dst string
	want     map[string]hsm.Bytes
	extra    map[string]hsm.Bytes // keys made on the target only
}

func newSyncFixture(t *testing.T, n int) syncFixture {
	t.Helper()
	src, dst := testcluster.ClonePair(t, t.TempDir())
	f := syncFixture{src: src, dst: dst}
	f.want = testcluster.GenerateAES(t, src, "s", n, nil)
	for id, kcv := range testcluster.GenerateAES(t, src, "x", 3, map[hsm.Attr]bool{hsm.AttrExtractable: false}) {
		f.want[id] = kcv
	}
	f.extra = testcluster.GenerateAES(t, dst, "t", 6, nil)
	return f
}

// syncCase is one case: copies of the fixture's pair.
type syncCase struct {
	t *testing.T
	f syncFixture
	// want is what the target must hold in the end: the source's keys
	// and its own.
	want     map[string]hsm.Bytes
	src, dst string
	args     []string
}

func (f syncFixture) sync(t *testing.T, extra ...string) *syncCase {
	t.Helper()
	dir := keymigtest.TempDir(t)
	s := &syncCase{t: t, f: f, want: map[string]hsm.Bytes{}, src: filepath.Join(dir, "src"), dst: filepath.Join(dir, "dst")}
	copyDir(t, f.src, s.src)
	copyDir(t, f.dst, s.dst)
	for _, m := range []map[string]hsm.Bytes{f.want, f.extra} {
		for id, kcv := range m {
			s.want[id] = kcv
		}
	}
	s.args = append([]string{"synckey", "--source", s.src, "--target", s.dst, "--workers", "4", "--no-progress"}, extra...)
	return s
}

func (s *syncCase) run(failpoints string) result { return keymig(s.t, failpoints, s.args...) }
func (s *syncCase) command() []string            { return s.args }

// journal is the pair's default journal.
func (s *syncCase) journal() string {
	matches, _ := filepath.Glob(filepath.Join(s.dst, "synckey-*.journal"))
	if len(matches) != 1 {
		s.t.Fatalf("want one synckey journal in %s, found %v", s.dst, matches)
	}
	return matches[0]
}

// finish runs the sync to the end and checks: every source key on the
// target exactly once with its KCV on two HSMs, every run of the journal
// done, each key copied by exactly one run, and a last sync that finds
// nothing to do.
func (s *syncCase) finish() {
	t, f := s.t, s.f
	t.Helper()
	if r := s.run(""); r.code != 0 {
		t.Fatalf("the last run: %s", r)
	}
	checkTarget(t, s.dst, keyCheck{want: s.want, only: true})
	copied := 0
	for _, r := range checkJournal(t, s.journal()) {
		var sum synckey.Summary
		if err := json.Unmarshal(r.Summary, &sum); err != nil {
			t.Fatalf("run %s: summary: %v", r.ID, err)
		}
		copied += sum.Copied
	}
	if copied != len(f.want) {
		t.Errorf("the runs' summaries count %d keys copied, want %d", copied, len(f.want))
	}
	if r := s.run(""); !strings.Contains(r.out, fmt.Sprintf("done; %d same, 0 copied, 0 failed", len(f.want))) {
		t.Errorf("a sync after the end: %s", r)
	}
}

// TestSynckeyKilledAtEveryPoint kills keymig synckey at every point of a
// copy between two durable effects, early, in the middle and late, resumes
// it after each kill, and checks that every key reached the clone once.
func TestSynckeyKilledAtEveryPoint(t *testing.T) {
	keys := 40
	if testing.Short() {
		keys = 16
	}
	f := newSyncFixture(t, keys)
	passes := countPasses(t, synckeyPoints, f.sync(t).run)
	killAtEveryPass(t, synckeyPoints, passes, func(t *testing.T) killCase { return f.sync(t) })
}

// TestSynckeyPruneKilled kills keymig synckey --prune --yes between the
// journal's "deleting" and the delete, and in the HSM's commit of the
// delete: the keys only on the target are gone after the resume, the
// others are all there.
func TestSynckeyPruneKilled(t *testing.T) {
	f := newSyncFixture(t, 4)
	for _, p := range synckeyPrunePoints {
		t.Run(strings.ReplaceAll(string(p), "/", "-"), func(t *testing.T) {
			t.Parallel()
			s := f.sync(t)
			must(t, 0, s.args...) // copy first, so only deletes are left
			s.args = append(s.args, "--prune", "--yes")
			if r := s.run(string(p) + "=kill@2"); !r.killed {
				t.Fatalf("not killed at pass 2 of %s: %s", p, r)
			}
			s.want = f.want
			s.finish()
		})
	}
}

// TestSynckeyEvery runs keymig synckey --every 1h as a real process and
// drives it by its markers: it writes one each time it goes to sleep, and
// SIGUSR1 starts the next sync at once. A key added on the source between
// runs is copied by the next one, a kill between syncs loses nothing, and
// SIGTERM between runs ends it with exit 0.
func TestSynckeyEvery(t *testing.T) {
	f := newSyncFixture(t, 5)
	s := f.sync(t)
	s.args = append(s.args, "--every", "1h")
	marker := filepath.Join(t.TempDir(), "between")
	proc := startKeymig(t, fmt.Sprintf("%s=mark(%s)", failpoint.SynckeyBetweenSyncs, marker), s.args...)
	proc.waitMarker(marker, 1)
	added := testcluster.GenerateAES(t, s.src, "late", 1, map[hsm.Attr]bool{hsm.AttrExtractable: false})
	proc.signal(syscall.SIGUSR1)
	proc.waitMarker(marker, 2)
	proc.signal(syscall.SIGUSR1)
	proc.waitMarker(marker, 3)
	proc.signal(syscall.SIGTERM)
	r := proc.wait()
	if r.code != 0 || !strings.Contains(r.out, "stopped between syncs") {
		t.Fatalf("synckey --every after SIGTERM: want exit 0 and 'stopped between syncs': %s", r)
	}
	if n := strings.Count(r.out, `msg="sync run finished"`); n != 3 {
		t.Errorf("%d 'sync run finished' log lines, want 3:\n%s", n, r.out)
	}
	runs := checkJournal(t, s.journal())
	var copies []int
	for _, ri := range runs {
		var sum synckey.Summary
		json.Unmarshal(ri.Summary, &sum)
		copies = append(copies, sum.Copied)
	}
	// The first run copies the keys made after the clone, the second the
	// key added between runs, the third nothing.
	if fmt.Sprint(copies) != fmt.Sprint([]int{len(f.want), 1, 0}) {
		t.Errorf("keys copied per run: %v; want %d, 1, 0", copies, len(f.want))
	}
	checkTarget(t, s.dst, keyCheck{want: added})

	// Killed while asleep between syncs: the next start syncs as usual.
	testcluster.GenerateAES(t, s.src, "later", 2, nil)
	if r := s.run(string(failpoint.SynckeyBetweenSyncs) + "=kill@1"); !r.killed {
		t.Fatalf("not killed between syncs: %s", r)
	}
	for _, ri := range checkJournal(t, s.journal()) {
		if ri.Status != journal.RunDone {
			t.Errorf("run %s: %s", ri.ID, ri.Status)
		}
	}
}
