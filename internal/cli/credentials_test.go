package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
)

// testEnv returns an env whose environment is vars and whose stdin is not a
// terminal, so nothing can prompt.
func testEnv(vars map[string]string) (*env, *bytes.Buffer) {
	var stderr bytes.Buffer
	return &env{
		stdin:  strings.NewReader(""),
		stdout: &bytes.Buffer{},
		stderr: &stderr,
		getenv: func(k string) string { return vars[k] },
	}, &stderr
}

func TestLoadPIN(t *testing.T) {
	dir := t.TempDir()
	writePIN := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	private := writePIN("private", "alice:file-pass\n", 0o600)
	ownerOnly := writePIN("readonly", "alice:ro-pass", 0o400)
	groupReadable := writePIN("group", "alice:group-pass\n", 0o640)
	worldReadable := writePIN("world", "alice:world-pass\n", 0o604)
	malformed := writePIN("malformed", "no-colon-secret\n", 0o600)
	crlf := writePIN("crlf", "alice:crlf-pass\r\nsecond line\n", 0o600)

	tests := []struct {
		name     string
		env      map[string]string
		envName  string
		pinFile  string
		want     hsm.Credentials
		wantErr  string   // substring of the error
		mustHide []string // never in the error
	}{
		{name: "env", env: map[string]string{"KEYMIG_PIN": "admin:env-pass"}, envName: "KEYMIG_PIN",
			want: hsm.Credentials{User: "admin", Password: "env-pass"}},
		{name: "env wins over file", env: map[string]string{"KEYMIG_PIN": "admin:env-pass"}, envName: "KEYMIG_PIN", pinFile: private,
			want: hsm.Credentials{User: "admin", Password: "env-pass"}},
		{name: "source role", env: map[string]string{"KEYMIG_SOURCE_PIN": "src:s-pass", "KEYMIG_PIN": "x:y"}, envName: "KEYMIG_SOURCE_PIN",
			want: hsm.Credentials{User: "src", Password: "s-pass"}},
		{name: "password with colons", env: map[string]string{"KEYMIG_PIN": "admin:a:b:c"}, envName: "KEYMIG_PIN",
			want: hsm.Credentials{User: "admin", Password: "a:b:c"}},
		{name: "malformed env not echoed", env: map[string]string{"KEYMIG_PIN": "adminsecret"}, envName: "KEYMIG_PIN",
			wantErr: "KEYMIG_PIN for cluster X is malformed: a PIN must be user:password", mustHide: []string{"adminsecret"}},
		{name: "empty password", env: map[string]string{"KEYMIG_PIN": "admin:"}, envName: "KEYMIG_PIN",
			wantErr: "malformed"},
		{name: "file 0600", envName: "KEYMIG_PIN", pinFile: private,
			want: hsm.Credentials{User: "alice", Password: "file-pass"}},
		{name: "file 0400", envName: "KEYMIG_PIN", pinFile: ownerOnly,
			want: hsm.Credentials{User: "alice", Password: "ro-pass"}},
		{name: "file first line only", envName: "KEYMIG_PIN", pinFile: crlf,
			want: hsm.Credentials{User: "alice", Password: "crlf-pass"}},
		{name: "file group readable", envName: "KEYMIG_PIN", pinFile: groupReadable,
			wantErr:  "PIN file " + groupReadable + " can be read or written by others (mode 0640): run `chmod 600 " + groupReadable + "`",
			mustHide: []string{"group-pass"}},
		{name: "file world readable", envName: "KEYMIG_PIN", pinFile: worldReadable,
			wantErr: "chmod 600", mustHide: []string{"world-pass"}},
		{name: "file malformed not echoed", envName: "KEYMIG_PIN", pinFile: malformed,
			wantErr: "PIN file " + malformed + " is malformed", mustHide: []string{"no-colon-secret"}},
		{name: "file missing", envName: "KEYMIG_PIN", pinFile: filepath.Join(dir, "nope"),
			wantErr: "cannot read the PIN file for cluster X"},
		{name: "file is a directory", envName: "KEYMIG_PIN", pinFile: dir,
			wantErr: "is not a regular file"},
		{name: "nothing", envName: "KEYMIG_TARGET_PIN",
			wantErr: "no PIN for cluster X: set KEYMIG_TARGET_PIN=user:password, pass --pin-file FILE (a file only you can read), or run keymig on a terminal to be prompted"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, stderr := testEnv(tt.env)
			got, err := loadPIN(e, tt.envName, tt.pinFile, "cluster X")
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("loadPIN = %v, want an error containing %q", got, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %q does not contain %q", err, tt.wantErr)
				}
				for _, s := range tt.mustHide {
					if strings.Contains(err.Error(), s) || strings.Contains(stderr.String(), s) {
						t.Fatalf("error %q or stderr %q shows the secret %q", err, stderr, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("loadPIN: %v", err)
			}
			if got != tt.want {
				t.Fatalf("loadPIN = %#v, want %#v", got, tt.want)
			}
			if stderr.Len() != 0 {
				t.Fatalf("loadPIN wrote %q to stderr without prompting", stderr)
			}
		})
	}
}

func TestLoadNewPassword(t *testing.T) {
	e, _ := testEnv(map[string]string{"KEYMIG_NEW_PASSWORD": "n3w pass"})
	got, err := loadNewPassword(e, "user alice")
	if err != nil || got != "n3w pass" {
		t.Fatalf("loadNewPassword = %q, %v; want %q", got, err, "n3w pass")
	}
	e, _ = testEnv(nil)
	if _, err := loadNewPassword(e, "user alice"); err == nil || !strings.Contains(err.Error(), "no new password for user alice: set KEYMIG_NEW_PASSWORD") {
		t.Fatalf("loadNewPassword without a source: %v", err)
	}
}

func TestCredentialsNeverFormatted(t *testing.T) {
	c := hsm.Credentials{User: "alice", Password: "hunter2"}
	for _, s := range []string{c.String(), c.GoString()} {
		if strings.Contains(s, "hunter2") {
			t.Fatalf("credentials formatted as %q", s)
		}
	}
}
