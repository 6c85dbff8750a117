//go:build !race

package pgstore_test

// rows is the round trip's table size.
const rows = 100_000
