package cli

// Credentials: keymig reads a PIN (user:password) from the environment, from
// a file readable by its owner only, or from a prompt on a terminal, and
// never from a flag's value, so that a PIN does not end up in shell history
// or in the process list. A PIN never appears in an error, a log or output.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/keymig/keymig/hsm"
	"golang.org/x/term"
)

// Environment variables that carry credentials.
const (
	envPIN         = "KEYMIG_PIN"          // the one cluster a command talks to
	envSourcePIN   = "KEYMIG_SOURCE_PIN"   // the source of a migration or sync
	envTargetPIN   = "KEYMIG_TARGET_PIN"   // the target of a migration or sync
	envNewPassword = "KEYMIG_NEW_PASSWORD" // hsm user create / change-password
)

// maxPINFile bounds what is read from a PIN file: a PIN is one short line.
const maxPINFile = 4096

// loadPIN returns the credentials for one cluster: from the environment
// variable envName, else from pinFile if set (a regular file that only its
// owner may read), else from a no-echo prompt on the terminal. what names the
// cluster or role in the prompt and in errors ("cluster /srv/hsm",
// "the source cluster"). The PIN itself never appears in an error.
func loadPIN(e *env, envName, pinFile, what string) (hsm.Credentials, error) {
	if v := e.getenv(envName); v != "" {
		c, err := hsm.ParsePIN(v)
		if err != nil {
			return hsm.Credentials{}, fmt.Errorf("%s for %s is malformed: a PIN must be user:password", envName, what)
		}
		return c, nil
	}
	if pinFile != "" {
		return readPINFile(pinFile, what)
	}
	if fd, ok := terminalFd(e.stdin); ok {
		pin, err := promptSecret(e.stderr, fd, fmt.Sprintf("PIN (user:password) for %s: ", what))
		if err != nil {
			return hsm.Credentials{}, fmt.Errorf("cannot read the PIN for %s: %w", what, err)
		}
		c, err := hsm.ParsePIN(pin)
		if err != nil {
			return hsm.Credentials{}, fmt.Errorf("the PIN typed for %s is malformed: a PIN must be user:password", what)
		}
		return c, nil
	}
	return hsm.Credentials{}, fmt.Errorf("no PIN for %s: set %s=user:password, pass --pin-file FILE (a file only you can read), or run keymig on a terminal to be prompted", what, envName)
}

// readPINFile reads a PIN from path, refusing a file that anyone but its
// owner can read or write, as ssh does for private keys.
func readPINFile(path, what string) (hsm.Credentials, error) {
	line, err := readPINLine(path, what)
	if err != nil {
		return hsm.Credentials{}, err
	}
	c, err := hsm.ParsePIN(line)
	if err != nil {
		return hsm.Credentials{}, fmt.Errorf("PIN file %s is malformed: its first line must be user:password", path)
	}
	return c, nil
}

// readPINLine returns the first line of the PIN file at path, refusing a
// file that anyone but its owner can read or write.
func readPINLine(path, what string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("cannot read the PIN file for %s: %w", what, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("cannot read the PIN file for %s: %w", what, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("PIN file %s is not a regular file", path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("PIN file %s can be read or written by others (mode %04o): run `chmod 600 %s`", path, perm, path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxPINFile+1))
	if err != nil {
		return "", fmt.Errorf("cannot read PIN file %s: %w", path, err)
	}
	if len(data) > maxPINFile {
		return "", fmt.Errorf("PIN file %s is larger than %d bytes; it should hold one line, the PIN", path, maxPINFile)
	}
	line, _, _ := bytes.Cut(data, []byte("\n"))
	return strings.TrimRight(string(line), "\r"), nil
}

// loadSecret returns a PIN as written, not parsed: from envName, else
// pinFile, else a prompt, as loadPIN does; noun names it in the prompt
// and errors ("the token's PIN").
func loadSecret(e *env, envName, pinFile, what, noun string) (string, error) {
	if v := e.getenv(envName); v != "" {
		return strings.TrimRight(v, "\r\n"), nil
	}
	if pinFile != "" {
		pin, err := readPINLine(pinFile, what)
		if err == nil && pin == "" {
			err = fmt.Errorf("PIN file %s is empty: its first line must be %s", pinFile, noun)
		}
		return pin, err
	}
	if fd, ok := terminalFd(e.stdin); ok {
		pin, err := promptSecret(e.stderr, fd, fmt.Sprintf("PIN for %s: ", what))
		if err != nil {
			return "", fmt.Errorf("cannot read the PIN for %s: %w", what, err)
		}
		return pin, nil
	}
	return "", fmt.Errorf("no PIN for %s: set %s to %s, pass --pin-file FILE (a file only you can read), or run keymig on a terminal to be prompted", what, envName, noun)
}

// loadNewPassword returns the new password of a user: from
// KEYMIG_NEW_PASSWORD, else from a prompt on the terminal, asked twice.
func loadNewPassword(e *env, what string) (string, error) {
	if v := e.getenv(envNewPassword); v != "" {
		return v, nil
	}
	fd, ok := terminalFd(e.stdin)
	if !ok {
		return "", fmt.Errorf("no new password for %s: set %s or run keymig on a terminal to be prompted", what, envNewPassword)
	}
	first, err := promptSecret(e.stderr, fd, fmt.Sprintf("New password for %s: ", what))
	if err != nil {
		return "", fmt.Errorf("cannot read the new password for %s: %w", what, err)
	}
	if first == "" {
		return "", fmt.Errorf("the new password for %s is empty", what)
	}
	second, err := promptSecret(e.stderr, fd, fmt.Sprintf("Repeat the new password for %s: ", what))
	if err != nil {
		return "", fmt.Errorf("cannot read the new password for %s: %w", what, err)
	}
	if first != second {
		return "", errors.New("the two passwords differ; nothing was changed")
	}
	return first, nil
}

// terminalFd returns the file descriptor of s if s is a terminal.
func terminalFd(s any) (int, bool) {
	f, ok := s.(*os.File)
	if !ok || f == nil {
		return 0, false
	}
	fd := int(f.Fd())
	return fd, term.IsTerminal(fd)
}

// promptSecret writes prompt to w and reads one line from the terminal fd
// without echo.
func promptSecret(w io.Writer, fd int, prompt string) (string, error) {
	fmt.Fprint(w, prompt)
	b, err := term.ReadPassword(fd)
	fmt.Fprintln(w)
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}
