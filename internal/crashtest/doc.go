// Package crashtest kills the real keymig binary at its named failpoints
// (internal/failpoint) in the middle of migrate, rotate and synckey jobs,
// resumes each job, and then checks that nothing was lost or duplicated:
// every key on the target exactly once with its check value and on at
// least two HSMs, the journal clean, no session or transport object left,
// a rotation's output byte for byte that of an uninterrupted run.
//
// TestMain builds the binary once, without the race detector: the code the
// killed processes run is race-checked by the in-process tests. Kills
// happen at chosen passes through each point: early, in the middle and
// late in the job, from a count of the passes an uninterrupted run of the
// same job makes. No test here waits on the
// clock. The randomised SIGKILL-by-timer tests run only under make torture
// (KEYMIG_TORTURE=1), seeded; KEYMIG_TORTURE_SEED replays a seed's kill
// times.
//
// The package has only tests.
package crashtest
