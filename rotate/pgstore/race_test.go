//go:build race

package pgstore_test

// rows is the round trip's table size: the race detector slows the HSM
// work about tenfold.
const rows = 3000
