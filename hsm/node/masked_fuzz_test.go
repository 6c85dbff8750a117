package node

import (
	"bytes"
	"testing"

	"github.com/keymig/keymig/hsm"
)

// FuzzMaskedParsers feeds arbitrary bytes to both layers of the masked
// object format: the clear header (untrusted: it arrives from another
// cluster) and the payload decoder (reached only after authentication, but
// parsed defensively all the same). Neither may panic, and a payload that
// decodes must encode back to the same bytes.
func FuzzMaskedParsers(f *testing.F) {
	info := hsm.KeyInfo{Ref: 0x2a, Label: "payments", ID: hsm.Bytes{1, 2}, Class: hsm.ClassSecret, Type: hsm.TypeAES, Bits: 256,
		KCV: hsm.Bytes{1, 2, 3}, Owner: "alice", SharedWith: []string{"bob"}, Attrs: hsm.Attributes{Token: true, Extractable: true}}
	payload := encodeMaskedPayload(info, bytes.Repeat([]byte{7}, 32))
	f.Add(append(maskedHeader("lineage-1"), payload...))
	f.Add(payload)
	f.Add([]byte("KMMO"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		if lineage, header, body, err := parseMaskedHeader(b); err == nil {
			if len(header)+len(body) != len(b) || !bytes.Equal(maskedHeader(lineage), header) {
				t.Fatalf("header %q and body do not recompose the blob", header)
			}
		}
		mk, err := decodeMaskedPayload(b)
		if err != nil {
			return
		}
		if again := encodeMaskedPayload(mk.info, mk.material); !bytes.Equal(again, b) {
			t.Fatalf("decoded payload encodes to other bytes")
		}
	})
}
