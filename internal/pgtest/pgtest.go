// Package pgtest starts a throwaway PostgreSQL server for tests: initdb
// and pg_ctl into a temp directory, on a free loopback port, as an
// unprivileged user (the postgres account when the tests run as root),
// with password authentication so that the tests use PGPASSWORD as users
// do. Where the server binaries are absent the tests skip, naming the
// Debian package; with KEYMIG_REQUIRE_POSTGRES=1 (set by CI) they fail.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/keymig/keymig/internal/keymigtest"
)

// Password is the password of the server's superuser, keymig.
const Password = "pgtest-password"

// RequireEnv, set to 1, turns a missing PostgreSQL into a failure.
const RequireEnv = "KEYMIG_REQUIRE_POSTGRES"

// Server is a running throwaway server.
type Server struct {
	dir, bin string
	port     int
	cred     *syscall.Credential
	n        int
	mu       sync.Mutex
}

var (
	shared     *Server
	sharedErr  error
	sharedOnce sync.Once
)

// Shared returns the test binary's server, starting it on first use; the
// test skips (or fails, under KEYMIG_REQUIRE_POSTGRES=1) without one.
// Call Stop from TestMain.
func Shared(t testing.TB) *Server {
	t.Helper()
	srv, err := Get()
	keymigtest.NeedComponent(t, err, ErrAbsent, RequireEnv)
	return srv
}

// Get returns the shared server, starting it on first use, or ErrAbsent.
func Get() (*Server, error) {
	sharedOnce.Do(func() { shared, sharedErr = start() })
	return shared, sharedErr
}

// Required reports whether a missing PostgreSQL is a failure.
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// Stop stops the shared server if one was started.
func Stop() {
	if shared != nil {
		shared.stop()
	}
}

// ErrAbsent says the server binaries are not installed.
var ErrAbsent = errors.New("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")

// binDir finds initdb and pg_ctl.
func binDir() (string, error) {
	if p, err := exec.LookPath("pg_ctl"); err == nil {
		if _, err := exec.LookPath("initdb"); err == nil {
			return filepath.Dir(p), nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "pg_ctl")); err == nil {
			return dirs[i], nil
		}
	}
	return "", ErrAbsent
}

func start() (*Server, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "keymig-pgtest-")
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, bin: bin}
	if os.Geteuid() == 0 {
		// initdb refuses to run as root.
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("running as root, and there is no postgres user to run the test server as: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			return nil, err
		}
	}
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte(Password+"\n"), 0o600); err != nil {
		return nil, err
	}
	if s.cred != nil {
		os.Chown(pw, int(s.cred.Uid), int(s.cred.Gid))
	}
	if out, err := s.cmd("initdb", "-D", s.data(), "-U", "keymig", "--auth=scram-sha-256", "--pwfile="+pw, "-E", "UTF8", "--no-sync").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s.port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=512MB", s.port, dir)
	if out, err := s.cmd("pg_ctl", "-D", s.data(), "-o", opts, "-l", filepath.Join(dir, "log"), "-w", "start").CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		return nil, fmt.Errorf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	return s, nil
}

func (s *Server) data() string { return filepath.Join(s.dir, "data") }

func (s *Server) cmd(name string, args ...string) *exec.Cmd {
	c := exec.Command(filepath.Join(s.bin, name), args...)
	c.Dir = s.dir
	if s.cred != nil {
		c.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	return c
}

func (s *Server) stop() {
	s.cmd("pg_ctl", "-D", s.data(), "-m", "immediate", "-w", "stop").Run()
	os.RemoveAll(s.dir)
}

// URL is the URL of database db, without the password (the tests set
// PGPASSWORD, as a user would).
func (s *Server) URL(db string) string {
	return fmt.Sprintf("postgres://keymig@127.0.0.1:%d/%s?sslmode=disable", s.port, db)
}

// Port is the server's port.
func (s *Server) Port() int { return s.port }

// NewDB creates an empty database for one test and returns its URL. It
// sets PGPASSWORD for the test.
func (s *Server) NewDB(t testing.TB) string {
	t.Helper()
	s.mu.Lock()
	s.n++
	name := fmt.Sprintf("t%d_%d", os.Getpid(), s.n)
	s.mu.Unlock()
	url, err := s.CreateDB(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("PGPASSWORD", Password)
	return url
}

// CreateDB creates the database name (letters, digits, _) and returns its URL.
func (s *Server) CreateDB(name string) (string, error) {
	if err := s.Exec(context.Background(), "postgres", "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return "", err
	}
	return s.URL(name), nil
}

// Exec runs sql in database db.
func (s *Server) Exec(ctx context.Context, db, sql string, args ...any) error {
	cfg, err := pgx.ParseConfig(s.URL(db))
	if err != nil {
		return err
	}
	cfg.Password = Password
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer c.Close(ctx)
	_, err = c.Exec(ctx, sql, args...)
	return err
}

// Conn connects to database db as the superuser.
func (s *Server) Conn(t testing.TB, db string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(s.URL(db))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Password = Password
	c, err := pgx.ConnectConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}
