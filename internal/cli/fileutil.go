package cli

import (
	"os"

	"github.com/keymig/keymig/internal/atomicfile"
)

// writeFileAtomic writes data to path so that path either does not change or
// holds all of data (see internal/atomicfile). Unless force is set an
// existing path is never replaced, and the error wraps fs.ErrExist so
// callers can suggest their --force flag.
func writeFileAtomic(path string, data []byte, perm os.FileMode, force bool) error {
	if force {
		return atomicfile.WriteFile(path, data, perm)
	}
	return atomicfile.CreateFile(path, data, perm)
}
