package hsm

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestErrorCodesSurviveJSONAndWrapping(t *testing.T) {
	for _, sentinel := range []*Error{ErrNotFound, ErrExists, ErrPermission, ErrNotExtractable, ErrUnsupportedMechanism,
		ErrThrottled, ErrUnavailable, ErrQuorum, ErrInvalidInput, ErrIntegrity, ErrCapacity, ErrUnsupported} {
		e := Errorf(sentinel.Code, "wrap", 42, "something about key %d", 42)
		b, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		var back Error
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		wrapped := fmt.Errorf("migrating: %w", &back)
		if !errors.Is(wrapped, sentinel) || CodeOf(wrapped) != sentinel.Code {
			t.Errorf("%s did not survive JSON and wrapping: %v", sentinel.Code, wrapped)
		}
		if IsRetryable(wrapped) != (sentinel.Code == CodeThrottled || sentinel.Code == CodeUnavailable || sentinel.Code == CodeQuorum) {
			t.Errorf("%s: retryable = %v", sentinel.Code, IsRetryable(wrapped))
		}
	}
	if errors.Is(Errorf(CodeIntegrity, "masked-insert", 0, "other lineage"), ErrUnwrapFailed) {
		t.Error("an integrity error that is not an unwrap failure matched ErrUnwrapFailed")
	}
	q := QuorumError("wrap", 0x2a)
	if got := q.Error(); strings.Count(got, KeyRef(0x2a).String()) != 1 || !strings.Contains(got, "at least 2 HSMs") {
		t.Errorf("quorum error %q", got)
	}
}

func TestParseFilter(t *testing.T) {
	k := KeyInfo{Ref: 0x2a, Label: "payments", ID: Bytes{0x0a}, Class: ClassSecret, Type: TypeAES, Attrs: Attributes{Extractable: true}}
	tests := []struct {
		exprs   []string
		match   bool
		wantErr string
	}{
		{nil, true, ""},
		{[]string{"key-reference=0x000000000000002a"}, true, ""},
		{[]string{"key-reference=43"}, false, ""},
		{[]string{"attr.label=payments", "attr.id=0a", "attr.class=secret-key", "attr.key-type=aes"}, true, ""},
		{[]string{"attr.label=payments", "attr.extractable=false"}, false, ""},
		{[]string{"attr.extractable=true"}, true, ""},
		{[]string{"label=payments"}, false, "attr.NAME=VALUE"},
		{[]string{"attr.colour=red"}, false, "unknown attribute"},
		{[]string{"attr.id=zz"}, false, "hex"},
		{[]string{"attr.extractable=maybe"}, false, "boolean"},
		{[]string{"key-reference=0"}, false, "non-zero"},
	}
	for _, tt := range tests {
		f, err := ParseFilter(tt.exprs)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseFilter(%q) = %v, want error with %q", tt.exprs, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseFilter(%q): %v", tt.exprs, err)
			continue
		}
		if f.Match(k) != tt.match {
			t.Errorf("%q matches = %v, want %v", tt.exprs, !tt.match, tt.match)
		}
		if g, err := ParseFilter(strings.Fields(strings.ReplaceAll(f.String(), "(all keys)", ""))); err != nil || g.Match(k) != tt.match {
			t.Errorf("String() of %q does not parse back: %q, %v", tt.exprs, f.String(), err)
		}
	}
}

func TestSelectOneListsCandidates(t *testing.T) {
	keys := []KeyInfo{{Ref: 1, Label: "a"}, {Ref: 2, Label: "a"}, {Ref: 3, Label: "b"}}
	label := "a"
	_, err := SelectOne(keys, Filter{Label: &label})
	if err == nil || !strings.Contains(err.Error(), "matches 2 keys") || !strings.Contains(err.Error(), KeyRef(2).String()) {
		t.Fatalf("SelectOne = %v", err)
	}
	if k, err := SelectOne(keys, Filter{Ref: 3}); err != nil || k.Label != "b" {
		t.Fatalf("SelectOne by ref = %+v, %v", k, err)
	}
}

func TestCredentialsNeverPrintPassword(t *testing.T) {
	c, err := ParsePIN("alice:s3cret-pass\n")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{fmt.Sprint(c), fmt.Sprintf("%v %+v %#v %s", c, c, c, c)} {
		if strings.Contains(s, "s3cret") {
			t.Fatalf("password printed: %q", s)
		}
	}
	for _, bad := range []string{"alice", ":x", "alice:", ""} {
		if _, err := ParsePIN(bad); err == nil || strings.Contains(err.Error(), bad) && bad != "" {
			t.Errorf("ParsePIN(%q) = %v", bad, err)
		}
	}
}
