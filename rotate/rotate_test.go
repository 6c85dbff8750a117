package rotate_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/rotate"
)

// scale is the number of data keys of the round-trip tests: 100,000, or
// 10,000 under -short or the race detector (which makes the HSM
// simulation several times slower).
func scale() int {
	if testing.Short() || raceEnabled {
		return 5_000
	}
	return 100_000
}

func TestRoundTripSameCluster(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	_, ss := testCluster(t, filepath.Join(dir, "c"), 2, 8)
	side := rotate.Side{Name: "c", Sessions: ss}
	_, old := master(t, ss[0], "tde-old")
	_, nw := master(t, ss[0], "tde-new")
	in, out := tempPaths(t)
	n := scale()
	// Distinct data keys from the HSM, copied to n records (with distinct
	// ids): the HSM work per record is the same.
	generate(t, side, old, n/10, rotate.AlgKWP, in)
	replicate(t, in, 10)
	j := openJournal(t, out+".journal")
	rep, err := rotate.Run(ctx, j, rotate.Config{Source: side, From: old, To: nw, In: in, Out: out, Batch: 1000})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Finished || rep.Rotated != int64(n) || rep.Rejected != 0 {
		t.Fatalf("report %+v", rep)
	}
	t.Logf("rotated %d records in %s: %.0f records/s", rep.Rotated, rep.Elapsed, rep.Rate())
	vr, err := rotate.Verify(ctx, rotate.VerifyConfig{Source: side, From: old, To: nw, In: in, Rotated: out})
	if err != nil {
		t.Fatal(err)
	}
	if !vr.OK() || vr.Verified != int64(n) {
		t.Fatalf("verify: %+v", vr)
	}
	noSessionObjects(t, ss...)
	// Running again is a no-op.
	rep, err = rotate.Run(ctx, j, rotate.Config{Source: side, From: old, To: nw, In: in, Out: out, Batch: 1000})
	if err != nil || !rep.Finished || !rep.Resumed {
		t.Fatalf("second run: %+v, %v", rep, err)
	}
}

func TestRoundTripAcrossClusters(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	_, ss := testCluster(t, filepath.Join(dir, "src"), 2, 4)
	_, ds := testCluster(t, filepath.Join(dir, "dst"), 2, 4)
	src := rotate.Side{Name: "src", Sessions: ss}
	dst := rotate.Side{Name: "dst", Sessions: ds}
	_, old := master(t, ss[0], "tde")
	_, nw := master(t, ds[0], "tde")
	in, out := tempPaths(t)
	n := scale()
	generate(t, src, old, n/10, rotate.AlgGCM, in)
	replicate(t, in, 10)
	j := openJournal(t, out+".journal")
	rep, err := rotate.Run(ctx, j, rotate.Config{Source: src, Target: &dst, From: old, To: nw, In: in, Out: out, Alg: rotate.AlgKWP})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Finished || rep.Rotated != int64(n) {
		t.Fatalf("report %+v", rep)
	}
	t.Logf("rotated %d records across clusters in %s: %.0f records/s", rep.Rotated, rep.Elapsed, rep.Rate())
	vr, err := rotate.Verify(ctx, rotate.VerifyConfig{Source: src, Target: &dst, From: old, To: nw, In: in, Rotated: out})
	if err != nil {
		t.Fatal(err)
	}
	if !vr.OK() || vr.Verified != int64(n) {
		t.Fatalf("verify: %+v", vr)
	}
	noSessionObjects(t, append(ss, ds...)...)
}

// TestBadInput feeds every kind of bad record among good ones: each is
// reported by its line, the good ones are all rotated, nothing is lost.
func TestBadInput(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	_, ss := testCluster(t, filepath.Join(dir, "c"), 2, 2)
	side := rotate.Side{Name: "c", Sessions: ss}
	_, old := master(t, ss[0], "old")
	_, nw := master(t, ss[0], "new")
	_, other := master(t, ss[0], "other")
	kwp, gcm, foreign := filepath.Join(dir, "kwp"), filepath.Join(dir, "gcm"), filepath.Join(dir, "foreign")
	generate(t, side, old, 3, rotate.AlgKWP, kwp)
	generate(t, side, old, 3, rotate.AlgGCM, gcm)
	generate(t, side, other, 1, rotate.AlgKWP, foreign)
	lines := func(p string) []string {
		b, _ := os.ReadFile(p)
		return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	}
	k, g, f := lines(kwp), lines(gcm), lines(foreign)
	// A line under the right master (label and kcv) whose ciphertext is
	// really under another: only the HSM can tell.
	var underOther map[string]any
	json.Unmarshal([]byte(f[0]), &underOther)
	var good map[string]any
	json.Unmarshal([]byte(k[0]), &good)
	underOther["master"] = good["master"]
	uo, _ := json.Marshal(underOther)

	input := []string{
		k[0],                      // 1 ok (aes-kwp)
		g[0],                      // 2 ok (aes-gcm: mixed algs)
		`{"id": "x1", "master": `, // 3 malformed JSON
		strings.Replace(k[1], `"ciphertext":"`, `"ciphertext":"!!`, 1), // 4 base64 garbage
		f[0], // 5 another master (kcv)
		strings.Replace(g[1], "aes-gcm", "aes-cbc", 1), // 6 unknown alg
		string(uo),  // 7 right master named, ciphertext under another
		`[1, 2, 3]`, // 8 not an object
		`{"id":"x2","alg":"aes-kwp","ciphertext":"AAAA"}`, // 9 no master
		k[2], // 10 ok
		g[2], // 11 ok
		strings.Replace(g[1], `"ciphertext":"`, `"ciphertext":"QUFB`, 1), // 12 wrong length
	}
	in := filepath.Join(dir, "in.jsonl")
	os.WriteFile(in, []byte(strings.Join(input, "\n")), 0o600) // no final newline: a truncated file
	wantBad := map[int64]string{3: "not valid JSON", 4: "not valid base64", 5: "under another master", 6: "unknown alg",
		7: "unwrap failed", 8: "not a JSON object", 9: `"master" is missing`, 12: "cannot hold an AES key"}

	// stop: the first bad line stops the run, naming the file and line.
	out := filepath.Join(dir, "stop.jsonl")
	_, err := rotate.Run(ctx, openJournal(t, out+".journal"), rotate.Config{Source: side, From: old, To: nw, In: in, Out: out, Batch: 4})
	var re *rotate.RecordError
	if !errorsAs(err, &re) || re.Line != 3 || !strings.Contains(err.Error(), in+" line 3") {
		t.Fatalf("stop: got %v, want a record error at line 3", err)
	}
	if _, err := os.Stat(out); err == nil {
		t.Fatal("stop: the output exists")
	}

	// skip: bad lines go to the rejects file with their reasons.
	out = filepath.Join(dir, "skip.jsonl")
	rep, err := rotate.Run(ctx, openJournal(t, out+".journal"), rotate.Config{Source: side, From: old, To: nw, In: in, Out: out, Batch: 4, OnError: rotate.Skip})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Rotated != 4 || rep.Rejected != int64(len(wantBad)) {
		t.Fatalf("rotated %d rejected %d, want 4 and %d", rep.Rotated, rep.Rejected, len(wantBad))
	}
	rj, _ := os.ReadFile(out + ".rejects")
	got := map[int64]bool{}
	for _, l := range strings.Split(strings.TrimSpace(string(rj)), "\n") {
		var r rotate.Reject
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("reject line %q: %v", l, err)
		}
		want, ok := wantBad[r.Line]
		if !ok || !strings.Contains(r.Error, want) {
			t.Errorf("reject of line %d: %q, want one containing %q", r.Line, r.Error, want)
		}
		if r.Raw == nil || *r.Raw != input[r.Line-1] {
			t.Errorf("reject of line %d does not hold the raw line", r.Line)
		}
		got[r.Line] = true
	}
	if len(got) != len(wantBad) {
		t.Errorf("rejected lines %v, want %v", got, wantBad)
	}
	vr, err := rotate.Verify(ctx, rotate.VerifyConfig{Source: side, From: old, To: nw, In: in, Rotated: out, Rejects: out + ".rejects"})
	if err != nil || !vr.OK() || vr.Verified != 4 || vr.Rejected != int64(len(wantBad)) {
		t.Fatalf("verify: %+v %v", vr, err)
	}
	// Mixed algs keep their own alg.
	o, _ := os.ReadFile(out)
	if c := bytes.Count(o, []byte(`"alg":"aes-gcm"`)); c != 2 {
		t.Errorf("%d aes-gcm records in the output, want 2", c)
	}
	noSessionObjects(t, ss...)
}

// TestResumeReproducesOutput stops a rotation part-way (the run is cut
// after a few batches), damages the partial output, resumes, and checks the
// result is byte for byte that of an uninterrupted run (aes-kwp).
func TestResumeReproducesOutput(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	_, ss := testCluster(t, filepath.Join(dir, "c"), 2, 2)
	side := rotate.Side{Name: "c", Sessions: ss}
	_, old := master(t, ss[0], "old")
	_, nw := master(t, ss[0], "new")
	in := filepath.Join(dir, "in.jsonl")
	generate(t, side, old, 2000, rotate.AlgKWP, in)

	ref := filepath.Join(dir, "ref.jsonl")
	if _, err := rotate.Run(ctx, openJournal(t, ref+".journal"), rotate.Config{Source: side, From: old, To: nw, In: in, Out: ref, Batch: 100}); err != nil {
		t.Fatal(err)
	}

	out := filepath.Join(dir, "out.jsonl")
	j := openJournal(t, out+".journal")
	cctx, cancel := context.WithCancel(ctx)
	ca := &cancelAfter{cancel: cancel}
	ca.left.Store(500)
	cfg := rotate.Config{Source: side, From: old, To: nw, In: in, Out: out, Batch: 100, Workers: 8,
		Progress: ca}
	rep, err := rotate.Run(cctx, j, cfg)
	if err != nil || rep.Finished || !rep.Summary.Interrupted {
		t.Fatalf("interrupted run: finished %v interrupted %v err %v", rep.Finished, rep.Summary.Interrupted, err)
	}
	// Lose the end of the partial file, as after a power cut.
	p := out + ".partial"
	st, _ := os.Stat(p)
	os.Truncate(p, st.Size()*2/3)
	cfg.Progress = nil
	rep, err = rotate.Run(ctx, j, cfg)
	if err != nil || !rep.Finished || !rep.Resumed {
		t.Fatalf("resumed run: %+v %v", rep, err)
	}
	if rep.Redone == 0 {
		t.Error("no batch was redone after the partial file lost its end")
	}
	a, _ := os.ReadFile(ref)
	b, _ := os.ReadFile(out)
	if !bytes.Equal(a, b) {
		t.Fatal("the resumed output differs from an uninterrupted run's")
	}
}

// cancelAfter cancels the run after a number of records.
type cancelAfter struct {
	left   atomic.Int64
	cancel context.CancelFunc
}

func (c *cancelAfter) Start(int, int) {}
func (c *cancelAfter) Stop()          {}
func (c *cancelAfter) Finished(bool) {
	if c.left.Add(-1) == 0 {
		c.cancel()
	}
}

func TestMasterChecks(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	_, ss := testCluster(t, filepath.Join(dir, "c"), 1, 1)
	side := rotate.Side{Name: "c", Sessions: ss}
	_, old := master(t, ss[0], "old")
	in, out := tempPaths(t)
	os.WriteFile(in, nil, 0o600)
	_, err := rotate.Run(ctx, openJournal(t, out+".journal"), rotate.Config{Source: side, From: old, To: old, In: in, Out: out})
	if err == nil || !strings.Contains(err.Error(), "same key") {
		t.Fatalf("same master: %v", err)
	}
	lbl := "nothing"
	_, err = rotate.Run(ctx, openJournal(t, out+".journal2"), rotate.Config{Source: side, From: old, To: hsm.Filter{Label: &lbl}, In: in, Out: out})
	var me *rotate.MasterError
	if !errors.As(err, &me) || me.Role != rotate.NewMaster || me.Cluster != "c" {
		t.Fatalf("missing master: %v, want a MasterError about the new master of cluster c", err)
	}
}

// TestOnErrorSwitch resumes a run under another --on-error: a run stopped
// by a bad record goes on under skip without starting over, and a run that
// already rejected records under skip is not resumed under stop.
func TestOnErrorSwitch(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	_, ss := testCluster(t, filepath.Join(dir, "c"), 1, 2)
	side := rotate.Side{Name: "c", Sessions: ss}
	_, old := master(t, ss[0], "old")
	_, nw := master(t, ss[0], "new")
	in := filepath.Join(dir, "in.jsonl")
	generate(t, side, old, 400, rotate.AlgKWP, in)
	good, _ := os.ReadFile(in)
	lines := strings.SplitAfter(string(good), "\n")
	lines[250] = "{not json\n" // in the third batch of 100
	os.WriteFile(in, []byte(strings.Join(lines, "")), 0o600)

	out := filepath.Join(dir, "out.jsonl")
	j := openJournal(t, out+".journal")
	cfg := rotate.Config{Source: side, From: old, To: nw, In: in, Out: out, Batch: 100, Workers: 4}
	first, err := rotate.Run(ctx, j, cfg)
	var re *rotate.RecordError
	if !errorsAs(err, &re) || re.Line != 251 {
		t.Fatalf("stop: %v, want a record error at line 251", err)
	}
	cfg.OnError = rotate.Skip
	rep, err := rotate.Run(ctx, j, cfg)
	if err != nil || !rep.Finished || !rep.Resumed || rep.Run != first.Run || rep.Rejected != 1 || rep.Rotated != 399 {
		t.Fatalf("resumed under skip: %+v %v", rep, err)
	}

	// Interrupted after rejecting under skip, then resumed under stop.
	out2 := filepath.Join(dir, "out2.jsonl")
	j2 := openJournal(t, out2+".journal")
	cctx, cancel := context.WithCancel(ctx)
	ca := &cancelAfter{cancel: cancel}
	ca.left.Store(300)
	cfg2 := rotate.Config{Source: side, From: old, To: nw, In: in, Out: out2, Batch: 100, Workers: 1, OnError: rotate.Skip, Progress: ca}
	if rep, err := rotate.Run(cctx, j2, cfg2); err != nil || !rep.Summary.Interrupted {
		t.Fatalf("interrupted run: %+v %v", rep, err)
	}
	cfg2.OnError, cfg2.Progress = rotate.Stop, nil
	if _, err := rotate.Run(ctx, j2, cfg2); err == nil || !strings.Contains(err.Error(), "resume it under skip") {
		t.Fatalf("resumed under stop after rejects: %v", err)
	}
}
