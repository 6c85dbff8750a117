package wrap

import (
	"crypto"
	_ "crypto/sha1" // register the hashes OAEP may use
	_ "crypto/sha256"
	_ "crypto/sha512"
	"fmt"
	"strings"
)

// hashNames lists the hashes ParseHash accepts, in the order error messages
// show them.
var hashNames = []struct {
	name string
	hash crypto.Hash
}{
	{"sha1", crypto.SHA1},
	{"sha224", crypto.SHA224},
	{"sha256", crypto.SHA256},
	{"sha384", crypto.SHA384},
	{"sha512", crypto.SHA512},
}

// ParseHash returns the hash named sha1, sha224, sha256, sha384 or sha512
// (case-insensitive), the names keymig's flags use.
func ParseHash(name string) (crypto.Hash, error) {
	for _, h := range hashNames {
		if strings.EqualFold(name, h.name) {
			return h.hash, nil
		}
	}
	return 0, fmt.Errorf("unknown hash %q: want sha1, sha224, sha256, sha384 or sha512", name)
}

// HashName returns the name ParseHash accepts for h, or a descriptive
// lower-case name for the hashes it does not.
func HashName(h crypto.Hash) string {
	for _, n := range hashNames {
		if n.hash == h {
			return n.name
		}
	}
	switch h {
	case 0:
		return "none"
	case crypto.SHA512_224:
		return "sha512-224"
	case crypto.SHA512_256:
		return "sha512-256"
	}
	return strings.ToLower(h.String())
}

// oaepHash reports whether h is a hash OAEP may use here: the SHA-1 and SHA-2
// family, linked into the binary.
func oaepHash(h crypto.Hash) bool {
	switch h {
	case crypto.SHA1, crypto.SHA224, crypto.SHA256, crypto.SHA384, crypto.SHA512,
		crypto.SHA512_224, crypto.SHA512_256:
		return h.Available()
	}
	return false
}
