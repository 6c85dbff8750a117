package rotate_test

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/keymig/keymig/rotate"
)

const goodLine = `{"id": "dk-1", "table": {"name": "orders", "cols": [1, "a\"b"]}, "master": {"label": "old", "kcv": "A1B2C3"}, "alg": "aes-kwp", "ciphertext": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "n": 1.5e3, "ok": true}`

func TestParseRecord(t *testing.T) {
	r, err := rotate.ParseRecord([]byte(goodLine))
	if err != nil {
		t.Fatal(err)
	}
	if r.ID != "dk-1" || r.Master.Label != "old" || r.Master.KCV != "a1b2c3" || r.Alg != rotate.AlgKWP || len(r.Ciphertext) != 24 {
		t.Fatalf("parsed %+v", r)
	}
	// Only master, alg and ciphertext change; every other byte stays.
	got := r.Rewrite(nil, rotate.MasterJSON("new", []byte{1, 2, 3}), rotate.AlgGCM, []byte("x"))
	want := `{"id": "dk-1", "table": {"name": "orders", "cols": [1, "a\"b"]}, "master": {"label":"new","kcv":"010203"}, "alg": "aes-gcm", "ciphertext": "eA==", "n": 1.5e3, "ok": true}`
	if string(got) != want {
		t.Fatalf("rewrite:\n got %s\nwant %s", got, want)
	}
	r2, err := rotate.ParseRecord(got)
	if err == nil || !strings.Contains(err.Error(), "aes-gcm ciphertext of 1 bytes") {
		t.Fatalf("short gcm ciphertext: %v", err)
	}
	if !rotate.SameShape(&r, &r2) {
		t.Error("a rewritten line does not have the shape of its original")
	}
	other, _ := rotate.ParseRecord([]byte(strings.Replace(goodLine, "orders", "invoices", 1)))
	if rotate.SameShape(&r, &other) {
		t.Error("lines that differ outside the three values have the same shape")
	}
	// Escaped values are decoded: \/ in base64, \u escapes in alg.
	esc := strings.Replace(strings.Replace(goodLine, `"aes-kwp"`, `"aes\u002dkwp"`, 1), `AAAAAAAA"`, `AAAAAA\/A"`, 1)
	if r, err := rotate.ParseRecord([]byte(esc)); err != nil || r.Alg != rotate.AlgKWP {
		t.Fatalf("escaped values: %+v %v", r, err)
	}
}

func TestParseRecordErrors(t *testing.T) {
	for _, tt := range []struct{ line, want string }{
		{`{"id": "x", "master": {"label": "a", "kcv": "a1b2c3"}, "alg": "aes-kwp", "ciphertext": "AAAA`, "not valid JSON"},
		{`["a"]`, "not a JSON object"},
		{`"x"`, "not a JSON object"},
		{`{}`, `"master" is missing`},
		{`{"master": {"kcv": "a1b2c3"}, "alg": "aes-kwp"}`, `"ciphertext" is missing`},
		{`{"master": {"kcv": "a1b2c3"}, "alg": "aes-kwp", "ciphertext": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "alg": "aes-gcm"}`, `"alg" appears twice`},
		{`{"master": {"kcv": "a1b2c3"}, "alg": "des", "ciphertext": "AAAA"}`, `unknown alg "des"`},
		{`{"master": {"kcv": "a1b2c3"}, "alg": 5, "ciphertext": "AAAA"}`, `"alg" must be a string`},
		{`{"master": {"kcv": "a1b2c3"}, "alg": "aes-kwp", "ciphertext": "***"}`, "not valid base64"},
		{`{"master": {"kcv": "a1b2c3"}, "alg": "aes-kwp", "ciphertext": "AAAA"}`, "cannot hold an AES key"},
		{`{"master": "old", "alg": "aes-kwp", "ciphertext": "AAAA"}`, `"master" must be an object`},
		{`{"master": {"label": "old"}, "alg": "aes-kwp", "ciphertext": "AAAA"}`, `"master.kcv" is missing`},
		{`{"master": {"kcv": "zz"}, "alg": "aes-kwp", "ciphertext": "AAAA"}`, `not a 3-byte hex check value`},
		{`{"id": 1, "id": 2, "master": {"kcv": "a1b2c3"}}`, `"id" appears twice`},
		{strings.Repeat(" ", rotate.MaxLine+1), "limit"},
	} {
		_, err := rotate.ParseRecord([]byte(tt.line))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseRecord(%.60q) = %v, want an error containing %q", tt.line, err, tt.want)
		}
	}
}

// FuzzParseRecord checks that the parser of untrusted data-key lines never
// panics, and that what it accepts it can rewrite into a line it accepts
// again, with the same shape and the new values.
func FuzzParseRecord(f *testing.F) {
	f.Add([]byte(goodLine))
	f.Add([]byte(`{"id":"a","master":{"label":"m","kcv":"000000"},"alg":"aes-gcm","ciphertext":"` + strings.Repeat("A", 60) + `"}`))
	f.Add([]byte(`{"master":{"kcv":"a1b2c3"},"alg":"aes-kwp","ciphertext":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","x":[{"y":"\"}"}]}`))
	f.Add([]byte(`{"a":"\u00e9\ud83d\ude00","master":{"kcv":"a1b2c3","label":"\n"},"alg":"aes\u002dkwp","ciphertext":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{"master":`))
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := rotate.ParseRecord(line)
		if err != nil {
			return
		}
		// The hand-walked master agrees with encoding/json's reading.
		var top, master map[string]json.RawMessage
		var label, kcv string
		if json.Unmarshal(line, &top) != nil || json.Unmarshal(top["master"], &master) != nil || json.Unmarshal(master["kcv"], &kcv) != nil {
			t.Fatalf("accepted a line encoding/json cannot read the master of: %q", line)
		}
		if v, ok := master["label"]; ok && json.Unmarshal(v, &label) != nil {
			t.Fatalf("accepted a non-string label: %q", line)
		}
		if r.Master.Label != label || r.Master.KCV != strings.ToLower(strings.TrimPrefix(kcv, "0x")) {
			t.Fatalf("master %+v, encoding/json reads label %q kcv %q in %q", r.Master, label, kcv, line)
		}
		ct := bytes.Repeat([]byte{7}, 40)
		out := r.Rewrite(nil, rotate.MasterJSON("new\"label", []byte{1, 2, 3}), rotate.AlgKWP, ct)
		r2, err := rotate.ParseRecord(out)
		if err != nil {
			t.Fatalf("the rewrite of an accepted line is refused: %v\n in: %q\nout: %q", err, line, out)
		}
		if !rotate.SameShape(&r, &r2) {
			t.Fatalf("the rewrite changed the line's shape:\n in: %q\nout: %q", line, out)
		}
		if r2.Alg != rotate.AlgKWP || !bytes.Equal(r2.Ciphertext, ct) || r2.Master.Label != "new\"label" || r2.Master.KCV != "010203" || r2.ID != r.ID {
			t.Fatalf("the rewrite does not hold the new values: %+v", r2)
		}
	})
}
