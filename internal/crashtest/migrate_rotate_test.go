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

// migrateRotationPoints are the points a migration passes when it makes a
// new master on the target and rotates the old one's data keys under it,
// each killed by TestMigrateRotationKilledAtEveryPoint.
// The points a transfer passes on its own are TestMigrateKilledAtEveryPoint's.
var migrateRotationPoints = []failpoint.Point{
	failpoint.MigrateAfterActing,
	failpoint.MigrateAfterTargetUnwrap,
	failpoint.RotateAfterSessionUnwrap,
	failpoint.RotateAfterBatchWrite,
	failpoint.RotateBeforeRename,
	failpoint.RotateAfterRename,
	failpoint.MigrateBeforeDone,
}

// TestMigrateRotationKilledAtEveryPoint migrates a non-extractable master
// key with its data keys (plan --datakeys) and a few ordinary keys,
// killing keymig migrate at each point of the rotation, and checks: the
// target holds exactly one new master with the old one's label and id and
// new key material; every data key is in the rotated file and is the same
// data key inside (datakeys verify, by KCV in the HSMs); nothing is left
// half-written; the journal is clean; the old master is unchanged.
func TestMigrateRotationKilledAtEveryPoint(t *testing.T) {
	records := 1100 // two batches of the rotation
	if testing.Short() {
		records = 1100
	}
	dir := t.TempDir()
	fsrc, fdst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	testcluster.New(t, fsrc, 2)
	testcluster.New(t, fdst, 2)
	var old hsm.KeyInfo
	testcluster.WithUser(t, fsrc, func(s hsm.Session) {
		var err error
		if old, err = s.GenerateKey(context.Background(), hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{
			Label: "tde", ID: hsm.Bytes("tde-1"), Attrs: masterAttrs()}}); err != nil {
			t.Fatal(err)
		}
	})
	apps := testcluster.GenerateAES(t, fsrc, "app", 5, nil)
	fin := filepath.Join(dir, "tde.jsonl")
	must(t, 0, "datakeys", "generate", "--cluster", fsrc, "--master", "attr.label=tde", "--count", fmt.Sprint(records), "--out", fin, "--no-progress")

	newCase := func(t *testing.T) killCase {
		d := keymigtest.TempDir(t)
		c := &rotationMigration{t: t, src: filepath.Join(d, "src"), dst: filepath.Join(d, "dst"), in: filepath.Join(d, "tde.jsonl"), plan: filepath.Join(d, "plan.json"),
			records: records, old: old, apps: apps}
		copyDir(t, fsrc, c.src)
		copyDir(t, fdst, c.dst)
		b, err := os.ReadFile(fin)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(c.in, b, 0o600); err != nil {
			t.Fatal(err)
		}
		c.before = b
		must(t, 2, "plan", "--source", c.src, "--target", c.dst, "--datakeys", "tde="+c.in, "--out", c.plan)
		return c
	}
	passes := countPasses(t, migrateRotationPoints, newCase(t).run)
	killAtEveryPass(t, migrateRotationPoints, passes, func(t *testing.T) killCase { return newCase(t) })
}

// rotationMigration is one case of TestMigrateRotationKilledAtEveryPoint.
type rotationMigration struct {
	t                  *testing.T
	src, dst, in, plan string
	records            int
	old                hsm.KeyInfo
	apps               map[string]hsm.Bytes
	before             []byte
}

func (c *rotationMigration) run(fp string) result { return keymig(c.t, fp, c.command()...) }
func (c *rotationMigration) command() []string {
	return []string{"migrate", "--plan", c.plan, "--workers", "16", "--no-progress"}
}

func (c *rotationMigration) finish() {
	t := c.t
	t.Helper()
	if r := c.run(""); r.code != 0 {
		t.Fatalf("the last run: %s", r)
	}
	rotated := c.in + ".rotated"
	v := must(t, 0, "datakeys", "verify", "--source", c.src, "--from-key", "attr.label=tde", "--in", c.in,
		"--target", c.dst, "--to-key", "attr.label=tde", "--rotated", rotated, "--sessions", "2")
	if !strings.Contains(v.out, fmt.Sprintf("verified    %d", c.records)) {
		t.Errorf("datakeys verify: %s", v)
	}
	for _, p := range []string{rotated + ".partial", rotated + ".rejects", rotated + ".rejects.partial"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s is left behind", p)
		}
	}
	if after, _ := os.ReadFile(c.in); !bytes.Equal(c.before, after) {
		t.Error("the data-key file was changed")
	}
	must(t, 0, "verify", "--plan", c.plan)
	checkJournal(t, journal.DefaultPath(c.plan))
	keys := checkTarget(t, c.dst, keyCheck{want: c.apps})
	var masters []hsm.KeyInfo
	for _, k := range keys {
		if k.Label == "tde" {
			masters = append(masters, k)
		}
	}
	if len(masters) != 1 || len(keys) != 6 {
		t.Fatalf("%d new masters and %d keys on the target, want 1 and 6: %v", len(masters), len(keys), keys)
	}
	old := c.old
	if m := masters[0]; m.ID.String() != old.ID.String() || m.KCV.String() == old.KCV.String() || m.Attrs.Extractable || m.Coverage.Count() < 2 {
		t.Errorf("new master %s: id %s kcv %s extractable %v on %d HSMs; old id %s kcv %s", m.Ref, m.ID, m.KCV, m.Attrs.Extractable, m.Coverage.Count(), old.ID, old.KCV)
	}
	testcluster.WithUser(t, c.src, func(s hsm.Session) {
		k, err := s.GetKey(context.Background(), old.Ref)
		if err != nil || k.KCV.String() != old.KCV.String() || k.Attrs != old.Attrs {
			t.Errorf("the old master changed: %+v, %v", k, err)
		}
	})
}
