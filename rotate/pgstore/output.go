package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A rotation to a new table or column (Options.OutTable, OutColumn) leaves
// the table's own values as they are, for a cut-over that can be rolled
// back: the application moves to the new values once keymig datakeys
// verify has confirmed every row, and the old ones are dropped by hand.
//
// An output table has the documented layout, keyed by the same ids, plus
// a column source_sha256; output columns NAME are NAME (bytea),
// NAME_master_label, NAME_master_kcv, NAME_alg and NAME_source_sha256.
// source_sha256 is the SHA-256 of the value the row was rotated from: an
// output value counts only while the row still holds that value, so a
// row the application rewrites after it was rotated is rotated again by
// the final pass, never left pointing at a stale data key.
//
// Page, Get and Census read a view of both: a row whose output value
// counts is shown with it (under the new master), any other with its own
// value. Originals reads the table's own values alone.

// SourceDigestColumn is the output table's column of the SHA-256 of the
// value each row was rotated from.
const SourceDigestColumn = "source_sha256"

// from is the FROM clause: the table aliased s, joined to an output table
// aliased o.
func (s *Store) from() string {
	if s.out == nil || s.out.ident == nil {
		return s.table + " AS s"
	}
	return fmt.Sprintf("%s AS s LEFT JOIN %s AS o ON o.%s = s.%s", s.table, s.out.table, s.out.q.id, s.q.id)
}

// view is the expression of one data-key field (label, kcv, alg, ct) as
// Page shows it: the output value when it counts, else the table's own.
func (s *Store) view(field string) string {
	own := map[string]string{"label": s.q.label, "kcv": s.q.kcv, "alg": s.q.alg, "ct": s.q.ct}[field]
	if s.out == nil {
		return "s." + own
	}
	o := map[string]string{"label": s.out.q.label, "kcv": s.out.q.kcv, "alg": s.out.q.alg, "ct": s.out.q.ct}[field]
	alias := "o."
	if s.out.ident == nil {
		alias = "s."
	}
	return fmt.Sprintf("(CASE WHEN coalesce(%[1]s%[2]s = sha256(s.%[3]s), false) THEN %[1]s%[4]s ELSE s.%[5]s END)",
		alias, s.out.src, s.q.ct, o, own)
}

// Originals returns the table's own values, without the output: what a
// rotation to a new table or column reads from. It shares s's
// connections; close s, not it.
func (s *Store) Originals() *Store {
	c := *s
	c.out = nil
	c.name = strings.TrimSuffix(s.name, s.outSuffix())
	return &c
}

func (s *Store) outSuffix() string {
	if s.out == nil {
		return ""
	}
	return " → " + s.out.desc
}

// Table is the table's name as given (SCHEMA.TABLE or TABLE).
func (s *Store) Table() string { return s.opts.Table }

// Output names where the rotated values go ("" when in place).
func (s *Store) Output() string {
	if s.out == nil {
		return ""
	}
	return s.out.desc
}

// setupOutput checks the output table or columns, making them when
// Options.Prepare allows.
func (s *Store) setupOutput(ctx context.Context) error {
	switch {
	case s.opts.OutTable != "":
		return s.setupOutTable(ctx)
	case s.opts.OutColumn != "":
		return s.setupOutColumns(ctx)
	}
	return nil
}

func (s *Store) setupOutTable(ctx context.Context) error {
	schema, table, ok := strings.Cut(s.opts.OutTable, ".")
	ident := pgx.Identifier{schema}
	if ok {
		ident = pgx.Identifier{schema, table}
	}
	if ident.Sanitize() == s.table {
		return fmt.Errorf("%s: --out-table is the table itself; leave it out to rotate in place", s.name)
	}
	c := s.cols
	out := &output{desc: "output table " + s.opts.OutTable, ident: ident, table: ident.Sanitize(), names: c,
		q: s.q, src: pgx.Identifier{SourceDigestColumn}.Sanitize(), srcName: SourceDigestColumn}
	types, err := s.columnTypes(ctx, out.table)
	if err != nil {
		return err
	}
	if types == nil {
		if !s.opts.Prepare {
			return fmt.Errorf("%s: %w", out.desc, ErrNoOutput)
		}
		sql := fmt.Sprintf("CREATE TABLE IF NOT EXISTS %s (%s %s PRIMARY KEY, %s text NOT NULL, %s text NOT NULL, %s text NOT NULL, %s bytea NOT NULL, %s bytea NOT NULL)",
			out.table, s.q.id, s.idType, s.q.label, s.q.kcv, s.q.alg, s.q.ct, out.src)
		if _, err := s.pool.Exec(ctx, sql); err != nil {
			return fmt.Errorf("%s: creating the %s: %w", s.name, out.desc, err)
		}
		if types, err = s.columnTypes(ctx, out.table); err != nil {
			return err
		}
	}
	want := map[string]string{c.ID: s.idType, c.MasterLabel: "text", c.MasterKCV: "text", c.Alg: "text", c.WrappedKey: "bytea", SourceDigestColumn: "bytea"}
	if err := checkTypes(s.name, out.desc, types, want); err != nil {
		return err
	}
	pk, err := s.primaryKey(ctx, out.table)
	if err != nil {
		return err
	}
	if len(pk) != 1 || pk[0] != c.ID {
		return fmt.Errorf("%s: the %s needs a one-column primary key on %s (it has (%s)); drop it and let rotate make it", s.name, out.desc, c.ID, strings.Join(pk, ", "))
	}
	s.out = out
	s.name += s.outSuffix()
	return nil
}

func (s *Store) setupOutColumns(ctx context.Context) error {
	base := s.opts.OutColumn
	for _, own := range []string{s.cols.ID, s.cols.MasterLabel, s.cols.MasterKCV, s.cols.Alg, s.cols.WrappedKey} {
		if base == own {
			return fmt.Errorf("%s: --out-column %s is one of the table's data-key columns; name a new column", s.name, base)
		}
	}
	names := Columns{MasterLabel: base + "_master_label", MasterKCV: base + "_master_kcv", Alg: base + "_alg", WrappedKey: base}
	src := base + "_" + SourceDigestColumn
	q := func(n string) string { return pgx.Identifier{n}.Sanitize() }
	out := &output{desc: "output column " + base, names: names, srcName: src, src: q(src),
		q: quoted{label: q(names.MasterLabel), kcv: q(names.MasterKCV), alg: q(names.Alg), ct: q(names.WrappedKey)}}
	want := map[string]string{names.WrappedKey: "bytea", names.MasterLabel: "text", names.MasterKCV: "text", names.Alg: "text", src: "bytea"}
	types, err := s.columnTypes(ctx, s.table)
	if err != nil {
		return err
	}
	var missing []string
	for n := range want {
		if _, ok := types[n]; !ok {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		if !s.opts.Prepare {
			return fmt.Errorf("%s: %w", out.desc, ErrNoOutput)
		}
		sql := fmt.Sprintf("ALTER TABLE %s ADD COLUMN IF NOT EXISTS %s bytea, ADD COLUMN IF NOT EXISTS %s text, ADD COLUMN IF NOT EXISTS %s text, ADD COLUMN IF NOT EXISTS %s text, ADD COLUMN IF NOT EXISTS %s bytea",
			s.table, out.q.ct, out.q.label, out.q.kcv, out.q.alg, out.src)
		if _, err := s.pool.Exec(ctx, sql); err != nil {
			return fmt.Errorf("%s: adding the columns of the %s: %w", s.name, out.desc, err)
		}
		if types, err = s.columnTypes(ctx, s.table); err != nil {
			return err
		}
	}
	if err := checkTypes(s.name, out.desc, types, want); err != nil {
		return err
	}
	s.out = out
	s.name += s.outSuffix()
	return nil
}

// checkTypes refuses output columns that are missing or of another type.
func checkTypes(name, desc string, types, want map[string]string) error {
	for n, t := range want {
		got, ok := types[n]
		switch {
		case !ok:
			return fmt.Errorf("%s: the %s has no column %s", name, desc, n)
		case got != t:
			return fmt.Errorf("%s: the %s's column %s is %s, not %s", name, desc, n, got, t)
		}
	}
	return nil
}

// columnTypes returns the columns of the quoted table and their types;
// nil when there is no such table.
func (s *Store) columnTypes(ctx context.Context, table string) (map[string]string, error) {
	var oid *uint32
	if err := s.retry(ctx, func() error {
		return s.pool.QueryRow(ctx, "SELECT to_regclass($1)::oid", table).Scan(&oid)
	}); err != nil {
		return nil, fmt.Errorf("%s: %w", s.name, err)
	}
	if oid == nil {
		return nil, nil
	}
	types := map[string]string{}
	err := s.retry(ctx, func() error {
		rows, err := s.pool.Query(ctx, `SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
			WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped`, *oid)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var n, t string
			if err := rows.Scan(&n, &t); err != nil {
				return err
			}
			types[n] = t
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("%s: reading the columns of %s: %w", s.name, table, err)
	}
	return types, nil
}

// primaryKey returns the columns of the quoted table's primary key.
func (s *Store) primaryKey(ctx context.Context, table string) ([]string, error) {
	var pk []string
	err := s.retry(ctx, func() error {
		return s.pool.QueryRow(ctx, `SELECT coalesce(array_agg(a.attname ORDER BY k.ord), '{}')
		FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = to_regclass($1) AND i.indisprimary`, table).Scan(&pk)
	})
	if err != nil {
		return nil, fmt.Errorf("%s: reading the primary key of %s: %w", s.name, table, err)
	}
	return pk, nil
}

// isDuplicateTable reports PostgreSQL's "relation already exists".
func isDuplicateTable(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "42P07"
}
