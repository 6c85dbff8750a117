package pgstore

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseAddress(t *testing.T) {
	for _, tc := range []struct {
		in      string
		conn    string
		table   string
		filters []Filter
		out     string
		err     string
	}{
		{in: "postgres://app@db/prod?sslmode=require&table=app.dk", conn: "postgres://app@db/prod?sslmode=require", table: "app.dk"},
		{in: "postgres://app@db/prod?table=dk&filter=tenant=acme&filter=region=eu", conn: "postgres://app@db/prod", table: "dk",
			filters: []Filter{{"tenant", "acme"}, {"region", "eu"}}},
		{in: "postgresql://db/prod?table=dk&out-table=dk_v2", conn: "postgresql://db/prod", table: "dk", out: "dk_v2"},
		{in: "postgres://db/prod", conn: "postgres://db/prod"},
		{in: "postgres://db/prod?table=a&table=b", err: "table is given 2 times"},
		{in: "postgres://db/prod?table=a&filter=nocolumn", err: "want COLUMN=VALUE"},
		{in: "postgres://u:pw@db/prod?table=a&filter=x", err: "xxxxx"},
		{in: "/tmp/file.jsonl", err: "not a PostgreSQL address"},
	} {
		conn, o, err := ParseAddress(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || strings.Contains(err.Error(), ":pw@") {
				t.Errorf("%s: %v, want %q (and no password)", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || conn != tc.conn || o.Table != tc.table || !reflect.DeepEqual(o.Filters, tc.filters) || o.OutTable != tc.out {
			t.Errorf("%s: %q %+v %v", tc.in, conn, o, err)
		}
	}
}

// FuzzAddress: an address parses or is refused, never panics; one that
// parses reads back the same from the address Address writes, which holds
// no password.
func FuzzAddress(f *testing.F) {
	f.Add("postgres://app:pw@db:5432/prod?sslmode=require&table=app.dk&filter=tenant=acme")
	f.Add("postgresql://db/prod?table=dk&out-column=v2&id-column=key")
	f.Fuzz(func(t *testing.T, s string) {
		conn, o, err := ParseAddress(s)
		if err != nil {
			return
		}
		a := Address(conn, o)
		if HasPassword(a) {
			t.Fatalf("Address(%q) = %q holds a password", s, a)
		}
		conn2, o2, err := ParseAddress(a)
		if err != nil {
			t.Fatalf("Address(%q) = %q does not parse: %v", s, a, err)
		}
		if !reflect.DeepEqual(o, o2) {
			t.Fatalf("%q → %q: %+v, then %+v", s, a, o, o2)
		}
		_ = conn2
	})
}
