package runner

import (
	"os"
	"runtime"
)

// MinProcsForStorage is the GOMAXPROCS a job that waits on HSM storage
// runs with at least.
const MinProcsForStorage = 4

// ProcsForStorage raises GOMAXPROCS to at least MinProcsForStorage for a
// job whose time goes to the embedded HSMs' and the journal's fsyncs, and
// returns a function that puts it back. A goroutine blocked in fdatasync
// holds its P until the runtime's monitor takes it back, which can take
// milliseconds; on a 2-core machine that leaves the job's other goroutines
// one P or none. Measured on 2 cores (migrate bench, rsa-aes-2048): 655
// keys/s with 2 Ps, about 1,000 with 4. CPU-bound jobs (rotate) lose a
// little from it and do not call it. GOMAXPROCS in the environment wins.
func ProcsForStorage() (restore func()) {
	if os.Getenv("GOMAXPROCS") != "" {
		return func() {}
	}
	prev := runtime.GOMAXPROCS(0)
	if prev >= MinProcsForStorage {
		return func() {}
	}
	runtime.GOMAXPROCS(MinProcsForStorage)
	return func() { runtime.GOMAXPROCS(prev) }
}
