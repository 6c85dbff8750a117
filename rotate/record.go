package rotate

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// The data-key algorithms of a record's "alg" field.
const (
	AlgKWP = "aes-kwp" // RFC 5649 key wrap with padding under the master
	AlgGCM = "aes-gcm" // the HSM's AES-GCM wrap: IV ‖ ciphertext ‖ tag
)

// MaxLine bounds a data-key line; a longer line is rejected without being
// held in memory.
const MaxLine = 64 << 10

// Master names the master key a record says it is wrapped under.
type Master struct {
	Label string `json:"label"`
	KCV   string `json:"kcv"`
}

// Record is one parsed line of a data-key file. Raw is the line as read
// (without its newline); the other fields point into it or are decoded
// from it. Everything but master, alg and ciphertext is kept verbatim.
type Record struct {
	Raw        []byte
	ID         string // the id as text, for messages ("" if absent)
	Master     Master
	Alg        string
	Ciphertext []byte
	// spans are the byte ranges of the values of master, alg and
	// ciphertext in Raw, in the order they appear in the line.
	spans [3]span
}

// span is a value's byte range in a line, and the field it belongs to.
type span struct {
	field      int // fieldMaster, fieldAlg or fieldCiphertext
	start, end int
}

const (
	fieldMaster = iota
	fieldAlg
	fieldCiphertext
)

var fieldNames = [3]string{"master", "alg", "ciphertext"}

// ParseRecord parses one data-key line. The error says what is wrong in
// words a person can act on; the caller adds the line number.
func ParseRecord(line []byte) (Record, error) {
	r := Record{Raw: line}
	if len(line) > MaxLine {
		return r, fmt.Errorf("the line is %d bytes, longer than the %d-byte limit of a data-key record", len(line), MaxLine)
	}
	if !json.Valid(line) {
		return r, errors.New("not valid JSON (a truncated or damaged line?)")
	}
	p := parser{b: line}
	p.space()
	if !p.eat('{') {
		return r, errors.New("not a JSON object: each line must be one {\"id\":..., \"master\":..., \"alg\":..., \"ciphertext\":...} record")
	}
	var seen [3]bool
	n := 0
	p.space()
	if !p.eat('}') {
		for {
			p.space()
			kStart := p.i
			p.skipString()
			key, err := jsonString(line[kStart:p.i])
			if err != nil {
				return r, err
			}
			p.space()
			p.eat(':')
			p.space()
			vStart := p.i
			p.skipValue()
			val := line[vStart:p.i]
			field := -1
			switch key {
			case "master":
				field = fieldMaster
			case "alg":
				field = fieldAlg
			case "ciphertext":
				field = fieldCiphertext
			case "id":
				if r.ID != "" {
					return r, errors.New(`the field "id" appears twice`)
				}
				r.ID = idText(val)
			}
			if field >= 0 {
				if seen[field] {
					return r, fmt.Errorf("the field %q appears twice", fieldNames[field])
				}
				seen[field] = true
				r.spans[n] = span{field: field, start: vStart, end: p.i}
				n++
			}
			p.space()
			if p.eat('}') {
				break
			}
			p.eat(',')
		}
	}
	for f, ok := range seen {
		if !ok {
			return r, fmt.Errorf("the field %q is missing", fieldNames[f])
		}
	}
	for _, s := range r.spans {
		val := line[s.start:s.end]
		switch s.field {
		case fieldMaster:
			m, err := parseMaster(val)
			if err != nil {
				return r, err
			}
			r.Master = m
		case fieldAlg:
			alg, err := jsonString(val)
			if err != nil {
				return r, errors.New(`"alg" must be a string: aes-kwp or aes-gcm`)
			}
			switch alg {
			case AlgKWP, AlgGCM:
				r.Alg = alg
			default:
				return r, fmt.Errorf("unknown alg %q: want aes-kwp or aes-gcm", truncate(alg, 40))
			}
		case fieldCiphertext:
			s, err := jsonString(val)
			if err != nil {
				return r, errors.New(`"ciphertext" must be a base64 string`)
			}
			ct, err := base64.StdEncoding.DecodeString(s)
			if err != nil {
				return r, fmt.Errorf("the ciphertext is not valid base64 (%v)", err)
			}
			r.Ciphertext = ct
		}
	}
	return r, checkLength(r.Alg, len(r.Ciphertext))
}

// checkLength refuses a ciphertext that cannot hold an AES key under alg,
// before any HSM is asked.
func checkLength(alg string, n int) error {
	switch alg {
	case AlgKWP:
		// An AES key of 16 to 32 bytes wraps to 24 to 40 bytes.
		if n < 24 || n > 40 || n%8 != 0 {
			return fmt.Errorf("an aes-kwp ciphertext of %d bytes cannot hold an AES key (want 24, 32 or 40 bytes)", n)
		}
	case AlgGCM:
		// 12-byte IV ‖ 16 to 32 bytes of key ‖ 16-byte tag.
		if n < 44 || n > 60 {
			return fmt.Errorf("an aes-gcm ciphertext of %d bytes cannot hold an AES key (want IV ‖ key ‖ tag, 44 to 60 bytes)", n)
		}
	}
	return nil
}

// parseMaster reads the master object. val is part of a line json.Valid
// accepted, so it is walked with the parser rather than unmarshalled: this
// runs for every record.
func parseMaster(val []byte) (Master, error) {
	errShape := errors.New(`"master" must be an object {"label": "...", "kcv": "..."}`)
	p := parser{b: val}
	if !p.eat('{') {
		return Master{}, errShape
	}
	var (
		m        Master
		haveKCV  bool
		kcvToken []byte
	)
	p.space()
	if !p.eat('}') {
		for {
			p.space()
			kStart := p.i
			p.skipString()
			key, err := jsonString(val[kStart:p.i])
			if err != nil {
				return Master{}, errShape
			}
			p.space()
			p.eat(':')
			p.space()
			vStart := p.i
			p.skipValue()
			switch key {
			case "label":
				if m.Label, err = jsonString(val[vStart:p.i]); err != nil {
					return Master{}, errors.New(`"master.label" must be a string`)
				}
			case "kcv":
				haveKCV, kcvToken = true, val[vStart:p.i]
			}
			p.space()
			if p.eat('}') {
				break
			}
			p.eat(',')
		}
	}
	if !haveKCV {
		return Master{}, errors.New(`"master.kcv" is missing: the master's check value is what identifies it`)
	}
	kcv, err := jsonString(kcvToken)
	if err != nil {
		return Master{}, errors.New(`"master.kcv" must be a hex string`)
	}
	m.KCV = strings.ToLower(strings.TrimPrefix(kcv, "0x"))
	if b, err := hex.DecodeString(m.KCV); err != nil || len(b) != 3 {
		return Master{}, fmt.Errorf("master kcv %q is not a 3-byte hex check value", truncate(m.KCV, 40))
	}
	return m, nil
}

// Rewrite appends to dst the record's line with master, alg and ciphertext
// replaced, and every other byte as it was. master is the new master's JSON
// object.
func (r *Record) Rewrite(dst []byte, master []byte, alg string, ciphertext []byte) []byte {
	at := 0
	for _, s := range r.spans {
		dst = append(dst, r.Raw[at:s.start]...)
		switch s.field {
		case fieldMaster:
			dst = append(dst, master...)
		case fieldAlg:
			dst = append(dst, '"')
			dst = append(dst, alg...)
			dst = append(dst, '"')
		case fieldCiphertext:
			dst = append(dst, '"')
			dst = base64.StdEncoding.AppendEncode(dst, ciphertext)
			dst = append(dst, '"')
		}
		at = s.end
	}
	return append(dst, r.Raw[at:]...)
}

// SameShape reports whether a and b differ at most in the values of
// master, alg and ciphertext: the same fields in the same order, and every
// other byte identical. It is how an output line is matched to its input.
func SameShape(a, b *Record) bool {
	at, bt := 0, 0
	for i := range a.spans {
		sa, sb := a.spans[i], b.spans[i]
		if sa.field != sb.field || !bytes.Equal(a.Raw[at:sa.start], b.Raw[bt:sb.start]) {
			return false
		}
		at, bt = sa.end, sb.end
	}
	return bytes.Equal(a.Raw[at:], b.Raw[bt:])
}

// MasterJSON is the "master" value written for a master key.
func MasterJSON(label string, kcv []byte) []byte {
	b, _ := json.Marshal(Master{Label: label, KCV: hex.EncodeToString(kcv)})
	return b
}

// jsonString decodes a JSON string token, taking the fast path when it
// has no escapes.
func jsonString(tok []byte) (string, error) {
	if len(tok) < 2 || tok[0] != '"' || tok[len(tok)-1] != '"' {
		return "", errors.New("not a JSON string")
	}
	inner := tok[1 : len(tok)-1]
	if bytes.IndexByte(inner, '\\') < 0 && utf8.Valid(inner) {
		return string(inner), nil
	}
	var s string
	if err := json.Unmarshal(tok, &s); err != nil {
		return "", err
	}
	return s, nil
}

// idText renders an id value for messages: a string as itself, anything
// else as its JSON.
func idText(val []byte) string {
	if s, err := jsonString(val); err == nil {
		return truncate(s, 64)
	}
	return truncate(string(val), 64)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// parser walks a line that json.Valid accepted, so it checks nothing.
type parser struct {
	b []byte
	i int
}

func (p *parser) space() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\r', '\n':
			p.i++
		default:
			return
		}
	}
}

func (p *parser) eat(c byte) bool {
	if p.i < len(p.b) && p.b[p.i] == c {
		p.i++
		return true
	}
	return false
}

// skipString moves past a string token starting at p.i.
func (p *parser) skipString() {
	p.i++ // opening quote
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case '\\':
			p.i += 2
		case '"':
			p.i++
			return
		default:
			p.i++
		}
	}
}

// skipValue moves past one value of any kind starting at p.i.
func (p *parser) skipValue() {
	if p.i >= len(p.b) {
		return
	}
	switch p.b[p.i] {
	case '"':
		p.skipString()
	case '{', '[':
		depth := 0
		for p.i < len(p.b) {
			switch p.b[p.i] {
			case '"':
				p.skipString()
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					p.i++
					return
				}
			}
			p.i++
		}
	default: // number, true, false, null
		for p.i < len(p.b) {
			switch p.b[p.i] {
			case ',', '}', ']', ' ', '\t', '\r', '\n':
				return
			}
			p.i++
		}
	}
}
