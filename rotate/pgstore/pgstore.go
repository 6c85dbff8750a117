// Package pgstore keeps data keys in a PostgreSQL table, one per row, for
// rotate to rotate in place (rotate.Table) and to fill (rotate.TableFiller).
//
// The documented layout, whose column names the Columns flags can change:
//
//	CREATE TABLE app.data_keys (
//	    id           text  PRIMARY KEY,  -- any type with an order: text, bigint, uuid
//	    master_label text  NOT NULL,
//	    master_kcv   text  NOT NULL,     -- hex, as keymig prints check values
//	    alg          text  NOT NULL,     -- aes-kwp or aes-gcm
//	    wrapped_key  bytea NOT NULL
//	);
//
// Every statement is one round trip and no transaction spans two of them:
// rows are read by keyset pages on the primary key, written back by one
// conditional UPDATE per page. Identifiers are quoted, values are query
// parameters. The password comes from PGPASSWORD, PGPASSFILE or ~/.pgpass
// (as libpq reads them) and is never shown: String redacts it. A statement
// that fails for want of a connection is retried here, a few times; what
// the server refuses is not.
package pgstore

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/keymig/keymig/rotate"
)

// Columns names the data-key columns of a table.
type Columns struct {
	ID, MasterLabel, MasterKCV, Alg, WrappedKey string
}

// DefaultColumns is the documented layout.
var DefaultColumns = Columns{ID: "id", MasterLabel: "master_label", MasterKCV: "master_kcv", Alg: "alg", WrappedKey: "wrapped_key"}

// Filter restricts the rows to those whose Column, as text, is Value.
type Filter struct {
	Column, Value string
}

// ParseFilter reads COLUMN=VALUE.
func ParseFilter(s string) (Filter, error) {
	col, val, ok := strings.Cut(s, "=")
	if !ok || strings.TrimSpace(col) == "" {
		return Filter{}, fmt.Errorf("%q: want COLUMN=VALUE, e.g. tenant=acme", s)
	}
	return Filter{Column: strings.TrimSpace(col), Value: val}, nil
}

// Options say which table and rows.
type Options struct {
	// Table is "schema.table" or "table" (the search path's).
	Table   string
	Columns Columns
	Filters []Filter
	// MaxConns bounds the connections; default 4.
	MaxConns int32
	// OutTable or OutColumn, when set, receive the rotated values and the
	// table's own values stay as they are (see Output); at most one.
	OutTable, OutColumn string
	// Prepare lets Open make the output table or columns when they are
	// missing; without it a missing output is ErrNoOutput.
	Prepare bool
}

// ErrNoOutput is Open's error for an output table or columns that do not
// exist yet and Options.Prepare is not set.
var ErrNoOutput = errors.New("the output does not exist yet")

// IsURL reports whether s names a PostgreSQL database rather than a file.
func IsURL(s string) bool {
	return strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://")
}

// Redact returns the URL without its password, for messages.
func Redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "postgres://(unparsable URL)"
	}
	if _, has := u.User.Password(); has {
		u.User = url.UserPassword(u.User.Username(), "xxxxx")
	}
	q := u.Query()
	if q.Has("password") {
		q.Set("password", "xxxxx")
		u.RawQuery = q.Encode()
	}
	return u.String()
}

// Store is one data-key table.
type Store struct {
	pool   *pgxpool.Pool
	name   string // redacted URL and table, for messages
	ident  pgx.Identifier
	table  string // quoted
	cols   Columns
	q      quoted
	idType string   // the primary key's type, as format_type writes it
	fcols  []string // the filter columns, quoted
	fvals  []any
	out    *output // nil: rotated in place
	opts   Options
}

// quoted holds the quoted column names.
type quoted struct{ id, label, kcv, alg, ct string }

// output is where a rotation to a new table or column writes.
type output struct {
	desc  string         // for messages: "output table x" or "output column c"
	ident pgx.Identifier // the output table; nil for columns of the table itself
	table string         // quoted output table
	q     quoted         // its columns (id only for a table), quoted
	names Columns        // the same, unquoted
	src   string         // the quoted column of the source value's SHA-256
	// srcName is src unquoted.
	srcName string
}

// Open connects to the database at rawURL and checks that the table has
// the data-key columns and a one-column primary key on the id column.
func Open(ctx context.Context, rawURL string, o Options) (*Store, error) {
	s, err := connect(ctx, rawURL, o)
	if err != nil {
		return nil, err
	}
	if err := s.check(ctx); err != nil {
		s.Close()
		return nil, err
	}
	if err := s.setupOutput(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func connect(ctx context.Context, rawURL string, o Options) (*Store, error) {
	if o.Table == "" {
		return nil, errors.New("a PostgreSQL data-key store needs a table: --table SCHEMA.TABLE")
	}
	if o.Columns == (Columns{}) {
		o.Columns = DefaultColumns
	}
	if o.MaxConns <= 0 {
		o.MaxConns = 4
	}
	if o.OutTable != "" && o.OutColumn != "" {
		return nil, errors.New("--out-table and --out-column: give one")
	}
	name := Redact(rawURL) + " table " + o.Table
	cfg, err := pgxpool.ParseConfig(rawURL)
	if err != nil {
		// pgx's message can quote the URL: say only what kind of problem.
		return nil, fmt.Errorf("%s: not a usable PostgreSQL URL (want postgres://USER@HOST:PORT/DB?sslmode=...)", Redact(rawURL))
	}
	cfg.MaxConns = o.MaxConns
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", name, err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("%s: cannot connect: %v; check the URL, and the password in PGPASSWORD, PGPASSFILE or ~/.pgpass", Redact(rawURL), err)
	}
	schema, table, ok := strings.Cut(o.Table, ".")
	ident := pgx.Identifier{schema}
	if ok {
		ident = pgx.Identifier{schema, table}
	}
	c := o.Columns
	s := &Store{pool: pool, name: name, ident: ident, table: ident.Sanitize(), cols: c, opts: o, q: quoted{
		id: pgx.Identifier{c.ID}.Sanitize(), label: pgx.Identifier{c.MasterLabel}.Sanitize(),
		kcv: pgx.Identifier{c.MasterKCV}.Sanitize(), alg: pgx.Identifier{c.Alg}.Sanitize(),
		ct: pgx.Identifier{c.WrappedKey}.Sanitize(),
	}}
	for _, f := range o.Filters {
		s.fvals = append(s.fvals, f.Value)
		s.fcols = append(s.fcols, pgx.Identifier{f.Column}.Sanitize())
	}
	return s, nil
}

// filters returns the filter conditions, " AND ...", on the columns of
// the table aliased as prefix, with parameters numbered from base.
func (s *Store) filters(prefix string, base int) string {
	var b strings.Builder
	for i, c := range s.fcols {
		fmt.Fprintf(&b, " AND CAST(%s%s AS text) = $%d", prefix, c, base+i)
	}
	return b.String()
}

// Close releases the connections.
func (s *Store) Close() { s.pool.Close() }

// String names the database (without password) and the table.
func (s *Store) String() string { return s.name }

// check refuses a table without the columns or the primary key.
func (s *Store) check(ctx context.Context) error {
	types, err := s.columnTypes(ctx, s.table)
	if err != nil {
		return err
	}
	if types == nil {
		return fmt.Errorf("%s: no such table: create it (keymig datakeys generate --out URL --table NAME makes one) or check --table and the search path", s.name)
	}
	var missing []string
	for _, c := range []struct{ flag, name string }{
		{"--id-column", s.cols.ID}, {"--master-label-column", s.cols.MasterLabel}, {"--master-kcv-column", s.cols.MasterKCV},
		{"--alg-column", s.cols.Alg}, {"--wrapped-key-column", s.cols.WrappedKey},
	} {
		if _, ok := types[c.name]; !ok {
			missing = append(missing, fmt.Sprintf("%s (%s)", c.name, c.flag))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s has no column %s: name the table's columns with those flags", s.name, strings.Join(missing, ", "))
	}
	if t := types[s.cols.WrappedKey]; t != "bytea" {
		return fmt.Errorf("%s: the wrapped-key column %s is %s, not bytea", s.name, s.cols.WrappedKey, t)
	}
	pk, err := s.primaryKey(ctx, s.table)
	if err != nil {
		return err
	}
	switch {
	case len(pk) == 0:
		return fmt.Errorf("%s has no primary key: rotate reads and writes rows by it; add one on %s", s.name, s.cols.ID)
	case len(pk) > 1 || pk[0] != s.cols.ID:
		return fmt.Errorf("%s: its primary key is (%s), but rotate needs a one-column primary key on the id column %s (--id-column)", s.name, strings.Join(pk, ", "), s.cols.ID)
	}
	s.idType = types[s.cols.ID]
	return nil
}

// retry runs a statement again when it failed for want of a connection
// (never when the server answered with an error).
func (s *Store) retry(ctx context.Context, fn func() error) error {
	var err error
	for attempt := range 4 {
		if err = fn(); err == nil || !transient(err) || ctx.Err() != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(50<<attempt) * time.Millisecond):
		}
	}
	return err
}

// transient reports an error that is the connection's, not the server's
// answer.
func transient(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		// The server's own refusals are final; admin shutdown and
		// connection failures are worth another try.
		return strings.HasPrefix(pe.Code, "08") || pe.Code == "57P01" || pe.Code == "40001" || pe.Code == "40P01"
	}
	return !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
}

// selectCols is the row as rotate reads it, from the table aliased s
// (and the output aliased o).
func (s *Store) selectCols() string {
	return fmt.Sprintf("s.%s::text, %s::text, %s::text, %s::text, %s", s.q.id,
		s.view("label"), s.view("kcv"), s.view("alg"), s.view("ct"))
}

func (s *Store) scan(rows pgx.Rows) ([]rotate.TableRow, error) {
	defer rows.Close()
	var out []rotate.TableRow
	for rows.Next() {
		var key string
		var label, kcv, alg *string
		var ct []byte
		if err := rows.Scan(&key, &label, &kcv, &alg, &ct); err != nil {
			return nil, err
		}
		r := rotate.TableRow{Key: key, Ciphertext: ct}
		for _, c := range []struct {
			v    *string
			dst  *string
			name string
		}{{label, &r.Master.Label, s.cols.MasterLabel}, {kcv, &r.Master.KCV, s.cols.MasterKCV}, {alg, &r.Alg, s.cols.Alg}} {
			if c.v == nil {
				if r.Null == "" {
					r.Null = c.name
				}
				continue
			}
			*c.dst = *c.v
		}
		if ct == nil && r.Null == "" {
			r.Null = s.cols.WrappedKey
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func (s *Store) query(ctx context.Context, sql string, args ...any) ([]rotate.TableRow, error) {
	var out []rotate.TableRow
	err := s.retry(ctx, func() error {
		rows, err := s.pool.Query(ctx, sql, args...)
		if err != nil {
			return err
		}
		out, err = s.scan(rows)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.name, err)
	}
	return out, nil
}

// Page returns up to n rows after *after in key order (see rotate.Table).
func (s *Store) Page(ctx context.Context, after *string, n int, underKCV string) ([]rotate.TableRow, error) {
	args := []any{n}
	cond := "TRUE"
	if after != nil {
		args = append(args, *after)
		cond += fmt.Sprintf(" AND s.%s > CAST($%d::text AS %s)", s.q.id, len(args), s.idType)
	}
	if underKCV != "" {
		args = append(args, underKCV)
		cond += fmt.Sprintf(" AND %s = $%d", s.view("kcv"), len(args))
	}
	cond += s.filters("s.", len(args)+1)
	args = append(args, s.fvals...)
	sql := fmt.Sprintf("SELECT %s FROM %s WHERE %s ORDER BY s.%s LIMIT $1", s.selectCols(), s.from(), cond, s.q.id)
	return s.query(ctx, sql, args...)
}

// Get returns the rows with these keys that still exist.
func (s *Store) Get(ctx context.Context, keys []string) ([]rotate.TableRow, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	sql := fmt.Sprintf("SELECT %s FROM %s WHERE s.%s = ANY(CAST($1::text[] AS %s[]))", s.selectCols(), s.from(), s.q.id, s.idType)
	return s.query(ctx, sql, keys)
}

// Swap writes the rotated rows in one statement (see rotate.Table): in
// place, or to the output table or columns, keyed by the SHA-256 of the
// value each was rotated from.
func (s *Store) Swap(ctx context.Context, fromKCV string, to rotate.Master, swaps []rotate.Swap) ([]string, error) {
	keys := make([]string, len(swaps))
	olds := make([][]byte, len(swaps))
	cts := make([][]byte, len(swaps))
	algs := make([]string, len(swaps))
	for i, w := range swaps {
		keys[i], olds[i], cts[i], algs[i] = w.Key, w.OldCiphertext, w.Ciphertext, w.Alg
	}
	var sql string
	switch {
	case s.out == nil:
		sql = fmt.Sprintf(`UPDATE %[1]s AS s SET %[2]s = v.ct, %[3]s = $2, %[4]s = $3, %[5]s = v.alg
		FROM unnest($4::text[], $5::bytea[], $6::bytea[], $7::text[]) AS v(k, old, ct, alg)
		WHERE s.%[6]s = CAST(v.k AS %[7]s) AND s.%[3]s = $1 AND s.%[2]s = v.old%[8]s
		RETURNING s.%[6]s::text`,
			s.table, s.q.ct, s.q.kcv, s.q.label, s.q.alg, s.q.id, s.idType, s.filters("s.", 8))
	case s.out.ident == nil:
		o := s.out.q
		sql = fmt.Sprintf(`UPDATE %[1]s AS s SET %[2]s = v.ct, %[3]s = $2, %[4]s = $3, %[5]s = v.alg, %[6]s = sha256(v.old)
		FROM unnest($4::text[], $5::bytea[], $6::bytea[], $7::text[]) AS v(k, old, ct, alg)
		WHERE s.%[7]s = CAST(v.k AS %[8]s) AND s.%[9]s = $1 AND s.%[10]s = v.old
		AND s.%[6]s IS DISTINCT FROM sha256(v.old)%[11]s
		RETURNING s.%[7]s::text`,
			s.table, o.ct, o.kcv, o.label, o.alg, s.out.src, s.q.id, s.idType, s.q.kcv, s.q.ct, s.filters("s.", 8))
	default:
		o := s.out.q
		sql = fmt.Sprintf(`INSERT INTO %[1]s AS o (%[2]s, %[3]s, %[4]s, %[5]s, %[6]s, %[7]s)
		SELECT s.%[8]s, $3, $2, v.alg, v.ct, sha256(v.old)
		FROM unnest($4::text[], $5::bytea[], $6::bytea[], $7::text[]) AS v(k, old, ct, alg)
		JOIN %[9]s AS s ON s.%[8]s = CAST(v.k AS %[10]s) AND s.%[11]s = $1 AND s.%[12]s = v.old%[13]s
		ON CONFLICT (%[2]s) DO UPDATE SET %[3]s = excluded.%[3]s, %[4]s = excluded.%[4]s, %[5]s = excluded.%[5]s,
			%[6]s = excluded.%[6]s, %[7]s = excluded.%[7]s
		WHERE o.%[7]s IS DISTINCT FROM excluded.%[7]s
		RETURNING o.%[2]s::text`,
			s.out.table, o.id, o.label, o.kcv, o.alg, o.ct, s.out.src,
			s.q.id, s.table, s.idType, s.q.kcv, s.q.ct, s.filters("s.", 8))
	}
	args := append([]any{fromKCV, to.KCV, to.Label, keys, olds, cts, algs}, s.fvals...)
	var changed []string
	err := s.retry(ctx, func() error {
		changed = changed[:0]
		rows, err := s.pool.Query(ctx, sql, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var k string
			if err := rows.Scan(&k); err != nil {
				return err
			}
			changed = append(changed, k)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.name, err)
	}
	return changed, nil
}

// Census counts the selected rows by master KCV and alg.
func (s *Store) Census(ctx context.Context) ([]rotate.CensusRow, error) {
	sql := fmt.Sprintf(`SELECT coalesce(%[1]s::text, ''), coalesce(%[2]s::text, ''), count(*),
		count(*) FILTER (WHERE %[1]s IS NULL OR %[2]s IS NULL OR %[3]s IS NULL OR %[4]s IS NULL)
		FROM %[5]s WHERE TRUE%[6]s GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2`,
		s.view("kcv"), s.view("alg"), s.view("ct"), s.view("label"), s.from(), s.filters("s.", 1))
	var out []rotate.CensusRow
	err := s.retry(ctx, func() error {
		out = out[:0]
		rows, err := s.pool.Query(ctx, sql, s.fvals...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var c rotate.CensusRow
			if err := rows.Scan(&c.KCV, &c.Alg, &c.Rows, &c.Nulls); err != nil {
				return err
			}
			out = append(out, c)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.name, err)
	}
	return out, nil
}

// Create makes the table in the documented layout (with o's column
// names, an id of type text) and opens it; a table that exists is refused.
func Create(ctx context.Context, rawURL string, o Options) (*Store, error) {
	s, err := connect(ctx, rawURL, o)
	if err != nil {
		return nil, err
	}
	sql := fmt.Sprintf("CREATE TABLE %s (%s text PRIMARY KEY, %s text NOT NULL, %s text NOT NULL, %s text NOT NULL, %s bytea NOT NULL)",
		s.table, s.q.id, s.q.label, s.q.kcv, s.q.alg, s.q.ct)
	if _, err := s.pool.Exec(ctx, sql); err != nil {
		s.Close()
		if isDuplicateTable(err) {
			return nil, fmt.Errorf("%s already exists: generate never adds to a table; drop it or name another", s.name)
		}
		return nil, fmt.Errorf("%s: creating it: %w", s.name, err)
	}
	if err := s.check(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Fill adds rows by COPY.
func (s *Store) Fill(ctx context.Context, rows []rotate.TableRow) error {
	src := pgx.CopyFromSlice(len(rows), func(i int) ([]any, error) {
		r := rows[i]
		return []any{r.Key, r.Master.Label, r.Master.KCV, r.Alg, r.Ciphertext}, nil
	})
	_, err := s.pool.CopyFrom(ctx, s.ident,
		[]string{s.cols.ID, s.cols.MasterLabel, s.cols.MasterKCV, s.cols.Alg, s.cols.WrappedKey}, src)
	if err != nil {
		return fmt.Errorf("%s: adding rows: %w", s.name, err)
	}
	return nil
}

var (
	_ rotate.Table       = (*Store)(nil)
	_ rotate.TableFiller = (*Store)(nil)
)
