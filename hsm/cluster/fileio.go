package cluster

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/keymig/keymig/internal/atomicfile"
)

// writeJSONAtomic encodes v as indented JSON and writes it atomically.
func writeJSONAtomic(path string, v any, perm os.FileMode) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return atomicfile.WriteFile(path, append(b, '\n'), perm)
}
