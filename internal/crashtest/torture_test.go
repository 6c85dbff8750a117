package crashtest

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestTorture kills migrate, rotate and synckey with SIGKILL at random
// moments, many times, resuming each job after every kill and checking it
// as the failpoint tests do whenever it finishes. It runs only under make
// torture (KEYMIG_TORTURE=1), since it bets on the clock by design: the
// kill times come from a seeded generator, printed at the start, and
// KEYMIG_TORTURE_SEED=N replays them (the moments, not what the process
// was doing then). KEYMIG_TORTURE_KILLS sets the kills per job (default 70).
func TestTorture(t *testing.T) {
	if os.Getenv("KEYMIG_TORTURE") != "1" {
		t.Skip("randomised kills by timer run only under make torture (KEYMIG_TORTURE=1)")
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("KEYMIG_TORTURE_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("KEYMIG_TORTURE_SEED %q: want a number", s)
		}
		seed = v
	}
	fmt.Printf("torture: seed %d (replay with KEYMIG_TORTURE_SEED=%d)\n", seed, seed)
	kills := envInt("KEYMIG_TORTURE_KILLS", 70)
	jobs := []struct {
		name string
		// fixture makes the job's starting state once and returns how
		// to make a fresh job from it.
		fixture func(t *testing.T) func() killCase
	}{
		{"migrate", func(t *testing.T) func() killCase {
			f := newMigrateFixture(t, envInt("KEYMIG_TORTURE_KEYS", 2000))
			return func() killCase { return f.migration(t, "session-kek") }
		}},
		{"rotate", func(t *testing.T) func() killCase {
			f := newRotateFixture(t, envInt("KEYMIG_TORTURE_RECORDS", 50_000))
			return func() killCase { return f.rotation(t) }
		}},
		{"synckey", func(t *testing.T) func() killCase {
			f := newSyncFixture(t, envInt("KEYMIG_TORTURE_KEYS", 2000))
			return func() killCase { return f.sync(t) }
		}},
		// An in-place rotation of a PostgreSQL table (skipped, or failed
		// under KEYMIG_REQUIRE_POSTGRES=1, without PostgreSQL).
		{"rotate-table", func(t *testing.T) func() killCase {
			f := newTableFixture(t, envInt("KEYMIG_TORTURE_ROWS", 20_000))
			return func() killCase { return f.rotation(t) }
		}},
	}
	for i, job := range jobs {
		t.Run(job.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			fresh := job.fixture(t)
			// One uninterrupted job gives the span kill times are drawn from.
			c := fresh()
			start := time.Now()
			if r := c.run(""); r.code != 0 {
				t.Fatalf("uninterrupted run: %s", r)
			}
			span := time.Since(start)
			c.finish()
			c, jobs, landed := fresh(), 1, 0
			for landed < kills {
				r := runKilledAfter(t, c.command(), time.Duration(rng.Int64N(int64(span))))
				switch {
				case r.killed:
					landed++
				case r.code == 0: // the job finished first: check it, start another
					c.finish()
					c, jobs = fresh(), jobs+1
				default:
					t.Fatalf("a run failed on its own: %s", r)
				}
			}
			c.finish()
			t.Logf("%s: %d kills landed over %d jobs (an uninterrupted job takes %s)", job.name, landed, jobs, span.Round(time.Millisecond))
			fmt.Printf("torture: %s: %d kills over %d jobs, nothing lost or duplicated\n", job.name, landed, jobs)
		})
	}
}

// runKilledAfter runs keymig with args and kills it with SIGKILL after d
// unless it ends first.
func runKilledAfter(t *testing.T, args []string, d time.Duration) result {
	t.Helper()
	cmd := exec.Command(keymigBin, args...)
	cmd.Env = keymigEnv("")
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(d, func() { cmd.Process.Signal(syscall.SIGKILL) })
	err := cmd.Wait()
	timer.Stop()
	return ended(args, out.String(), err, t)
}
