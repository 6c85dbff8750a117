//go:build race

package crashtest

// raceEnabled says the tests run under the race detector; the binary
// they kill is built with it too.
const raceEnabled = true
