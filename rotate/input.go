package rotate

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
)

// batchRange is where one batch of records sits in the input.
type batchRange struct {
	Line  int64 // number of its first line, from 1
	Off   int64 // byte offset of its first line
	Len   int64 // bytes, newlines included
	Lines int   // lines, blank ones included
}

// inputIndex is what one streaming pass over the input learns.
type inputIndex struct {
	SHA256  string
	Lines   int64
	Bytes   int64
	Batches []batchRange
}

// indexInput reads path once, hashing it and cutting it into batches of
// size lines.
func indexInput(path string, size int) (*inputIndex, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("data-key file: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	idx := &inputIndex{}
	cur := batchRange{Line: 1}
	err = eachLine(io.TeeReader(f, h), func(_ []byte, n int) error {
		idx.Lines++
		cur.Len += int64(n)
		cur.Lines++
		if cur.Lines == size {
			idx.Batches = append(idx.Batches, cur)
			cur = batchRange{Line: idx.Lines + 1, Off: cur.Off + cur.Len}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	if cur.Lines > 0 {
		idx.Batches = append(idx.Batches, cur)
	}
	idx.Bytes = func() int64 {
		if len(idx.Batches) == 0 {
			return 0
		}
		b := idx.Batches[len(idx.Batches)-1]
		return b.Off + b.Len
	}()
	idx.SHA256 = hex.EncodeToString(h.Sum(nil))
	return idx, nil
}

// errLongLine marks a line longer than MaxLine; eachLine gives its first
// MaxLine bytes.
var errLongLine = errors.New("line too long")

// eachLine calls fn for each line of r (without its newline, valid only
// during the call) and the number of bytes it took in r, newline included.
// A line longer than MaxLine is passed truncated, never held whole.
func eachLine(r io.Reader, fn func(line []byte, n int) error) error {
	lr := newLineReader(r)
	for {
		line, n, err := lr.next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := fn(line, n); err != nil {
			return err
		}
	}
}

// lineReader reads lines one at a time.
type lineReader struct {
	br *bufio.Reader
}

func newLineReader(r io.Reader) *lineReader {
	return &lineReader{br: bufio.NewReaderSize(r, MaxLine+1)}
}

// next returns the next line without its newline (valid until the next
// call; truncated to MaxLine+1 bytes if longer) and the bytes it took
// including the newline, or io.EOF.
func (lr *lineReader) next() ([]byte, int, error) {
	line, err := lr.br.ReadSlice('\n')
	n := len(line)
	if errors.Is(err, bufio.ErrBufferFull) {
		head := bytes.Clone(line)
		for errors.Is(err, bufio.ErrBufferFull) {
			line, err = lr.br.ReadSlice('\n')
			n += len(line)
		}
		if err != nil && err != io.EOF {
			return nil, 0, err
		}
		return head, n, nil
	}
	if err != nil && err != io.EOF {
		return nil, 0, err
	}
	if n == 0 {
		return nil, 0, io.EOF
	}
	return bytes.TrimSuffix(line, []byte("\n")), n, nil
}

// isBlank reports a line of only white space: not a record, and kept out of
// the output.
func isBlank(line []byte) bool {
	return len(bytes.TrimSpace(line)) == 0
}
