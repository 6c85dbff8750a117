package keymigtest_test

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/keymig/keymig/internal/keymigtest"
	"github.com/keymig/keymig/internal/testcluster"
)

func TestFlip(t *testing.T) {
	ct := base64.StdEncoding.EncodeToString([]byte("AAAA-ciphertext"))
	line := `{"id":"dk-1","alg":"aes-kwp","ciphertext":"` + ct + `","x":"` + ct[:4] + `"}`
	tests := []struct {
		name, content, where string
		want                 string // "" for an error
	}{
		{"first byte", "abc", "0", "`bc"},
		{"last byte", "abc", "-1", "abb"},
		{"a byte that is 0x01 apart", "\x01", "0", "\x00"},
		{"outside", "abc", "3", ""},
		{"not a number", "abc", "x", ""},
		{"base64 field", line + "\n" + line + "\n", "2:ciphertext",
			line + "\n" + strings.Replace(line, ct, base64.StdEncoding.EncodeToString([]byte("@AAA-ciphertext")), 1) + "\n"},
		{"no such field", line, "1:nope", ""},
		{"no such line", line, "3:ciphertext", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "f")
			os.WriteFile(p, []byte(tt.content), 0o600)
			err := keymigtest.Flip(p, tt.where)
			got, _ := os.ReadFile(p)
			switch {
			case tt.want == "" && err == nil:
				t.Fatalf("Flip(%q) = nil, want an error", tt.where)
			case tt.want != "" && err != nil:
				t.Fatalf("Flip(%q): %v", tt.where, err)
			case tt.want != "" && string(got) != tt.want:
				t.Fatalf("Flip(%q) wrote %q, want %q", tt.where, got, tt.want)
			}
		})
	}
}

// TestCheckTreeFindsDamage: a clean cluster passes, an altered audit
// record and a journal that is not one are reported by file.
func TestCheckTreeFindsDamage(t *testing.T) {
	dir := t.TempDir()
	testcluster.New(t, filepath.Join(dir, "c"), 2)
	if errs := keymigtest.CheckTree(dir); len(errs) > 0 {
		t.Fatalf("a fresh cluster: %v", errs)
	}
	audits, _ := filepath.Glob(filepath.Join(dir, "c", "*.db.audit"))
	if len(audits) != 2 {
		t.Fatalf("audit logs: %v", audits)
	}
	b, _ := os.ReadFile(audits[0])
	i := strings.Index(string(b), `"op":"`) + len(`"op":"`)
	if err := keymigtest.Flip(audits[0], strconv.Itoa(i)); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "job.journal"), []byte("not a journal"), 0o600)
	errs := keymigtest.CheckTree(dir)
	var text []string
	for _, e := range errs {
		text = append(text, e.Error())
	}
	all := strings.Join(text, "\n")
	if len(errs) != 2 || !strings.Contains(all, filepath.Base(audits[0])) || !strings.Contains(all, "job.journal") {
		t.Fatalf("CheckTree after damage: %s", all)
	}
}
