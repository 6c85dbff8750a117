package wrap

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// testKeyBits are the RSA sizes the tests and benchmarks cover.
var testKeyBits = []int{2048, 3072, 4096}

// testKeys are fixed, test-only RSA keys (testdata/rsa*.pem, made with
// `openssl genpkey`): generating RSA-4096 under -race takes seconds, reading
// it takes microseconds.
var testKeys = struct {
	once sync.Once
	keys map[int]*rsa.PrivateKey
	err  error
}{}

// rsaKey returns the fixed test key of the given size.
func rsaKey(tb testing.TB, bits int) *rsa.PrivateKey {
	tb.Helper()
	testKeys.once.Do(func() {
		testKeys.keys = map[int]*rsa.PrivateKey{}
		for _, b := range testKeyBits {
			k, err := readTestKey(filepath.Join("testdata", fmt.Sprintf("rsa%d.pem", b)))
			if err != nil {
				testKeys.err = err
				return
			}
			testKeys.keys[b] = k
		}
	})
	if testKeys.err != nil {
		tb.Fatal(testKeys.err)
	}
	k, ok := testKeys.keys[bits]
	if !ok {
		tb.Fatalf("no RSA-%d test key", bits)
	}
	return k
}

func readTestKey(path string) (*rsa.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(data)
	if blk == nil {
		return nil, fmt.Errorf("%s: no PEM block", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: %T, want RSA", path, k)
	}
	return rk, nil
}

// unhex decodes hex written with optional spaces, as RFCs print it.
func unhex(tb testing.TB, s string) []byte {
	tb.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		tb.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

// seq returns n bytes 0, 1, 2, ... so failures show recognisable payloads.
func seq(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	return b
}

// wantUnwrapErr fails unless err is exactly the uniform unwrap error.
func wantUnwrapErr(tb testing.TB, what string, err error) {
	tb.Helper()
	if err == nil {
		tb.Fatalf("%s: unwrap succeeded, want ErrUnwrap", what)
	}
	if !errors.Is(err, ErrUnwrap) || err.Error() != ErrUnwrap.Error() {
		tb.Fatalf("%s: err = %q, want exactly %q", what, err, ErrUnwrap)
	}
}
