package crashtest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/testcluster"
	"github.com/keymig/keymig/journal"
)

// rotatePoints are the points a rotation within one cluster passes, each
// killed by TestRotateKilledAtEveryPoint.
var rotatePoints = []failpoint.Point{
	failpoint.RunnerBeforeItem,
	failpoint.RotateAfterSessionUnwrap,
	failpoint.RotateAfterBatchWrite,
	failpoint.JournalBeforeCommit,
	failpoint.JournalAfterCommit,
	failpoint.RotateBeforeFsync,
	failpoint.RotateAfterFsync,
	failpoint.RotateBeforeRename,
	failpoint.RotateAfterRename,
}

// rotateFixture is a cluster with an old and a new master and a data-key
// file under the old one, made once and copied for each case, and the
// output of an uninterrupted rotation.
type rotateFixture struct {
	cluster, in string
	records     int
	tokenKeys   int
	reference   []byte
}

func masterAttrs() map[hsm.Attr]bool {
	return map[hsm.Attr]bool{hsm.AttrExtractable: false, hsm.AttrWrap: true, hsm.AttrUnwrap: true}
}

// newMasterCluster makes a 2-HSM cluster at dir with the masters tde-old
// and tde-new, and returns how many keys it holds.
func newMasterCluster(t *testing.T, dir string) (keys int) {
	t.Helper()
	testcluster.New(t, dir, 2)
	testcluster.WithUser(t, dir, func(s hsm.Session) {
		for _, label := range []string{"tde-old", "tde-new"} {
			if _, err := s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: label, Attrs: masterAttrs()}}); err != nil {
				t.Fatal(err)
			}
		}
		list, err := s.ListKeys(context.Background(), hsm.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		keys = len(list)
	})
	return keys
}

func newRotateFixture(t *testing.T, records int) rotateFixture {
	t.Helper()
	dir := t.TempDir()
	f := rotateFixture{cluster: filepath.Join(dir, "hsm"), in: filepath.Join(dir, "datakeys.jsonl"), records: records}
	f.tokenKeys = newMasterCluster(t, f.cluster)
	must(t, 0, "datakeys", "generate", "--cluster", f.cluster, "--master", "attr.label=tde-old", "--count", fmt.Sprint(records), "--out", f.in, "--no-progress")
	ref := filepath.Join(dir, "reference.jsonl")
	must(t, 0, f.args(f.cluster, f.in, ref)...)
	// Every case's output must be byte for byte this one, which holds
	// every data key of the input under the new master:
	v := must(t, 0, "datakeys", "verify", "--source", f.cluster, "--from-key", "attr.label=tde-old", "--in", f.in,
		"--to-key", "attr.label=tde-new", "--rotated", ref)
	if !strings.Contains(v.out, fmt.Sprintf("verified    %d", records)) {
		t.Fatalf("datakeys verify of the uninterrupted run: %s", v)
	}
	var err error
	if f.reference, err = os.ReadFile(ref); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f rotateFixture) args(cluster, in, out string) []string {
	return []string{"rotate", "--source", cluster, "--from-key", "attr.label=tde-old", "--to-key", "attr.label=tde-new",
		"--in", in, "--out", out, "--batch", "100", "--workers", "16", "--no-progress"}
}

// rotation is one case: a copy of the fixture's cluster and input.
type rotation struct {
	t                *testing.T
	cluster, in, out string
	f                rotateFixture
}

func (f rotateFixture) rotation(t *testing.T) *rotation {
	dir := keymigtest.TempDir(t)
	r := &rotation{t: t, cluster: filepath.Join(dir, "hsm"), in: filepath.Join(dir, "datakeys.jsonl"), out: filepath.Join(dir, "rotated.jsonl"), f: f}
	copyDir(t, f.cluster, r.cluster)
	in, err := os.ReadFile(f.in)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.in, in, 0o600); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *rotation) run(failpoints string) result { return keymig(r.t, failpoints, r.command()...) }
func (r *rotation) command() []string            { return r.f.args(r.cluster, r.in, r.out) }

// finish runs the rotation to the end and checks it: the output is byte
// for byte the uninterrupted run's (which datakeys verify confirmed),
// nothing is left half-written, the journal is clean, and the cluster
// holds no session object and no new key.
func (r *rotation) finish() {
	t := r.t
	t.Helper()
	if res := r.run(""); res.code != 0 {
		t.Fatalf("the last run: %s", res)
	}
	got, err := os.ReadFile(r.out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, r.f.reference) {
		t.Fatalf("the output after kills differs from an uninterrupted run's (%d and %d bytes)", len(got), len(r.f.reference))
	}
	for _, p := range []string{r.out + ".partial", r.out + ".rejects", r.out + ".rejects.partial"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s is left behind", p)
		}
	}
	checkJournal(t, journal.DefaultPath(r.out))
	keys := checkTarget(t, r.cluster, keyCheck{})
	if len(keys) != r.f.tokenKeys {
		t.Errorf("%d keys in the cluster after the rotation, %d before", len(keys), r.f.tokenKeys)
	}
}

// TestRotateKilledAtEveryPoint kills keymig rotate at every point between
// two durable effects of a rotation, early, in the middle and late,
// resumes it after each kill, and checks that the output is exactly that
// of an uninterrupted run.
func TestRotateKilledAtEveryPoint(t *testing.T) {
	records := 1000 // ten batches
	if testing.Short() {
		records = 500
	}
	f := newRotateFixture(t, records)
	passes := countPasses(t, rotatePoints, f.rotation(t).run)
	killAtEveryPass(t, rotatePoints, passes, func(t *testing.T) killCase { return f.rotation(t) })
}

// TestRotateInjectedErrors makes the rename into place and a batch write
// fail: the run fails naming the cause, and the next run finishes with
// the same output.
func TestRotateInjectedErrors(t *testing.T) {
	f := newRotateFixture(t, 300)
	for _, p := range []failpoint.Point{failpoint.RotateBeforeRename, failpoint.RotateAfterBatchWrite, failpoint.RotateAfterFsync} {
		t.Run(strings.ReplaceAll(string(p), "/", "-"), func(t *testing.T) {
			t.Parallel()
			r := f.rotation(t)
			if res := r.run(string(p) + "=error@1"); res.code != 1 || !strings.Contains(res.out, "injected failure") {
				t.Fatalf("want exit 1 naming the injected failure: %s", res)
			}
			r.finish()
		})
	}
}
