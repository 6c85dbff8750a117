package crashtest

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/internal/failpoint"
	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/testcluster"
	"github.com/keymig/keymig/journal"
)

// keymigAs runs keymig with extra environment variables and wants exit 0.
func keymigAs(t *testing.T, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(keymigBin, args...)
	cmd.Env = append(keymigEnv(""), env...)
	out, err := cmd.CombinedOutput()
	r := ended(args, string(out), err, t)
	if r.code != 0 || r.killed {
		t.Fatalf("want exit 0: %s", r)
	}
	return r
}

// networkedTarget makes a networked cluster of n HSMs at dir with the
// crypto user alice, serves it once to pin the free ports it picks, and
// returns the HSM ids.
func networkedTarget(t *testing.T, dir string, n int) []string {
	t.Helper()
	ca := filepath.Join(filepath.Dir(dir), "ca")
	keymigAs(t, nil, "hsm", "ca", "create", "--dir", ca)
	officer := []string{"KEYMIG_PIN=" + testcluster.OfficerPIN, "KEYMIG_KDF_ITERATIONS=1000"}
	addrs := strings.TrimSuffix(strings.Repeat("127.0.0.1:0,", n), ",")
	keymigAs(t, officer, "hsm", "init", "--dir", dir, "--hsms", fmt.Sprint(n), "--addresses", addrs, "--customer-ca", ca, "--key-capacity", "20000")
	keymigAs(t, append(officer, "KEYMIG_NEW_PASSWORD="+testcluster.Password), "hsm", "user", "create", "--cluster", dir, "--username", testcluster.User, "--role", "crypto-user")
	ready := filepath.Join(filepath.Dir(dir), "ready-pin")
	d := startKeymig(t, "", "hsm", "serve", "--dir", dir, "--ready-file", ready)
	d.waitMarker(ready, n)
	d.signal(syscall.SIGTERM)
	if r := d.wait(); r.code != 0 {
		t.Fatalf("SIGTERM should drain and exit 0: %s", r)
	}
	b, err := os.ReadFile(filepath.Join(dir, "network.json"))
	if err != nil {
		t.Fatal(err)
	}
	var nc struct {
		Addresses map[string]string `json:"addresses"`
	}
	if err := json.Unmarshal(b, &nc); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for id, a := range nc.Addresses {
		if strings.HasSuffix(a, ":0") {
			t.Fatalf("HSM %s has no port recorded after it was served: %s", id, a)
		}
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// serveOne starts the daemon of one HSM and waits until it is ready.
func serveOne(t *testing.T, dir, id, failpoints, ready string) *running {
	t.Helper()
	os.Remove(ready)
	d := startKeymig(t, failpoints, "hsm", "serve", "--dir", dir, "--hsm", id, "--ready-file", ready, "--peer-check-every", "50ms")
	d.waitMarker(ready, 1)
	return d
}

// listKeys lists the keys alice sees through the client directory.
func listKeys(t *testing.T, app string) []hsm.KeyInfo {
	t.Helper()
	r := keymigAs(t, nil, "hsm", "key", "list", "--cluster", app, "--output", "json")
	var out struct {
		Keys []hsm.KeyInfo `json:"keys"`
	}
	if err := json.Unmarshal([]byte(r.out[strings.Index(r.out, "{"):]), &out); err != nil {
		t.Fatalf("key list --output json: %v\n%s", err, r.out)
	}
	return out.Keys
}

// checkNetworkedTarget checks every wanted key is on the target once, with
// its check value, on at least 2 HSMs, and nothing else is.
func checkNetworkedTarget(t *testing.T, app string, want map[string]hsm.Bytes) {
	t.Helper()
	got := map[string]int{}
	for _, k := range listKeys(t, app) {
		id := k.ID.String()
		if _, ok := want[id]; !ok {
			t.Errorf("unexpected key %s (%q, id %s) on the target", k.Ref, k.Label, id)
			continue
		}
		got[id]++
		if k.KCV.String() != want[id].String() {
			t.Errorf("key id %s: KCV %s, want %s", id, k.KCV, want[id])
		}
		if k.Coverage.Count() < 2 {
			t.Errorf("key id %s is on %d HSMs: %s", id, k.Coverage.Count(), k.Coverage)
		}
	}
	for id := range want {
		if got[id] != 1 {
			t.Errorf("key id %s is on the target %d times, want exactly once", id, got[id])
		}
	}
}

// TestMigrateTargetDaemonKilled migrates into a networked 3-HSM cluster
// and kills one of its daemons with SIGKILL at a failpoint in the middle
// (an HSM that committed a key whose answer never left), then restarts
// it: the migration finishes, every key is on the target once with its
// check value and on at least 2 HSMs, and the restarted HSM catches up by
// itself.
func TestMigrateTargetDaemonKilled(t *testing.T) {
	const keys = 40
	for _, n := range []int{3, 20} {
		t.Run(fmt.Sprintf("%s@%d", strings.ReplaceAll(string(failpoint.NodeAfterCommit), "/", "-"), n), func(t *testing.T) {
			t.Parallel()
			dir := keymigtest.TempDir(t)
			src, dst, app := filepath.Join(dir, "src"), filepath.Join(dir, "dst"), filepath.Join(dir, "app")
			testcluster.New(t, src, 2)
			want := testcluster.GenerateAES(t, src, "k", keys, nil)
			ids := networkedTarget(t, dst, 3)
			victim := serveOne(t, dst, ids[0], fmt.Sprintf("%s=kill@%d", failpoint.NodeAfterCommit, n), filepath.Join(dir, "ready0"))
			for i, id := range ids[1:] {
				serveOne(t, dst, id, "", filepath.Join(dir, fmt.Sprintf("ready%d", i+1)))
			}
			keymigAs(t, nil, "hsm", "client-config", "--cluster", dst, "--out", app)
			plan := filepath.Join(dir, "plan.json")
			must(t, 2, "plan", "--source", src, "--target", app, "--transport", "rsa-oaep", "--transport-bits", "2048", "--out", plan)
			mig := startKeymig(t, "", "migrate", "--plan", plan, "--workers", "4", "--no-progress")

			if r := victim.wait(); !r.killed {
				t.Fatalf("the target daemon was not killed at pass %d of %s: %s", n, failpoint.NodeAfterCommit, r)
			}
			serveOne(t, dst, ids[0], "", filepath.Join(dir, "ready0"))
			if r := mig.wait(); r.code != 0 {
				// A run may give up on keys while the HSM was away; the
				// same command again resumes.
				t.Logf("the migration during the kill: %s", r)
				must(t, 0, "migrate", "--plan", plan, "--workers", "4", "--no-progress")
			}

			checkNetworkedTarget(t, app, want)
			checkJournal(t, journal.DefaultPath(plan))

			// The restarted HSM catches up by itself: wait for its copies
			// (a marker the daemons make), the bound only a safety net.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			for {
				full := 0
				for _, k := range listKeys(t, app) {
					if k.Coverage.Count() == 3 {
						full++
					}
				}
				if full == keys {
					break
				}
				select {
				case <-ctx.Done():
					t.Fatalf("only %d of %d keys on all 3 HSMs: the restarted HSM did not catch up", full, keys)
				case <-time.After(100 * time.Millisecond): // polling for copies the daemons make
				}
			}
		})
	}
}

// TestTwoClientsMigrateIntoOneNetworkedCluster: two clients, each with its
// own client directory, migrate two different plans into one networked
// cluster at the same time; both finish and nothing is lost.
func TestTwoClientsMigrateIntoOneNetworkedCluster(t *testing.T) {
	t.Parallel()
	dir := keymigtest.TempDir(t)
	dst := filepath.Join(dir, "dst")
	ids := networkedTarget(t, dst, 2)
	d := startKeymig(t, "", "hsm", "serve", "--dir", dst, "--ready-file", filepath.Join(dir, "ready"))
	d.waitMarker(filepath.Join(dir, "ready"), len(ids))
	want := map[string]hsm.Bytes{}
	var plans []string
	for _, c := range []string{"a", "b"} {
		src, app := filepath.Join(dir, "src-"+c), filepath.Join(dir, "app-"+c)
		testcluster.New(t, src, 2)
		for id, kcv := range testcluster.GenerateAES(t, src, "k"+c, 30, nil) {
			want[id] = kcv
		}
		keymigAs(t, nil, "hsm", "client-config", "--cluster", dst, "--out", app)
		plan := filepath.Join(dir, "plan-"+c+".json")
		must(t, 2, "plan", "--source", src, "--target", app, "--transport", "session-kek", "--out", plan)
		plans = append(plans, plan)
	}
	var migs []*running
	for _, plan := range plans {
		migs = append(migs, startKeymig(t, "", "migrate", "--plan", plan, "--workers", "8", "--no-progress"))
	}
	for _, m := range migs {
		if r := m.wait(); r.code != 0 {
			t.Fatalf("a concurrent migration: %s", r)
		}
	}
	got := map[string]int{}
	for _, k := range listKeys(t, filepath.Join(dir, "app-a")) {
		id := k.ID.String()
		got[id]++
		if w, ok := want[id]; !ok || w.String() != k.KCV.String() || k.Coverage.Count() < 2 {
			t.Errorf("key %s (id %s, KCV %s, %s): not one of the migrated keys with its KCV on 2 HSMs", k.Ref, id, k.KCV, k.Coverage)
		}
	}
	for id := range want {
		if got[id] != 1 {
			t.Errorf("key id %s is on the target %d times, want once", id, got[id])
		}
	}
	for _, plan := range plans {
		checkJournal(t, journal.DefaultPath(plan))
	}
	d.signal(syscall.SIGTERM)
	if r := d.wait(); r.code != 0 {
		t.Errorf("serve after SIGTERM: %s", r)
	}
}

// TestTortureDaemons kills the daemons of a networked 3-HSM target with
// SIGKILL at random moments of a migration into it, one at a time,
// restarting each, and reruns the migration until it finishes; then every
// key is there once, with its KCV, on at least 2 HSMs. Under make torture
// only (KEYMIG_TORTURE=1): it bets on the clock by design, with a seeded
// generator (KEYMIG_TORTURE_SEED replays the kill times).
func TestTortureDaemons(t *testing.T) {
	if os.Getenv("KEYMIG_TORTURE") != "1" {
		t.Skip("randomised daemon kills run only under make torture (KEYMIG_TORTURE=1)")
	}
	seed := uint64(time.Now().UnixNano())
	if v, err := strconv.ParseUint(os.Getenv("KEYMIG_TORTURE_SEED"), 10, 64); err == nil {
		seed = v
	}
	fmt.Printf("torture daemons: seed %d (replay with KEYMIG_TORTURE_SEED=%d)\n", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 13))
	dir := keymigtest.TempDir(t)
	src, dst, app := filepath.Join(dir, "src"), filepath.Join(dir, "dst"), filepath.Join(dir, "app")
	testcluster.New(t, src, 2)
	want := testcluster.GenerateAES(t, src, "k", envInt("KEYMIG_TORTURE_KEYS", 1000), nil)
	ids := networkedTarget(t, dst, 3)
	daemons := make([]*running, len(ids))
	ready := func(i int) string { return filepath.Join(dir, fmt.Sprintf("ready%d", i)) }
	for i, id := range ids {
		daemons[i] = serveOne(t, dst, id, "", ready(i))
	}
	keymigAs(t, nil, "hsm", "client-config", "--cluster", dst, "--out", app)
	plan := filepath.Join(dir, "plan.json")
	must(t, 2, "plan", "--source", src, "--target", app, "--transport", "session-kek", "--out", plan)
	kills := envInt("KEYMIG_TORTURE_KILLS", 70) / 7
	for run, landed := 0, 0; ; run++ {
		mig := startKeymig(t, "", "migrate", "--plan", plan, "--workers", "16", "--no-progress")
		if landed < kills {
			time.Sleep(time.Duration(rng.Int64N(int64(2 * time.Second)))) // a random moment, by design
			i := rng.IntN(len(ids))
			daemons[i].signal(syscall.SIGKILL)
			daemons[i].wait()
			landed++
			daemons[i] = serveOne(t, dst, ids[i], "", ready(i))
		}
		r := mig.wait()
		if r.code == 0 && landed >= kills {
			t.Logf("%d daemon kills over %d migrate runs", landed, run+1)
			break
		}
		if run > 10*kills+10 {
			t.Fatalf("the migration never finished: %s", r)
		}
	}
	checkNetworkedTarget(t, app, want)
	checkJournal(t, journal.DefaultPath(plan))
}
