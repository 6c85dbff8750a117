package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// lockFile is the directory lock: an flock on it is held for as long as a
// Cluster is open, and it holds a record of who holds it.
const lockFile = ".lock"

// lockHolder is the record a lock holder writes into the lock file, so that
// a process that has to wait can say whom it waited for.
type lockHolder struct {
	PID     int       `json:"pid"`
	Host    string    `json:"host"`
	Command string    `json:"command"`
	Since   time.Time `json:"since"`
}

func (h lockHolder) String() string {
	return fmt.Sprintf("pid %d on %s (%s) since %s", h.PID, h.Host, h.Command, h.Since.Format(time.RFC3339))
}

// dirLock is a held directory lock.
type dirLock struct{ f *os.File }

// lockDir takes the exclusive lock of a cluster directory, waiting up to
// timeout for another holder. flock locks belong to an open file
// description, so a second Open of the same directory in this process opens
// the file again and is refused like another process would be.
func lockDir(dir string, timeout time.Duration) (*dirLock, error) {
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock cluster %s: %w", dir, err)
	}
	deadline := time.Now().Add(timeout)
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock cluster %s: %w", dir, err)
		}
		if !time.Now().Before(deadline) {
			holder := "another process"
			if b, rerr := os.ReadFile(path); rerr == nil {
				var h lockHolder
				if json.Unmarshal(b, &h) == nil && h.PID != 0 {
					holder = h.String()
				}
			}
			f.Close()
			return nil, fmt.Errorf("cluster %s is in use by %s; waited %s (wait longer with a larger lock timeout, or stop that process)", dir, holder, timeout)
		}
		time.Sleep(min(50*time.Millisecond, time.Until(deadline)+time.Millisecond))
	}
	host, _ := os.Hostname()
	h := lockHolder{PID: os.Getpid(), Host: host, Command: strings.Join(os.Args, " "), Since: time.Now().UTC()}
	b, _ := json.Marshal(h)
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt(append(b, '\n'), 0)
	}
	return &dirLock{f: f}, nil
}

// unlock releases the lock. The holder record stays behind; it is only read
// while the lock is held by someone.
func (l *dirLock) unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	_ = syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	err := l.f.Close()
	l.f = nil
	return err
}
