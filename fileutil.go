package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// writeFileAtomic writes data to path so that path either does not change or
// holds all of data: it writes a temporary file in the same directory, syncs
// it and moves it into place. The file gets mode perm whatever the umask.
//
// Unless force is set an existing path is never replaced: the temporary file
// is hard-linked into place, which fails atomically if path exists, and the
// error then wraps fs.ErrExist so callers can suggest their --force flag. On
// file systems without hard links it falls back to a check then a rename,
// which leaves a small window for a racing writer.
func writeFileAtomic(path string, data []byte, perm os.FileMode, force bool) (err error) {
	if !force {
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("%s already exists: %w", path, fs.ErrExist)
		}
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*") // O_EXCL, mode 0600
	if err != nil {
		return fmt.Errorf("cannot create a file next to %s: %w", path, err)
	}
	tmpName := tmp.Name()
	defer func() {
		if tmp != nil {
			tmp.Close()
		}
		if err != nil {
			os.Remove(tmpName)
		}
	}()
	if err := tmp.Chmod(perm); err != nil {
		return fmt.Errorf("cannot set the mode of %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("cannot write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("cannot write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		tmp = nil
		return fmt.Errorf("cannot write %s: %w", path, err)
	}
	tmp = nil

	if force {
		if err := os.Rename(tmpName, path); err != nil {
			return fmt.Errorf("cannot replace %s: %w", path, err)
		}
	} else {
		switch err := os.Link(tmpName, path); {
		case err == nil:
			os.Remove(tmpName)
		case errors.Is(err, fs.ErrExist):
			return fmt.Errorf("%s already exists: %w", path, fs.ErrExist)
		default:
			// No hard links here (some network and FUSE file systems).
			if _, err := os.Lstat(path); err == nil {
				return fmt.Errorf("%s already exists: %w", path, fs.ErrExist)
			}
			if err := os.Rename(tmpName, path); err != nil {
				return fmt.Errorf("cannot create %s: %w", path, err)
			}
		}
	}
	syncDir(dir)
	return nil
}

// syncDir makes a rename in dir durable; failure only weakens durability
// after a power cut, so it is not reported.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}
