package node

import (
	"bytes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/wrap"
)

// Masked object format, version 1. Every length is checked against the
// bytes that remain, and every field against a maximum:
//
//	header   = "KMMO" | version u8 (=1) | lineage-len u16 | lineage
//	blob     = header | nonce (12) | AES-256-GCM(masking key, payload, AAD = header)
//	payload  = handle u64 | class s8 | type s8 | bits u32 | curve s8 | label s16 |
//	           id b16 | attrs u32 (bit i = hsm.AllAttrs[i]) | kcv b8 | owner s8 |
//	           shares u16 × s8 | material b32
//
// where s8/b8 are a u8 length then bytes, s16/b16 a u16 length, b32 a u32
// length; integers are big-endian.
const (
	maskedMagic   = "KMMO"
	maskedVersion = 1
	maxMaterial   = 16 << 10
	maxShares     = 1024
)

// maskedKey is the decoded content of a masked object.
type maskedKey struct {
	info     hsm.KeyInfo
	material []byte
}

// errLineage is the message of a masked object from another lineage.
const errLineageMsg = "masked object is from another cluster lineage (%q, this hsm is %q); only clones share a masking key"

func maskedHeader(lineage string) []byte {
	h := make([]byte, 0, 7+len(lineage))
	h = append(h, maskedMagic...)
	h = append(h, maskedVersion)
	h = binary.BigEndian.AppendUint16(h, uint16(len(lineage)))
	return append(h, lineage...)
}

// parseMaskedHeader splits a blob into its lineage, header (the AAD) and
// sealed body.
func parseMaskedHeader(blob []byte) (lineage string, header, body []byte, err error) {
	if len(blob) < 7 || string(blob[:4]) != maskedMagic {
		return "", nil, nil, errors.New("not a keymig masked object (bad magic)")
	}
	if blob[4] != maskedVersion {
		return "", nil, nil, fmt.Errorf("masked object version %d is not supported (want %d); upgrade keymig", blob[4], maskedVersion)
	}
	l := int(binary.BigEndian.Uint16(blob[5:7]))
	if len(blob) < 7+l {
		return "", nil, nil, errors.New("masked object is truncated in its header")
	}
	return string(blob[7 : 7+l]), blob[:7+l], blob[7+l:], nil
}

// encodeMaskedPayload serialises a key for masking.
func encodeMaskedPayload(info hsm.KeyInfo, material []byte) []byte {
	var b []byte
	s8 := func(s []byte) { b = append(b, byte(len(s))); b = append(b, s...) }
	b = binary.BigEndian.AppendUint64(b, uint64(info.Ref))
	s8([]byte(info.Class))
	s8([]byte(info.Type))
	b = binary.BigEndian.AppendUint32(b, uint32(info.Bits))
	s8([]byte(info.Curve))
	b = binary.BigEndian.AppendUint16(b, uint16(len(info.Label)))
	b = append(b, info.Label...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(info.ID)))
	b = append(b, info.ID...)
	var mask uint32
	for i, a := range hsm.AllAttrs {
		if v, _ := info.Attrs.Get(a); v {
			mask |= 1 << i
		}
	}
	b = binary.BigEndian.AppendUint32(b, mask)
	s8(info.KCV)
	s8([]byte(info.Owner))
	b = binary.BigEndian.AppendUint16(b, uint16(len(info.SharedWith)))
	for _, u := range info.SharedWith {
		s8([]byte(u))
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(material)))
	return append(b, material...)
}

// reader reads length-prefixed fields; the first failure sticks.
type reader struct {
	b   []byte
	err error
}

func (r *reader) take(n int, what string) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = fmt.Errorf("masked object is truncated in %s", what)
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8(what string) int {
	v := r.take(1, what)
	if v == nil {
		return 0
	}
	return int(v[0])
}
func (r *reader) u16(what string) int {
	v := r.take(2, what)
	if v == nil {
		return 0
	}
	return int(binary.BigEndian.Uint16(v))
}
func (r *reader) u32(what string) uint32 {
	v := r.take(4, what)
	if v == nil {
		return 0
	}
	return binary.BigEndian.Uint32(v)
}
func (r *reader) u64(what string) uint64 {
	v := r.take(8, what)
	if v == nil {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}
func (r *reader) s8(what string) string  { return string(r.take(r.u8(what), what)) }
func (r *reader) s16(what string) string { return string(r.take(r.u16(what), what)) }

// decodeMaskedPayload parses a decrypted payload defensively.
func decodeMaskedPayload(b []byte) (maskedKey, error) {
	r := &reader{b: b}
	var info hsm.KeyInfo
	info.Ref = hsm.KeyRef(r.u64("the handle"))
	info.Class = hsm.Class(r.s8("the class"))
	info.Type = hsm.KeyType(r.s8("the key type"))
	info.Bits = int(r.u32("the size"))
	info.Curve = r.s8("the curve")
	info.Label = r.s16("the label")
	if id := r.take(r.u16("the id"), "the id"); len(id) > 0 {
		info.ID = bytes.Clone(id)
	}
	mask := r.u32("the attributes")
	info.KCV = bytes.Clone(r.take(r.u8("the check value"), "the check value"))
	info.Owner = r.s8("the owner")
	n := r.u16("the shares")
	if n > maxShares {
		return maskedKey{}, fmt.Errorf("masked object lists %d shares, more than %d", n, maxShares)
	}
	info.SharedWith = make([]string, 0, n)
	for i := 0; i < n && r.err == nil; i++ {
		info.SharedWith = append(info.SharedWith, r.s8("the shares"))
	}
	ml := r.u32("the material")
	if ml > maxMaterial {
		return maskedKey{}, fmt.Errorf("masked object holds %d bytes of key material, more than %d", ml, maxMaterial)
	}
	mat := bytes.Clone(r.take(int(ml), "the material"))
	if r.err != nil {
		return maskedKey{}, r.err
	}
	if len(r.b) != 0 {
		return maskedKey{}, fmt.Errorf("masked object has %d trailing bytes", len(r.b))
	}
	if mask>>len(hsm.AllAttrs) != 0 {
		return maskedKey{}, fmt.Errorf("masked object sets unknown attribute bits %#x", mask)
	}
	for i, a := range hsm.AllAttrs {
		info.Attrs.Set(a, mask&(1<<i) != 0)
	}
	if info.Ref == 0 {
		return maskedKey{}, errors.New("masked object has handle 0")
	}
	switch info.Class {
	case hsm.ClassSecret, hsm.ClassPrivate, hsm.ClassPublic:
	default:
		return maskedKey{}, fmt.Errorf("masked object has unknown class %q", info.Class)
	}
	switch info.Type {
	case hsm.TypeAES, hsm.TypeRSA, hsm.TypeEC:
	default:
		return maskedKey{}, fmt.Errorf("masked object has unsupported key type %q", info.Type)
	}
	if info.Owner == "" || len(info.KCV) != 3 || len(mat) == 0 {
		return maskedKey{}, errors.New("masked object lacks an owner, a check value or key material")
	}
	return maskedKey{info: info, material: mat}, nil
}

// mask seals a key for other HSMs of the lineage.
func (n *Node) mask(info hsm.KeyInfo, material []byte) []byte {
	header := maskedHeader(n.opt.Lineage)
	pt := encodeMaskedPayload(info, material)
	defer clear(pt)
	return sealWith(n.masking, header, pt)
}

func sealWith(a cipher.AEAD, header, pt []byte) []byte {
	out := make([]byte, len(header)+a.NonceSize(), len(header)+a.NonceSize()+len(pt)+a.Overhead())
	copy(out, header)
	rand.Read(out[len(header):])
	return a.Seal(out, out[len(header):], pt, header)
}

// unmask opens and checks a masked object: lineage, integrity, format, and
// that the material matches its class, type and check value.
func (n *Node) unmask(op string, blob []byte) (maskedKey, error) {
	lineage, header, body, err := parseMaskedHeader(blob)
	if err != nil {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, "%v", err)
	}
	if lineage != n.opt.Lineage {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, errLineageMsg, lineage, n.opt.Lineage)
	}
	ns := n.masking.NonceSize()
	if len(body) < ns+n.masking.Overhead() {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, "masked object is truncated")
	}
	pt, err := n.masking.Open(nil, body[:ns], body[ns:], header)
	if err != nil {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, "masked object is corrupt or was altered (it does not authenticate under lineage %s's masking key)", lineage)
	}
	defer clear(pt)
	mk, err := decodeMaskedPayload(pt)
	if err != nil {
		return maskedKey{}, hsm.Errorf(hsm.CodeIntegrity, op, 0, "%v", err)
	}
	if err := n.checkMaterial(op, &mk); err != nil {
		return maskedKey{}, err
	}
	return mk, nil
}

// checkMaterial verifies that material fits its info and its KCV.
func (n *Node) checkMaterial(op string, mk *maskedKey) error {
	ref := mk.info.Ref
	m := &material{class: mk.info.Class, der: mk.material}
	if err := m.parse(); err != nil {
		return hsm.Errorf(hsm.CodeIntegrity, op, ref, "key %s in the masked object has unreadable material: %v", ref, err)
	}
	var kcv []byte
	var err error
	if mk.info.Class == hsm.ClassSecret {
		kcv, err = wrap.KCVSecret(mk.material)
	} else {
		kcv, err = wrap.KCVPublic(m.pub)
	}
	if err != nil || !bytes.Equal(kcv, mk.info.KCV) {
		return hsm.Errorf(hsm.CodeIntegrity, op, ref, "key %s in the masked object does not match its check value %x", ref, []byte(mk.info.KCV))
	}
	return nil
}
