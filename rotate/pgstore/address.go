package pgstore

import (
	"fmt"
	"net/url"
	"slices"
)

// A data-key table can be named by one string, where a command takes a
// table as a single value (plan --datakeys LABEL=ADDRESS): a PostgreSQL
// URL whose query also holds keymig's own parameters, which ParseAddress
// takes out before the URL reaches the database:
//
//	postgres://app@db.internal/prod?sslmode=verify-full&table=app.data_keys&filter=tenant=acme
//
// table names the table (required where no --table flag can); filter may repeat; id-column, master-label-column,
// master-kcv-column, alg-column and wrapped-key-column rename the columns;
// out-table and out-column are as the flags of the same names.

// addressParams are keymig's query parameters, in the order Address
// writes them.
var addressParams = []string{"table", "filter", "id-column", "master-label-column", "master-kcv-column", "alg-column", "wrapped-key-column", "out-table", "out-column"}

// ParseAddress splits an address into the URL to connect to and the
// table's options.
func ParseAddress(raw string) (connURL string, o Options, err error) {
	u, err := url.Parse(raw)
	if err != nil || !IsURL(raw) {
		return "", o, fmt.Errorf("%s: not a PostgreSQL address (want postgres://USER@HOST/DB?table=SCHEMA.TABLE)", Redact(raw))
	}
	q := u.Query()
	one := func(name string) (string, error) {
		if v := q[name]; len(v) > 1 {
			return "", fmt.Errorf("%s: %s is given %d times; give it once", Redact(raw), name, len(v))
		}
		return q.Get(name), nil
	}
	o.Columns = DefaultColumns
	for _, p := range []struct {
		name string
		dst  *string
	}{
		{"table", &o.Table}, {"id-column", &o.Columns.ID}, {"master-label-column", &o.Columns.MasterLabel},
		{"master-kcv-column", &o.Columns.MasterKCV}, {"alg-column", &o.Columns.Alg}, {"wrapped-key-column", &o.Columns.WrappedKey},
		{"out-table", &o.OutTable}, {"out-column", &o.OutColumn},
	} {
		v, err := one(p.name)
		if err != nil {
			return "", o, err
		}
		if v != "" {
			*p.dst = v
		}
	}
	for _, f := range q["filter"] {
		pf, err := ParseFilter(f)
		if err != nil {
			return "", o, fmt.Errorf("%s: filter %w", Redact(raw), err)
		}
		o.Filters = append(o.Filters, pf)
	}
	for _, p := range addressParams {
		q.Del(p)
	}
	u.RawQuery = q.Encode()
	return u.String(), o, nil
}

// Address writes connURL and o as one address, without a password: what
// a plan file records.
func Address(connURL string, o Options) string {
	u, err := url.Parse(connURL)
	if err != nil {
		return Redact(connURL)
	}
	if u.User != nil {
		u.User = url.User(u.User.Username())
	}
	q := u.Query()
	q.Del("password")
	set := func(name, v, def string) {
		if v != "" && v != def {
			q.Set(name, v)
		}
	}
	set("table", o.Table, "")
	d := DefaultColumns
	set("id-column", o.Columns.ID, d.ID)
	set("master-label-column", o.Columns.MasterLabel, d.MasterLabel)
	set("master-kcv-column", o.Columns.MasterKCV, d.MasterKCV)
	set("alg-column", o.Columns.Alg, d.Alg)
	set("wrapped-key-column", o.Columns.WrappedKey, d.WrappedKey)
	set("out-table", o.OutTable, "")
	set("out-column", o.OutColumn, "")
	for _, f := range o.Filters {
		q.Add("filter", f.Column+"="+f.Value)
	}
	u.RawQuery = encodeOrdered(q)
	if u.Host == "" && u.Path == "" {
		u.Path = "/" // else String drops the "//" and the scheme's form
	}
	return u.String()
}

// HasPassword reports whether the URL carries a password (in its user
// part or its query).
func HasPassword(raw string) bool {
	u, err := url.Parse(raw)
	if err != nil {
		return false
	}
	_, has := u.User.Password()
	return has || u.Query().Has("password")
}

// encodeOrdered encodes q with the connection's parameters first, then
// keymig's in a fixed order, so an address reads the same every time.
func encodeOrdered(q url.Values) string {
	own := url.Values{}
	for k, v := range q {
		if !slices.Contains(addressParams, k) {
			own[k] = v
		}
	}
	s := own.Encode()
	for _, p := range addressParams {
		for _, v := range q[p] {
			if s != "" {
				s += "&"
			}
			s += url.QueryEscape(p) + "=" + url.QueryEscape(v)
		}
	}
	return s
}
