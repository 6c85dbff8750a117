// Package atomicfile writes files so that a crash leaves either the old
// file or the new one, never a torn one: the data goes to a temporary file
// in the same directory, which is synced, renamed over the path, and the
// directory synced so that the rename itself survives a power cut.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// File is a file being written in place of a path. Write to it, then
// Commit (or CommitNew) to move it into place; Abort throws it away.
type File struct {
	*os.File
	path string
	done bool
}

// New starts a file that will replace path, with mode perm whatever the
// umask.
func New(path string, perm os.FileMode) (*File, error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*") // O_EXCL, mode 0600
	if err != nil {
		return nil, fmt.Errorf("cannot create a file next to %s: %w", path, err)
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("cannot set the mode of %s: %w", path, err)
	}
	return &File{File: f, path: path}, nil
}

// Commit syncs the file and moves it over its path.
func (f *File) Commit() error { return f.commit(true) }

// CommitNew is Commit for a path that must not exist: the file is
// hard-linked into place, which fails atomically if something is there,
// and the error then wraps fs.ErrExist. On file systems without hard links
// it checks, then renames, which leaves a small window to a racing writer.
func (f *File) CommitNew() error { return f.commit(false) }

func (f *File) commit(replace bool) (err error) {
	if f.done {
		return fmt.Errorf("%s: already committed or aborted", f.path)
	}
	defer func() {
		if err != nil {
			f.Abort()
		}
	}()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("cannot write %s: %w", f.path, err)
	}
	if err := f.File.Close(); err != nil {
		return fmt.Errorf("cannot write %s: %w", f.path, err)
	}
	tmp := f.Name()
	if replace {
		if err := os.Rename(tmp, f.path); err != nil {
			return fmt.Errorf("cannot replace %s: %w", f.path, err)
		}
	} else {
		switch err := os.Link(tmp, f.path); {
		case err == nil:
			os.Remove(tmp)
		case errors.Is(err, fs.ErrExist):
			return fmt.Errorf("%s already exists: %w", f.path, fs.ErrExist)
		default: // no hard links here (some network and FUSE file systems)
			if _, err := os.Lstat(f.path); err == nil {
				return fmt.Errorf("%s already exists: %w", f.path, fs.ErrExist)
			}
			if err := os.Rename(tmp, f.path); err != nil {
				return fmt.Errorf("cannot create %s: %w", f.path, err)
			}
		}
	}
	f.done = true
	return SyncDir(filepath.Dir(f.path))
}

// Abort closes and removes the temporary file; the path is untouched. It
// is a no-op after Commit, so it can be deferred.
func (f *File) Abort() {
	if f.done {
		return
	}
	f.done = true
	f.File.Close()
	os.Remove(f.Name())
}

// WriteFile writes data to path, replacing what was there.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return write(path, data, perm, true)
}

// CreateFile writes data to a new path; an existing one is an error that
// wraps fs.ErrExist, and is never replaced.
func CreateFile(path string, data []byte, perm os.FileMode) error {
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("%s already exists: %w", path, fs.ErrExist)
	}
	return write(path, data, perm, false)
}

func write(path string, data []byte, perm os.FileMode, replace bool) error {
	f, err := New(path, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Abort()
		return fmt.Errorf("cannot write %s: %w", path, err)
	}
	if replace {
		return f.Commit()
	}
	return f.CommitNew()
}

// Rename moves a file that is already synced into place and syncs the
// directory, so that the rename survives a power cut.
func Rename(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(to))
}

// SyncDir fsyncs a directory so that a create or rename in it is durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
