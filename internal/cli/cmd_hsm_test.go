package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/cluster"
	"github.com/keymig/keymig/hsm/node"
)

// testOfficer is the first crypto officer of every test cluster.
var testOfficer = hsm.Credentials{User: "admin", Password: "secret-pass"}

// newTestCluster makes a cluster of n HSMs in a temporary directory and
// returns the options a command on it needs, logged in as the officer.
func newTestCluster(t *testing.T, n int) clusterOptions {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "hsm")
	var out, errOut bytes.Buffer
	if err := runHSMInit(context.Background(), withStreams(nil, &out, &errOut), hsmInitOptions{Dir: dir, Region: "us-east-1", HSMs: n, KeyCapacity: 3300,
		Output: outputText, Officer: testOfficer}); err != nil {
		t.Fatalf("init: %v", err)
	}
	return clusterOptions{Dir: dir, Output: outputText, LockTimeout: 2 * time.Second, Creds: testOfficer}
}

// addTestUser creates a crypto user and returns options logged in as it.
func addTestUser(t *testing.T, co clusterOptions, name string) clusterOptions {
	t.Helper()
	var out bytes.Buffer
	if err := runHSMUserCreate(context.Background(), withStreams(nil, &out, &out), hsmUserOptions{clusterOptions: co, Username: name,
		Role: hsm.RoleCryptoUser, NewPassword: name + "-pass"}); err != nil {
		t.Fatalf("create user %s: %v", name, err)
	}
	co.Creds = hsm.Credentials{User: name, Password: name + "-pass"}
	return co
}

// listTestKeys returns the keys co's user sees, through the JSON output.
func listTestKeys(t *testing.T, co clusterOptions) []hsm.KeyInfo {
	t.Helper()
	co.Output = outputJSON
	var out bytes.Buffer
	if err := runHSMKeyList(context.Background(), withStreams(nil, &out, &out), hsmKeyListOptions{clusterOptions: co}); err != nil {
		t.Fatalf("key list: %v", err)
	}
	var res keyListResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("key list --output json: %v\n%s", err, out.String())
	}
	return res.Keys
}

// hsmIDsOf returns the HSM ids of the cluster at dir.
func hsmIDsOf(t *testing.T, dir string) []string {
	t.Helper()
	hsms, err := clusterHSMs(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, h := range hsms {
		ids = append(ids, h.ID)
	}
	return ids
}

// TestHSMAuditVerifyDetectsTampering alters one byte of one audit record in
// an HSM's bbolt file: audit verify must fail and name the HSM and record.
func TestHSMAuditVerifyDetectsTampering(t *testing.T) {
	ctx := context.Background()
	co := newTestCluster(t, 2)
	alice := addTestUser(t, co, "alice")
	var out bytes.Buffer
	if err := runHSMKeyGenerate(ctx, withStreams(nil, &out, &out), hsmKeyGenerateOptions{clusterOptions: alice, Type: "aes-256", Label: "k", Count: 2}); err != nil {
		t.Fatalf("generate: %v", err)
	}
	out.Reset()
	if err := runHSMAuditVerify(ctx, withStreams(nil, &out, &out), hsmAuditOptions{clusterOptions: co}); err != nil {
		t.Fatalf("audit verify of an untouched cluster: %v\n%s", err, out.String())
	}

	victim := hsmIDsOf(t, co.Dir)[1]
	const seq = 3
	// The audit log is a file beside the HSM's bbolt file, one record per
	// line: hex hash, space, JSON. Change one byte of the user name.
	path := node.AuditPath(filepath.Join(co.Dir, victim+".db"))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.SplitAfter(b, []byte("\n"))
	if len(lines) <= seq {
		t.Fatalf("no audit record %d in %s", seq, path)
	}
	v := lines[seq-1]
	i := bytes.Index(v, []byte(`"user":"`))
	if i < 0 {
		t.Fatalf("audit record %d has no user: %q", seq, v)
	}
	v[i+len(`"user":"`)] ^= 0x01
	if err := os.WriteFile(path, bytes.Join(lines, nil), 0o600); err != nil {
		t.Fatal(err)
	}

	out.Reset()
	err = runHSMAuditVerify(ctx, withStreams(nil, &out, &out), hsmAuditOptions{clusterOptions: co})
	if err == nil {
		t.Fatalf("audit verify passed after tampering:\n%s", out.String())
	}
	for _, want := range []string{co.Dir, "HSM " + victim, "3"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %q", err, want)
		}
	}
	if !strings.Contains(out.String(), "BROKEN") {
		t.Errorf("report does not flag the broken chain:\n%s", out.String())
	}
	if hsm0 := hsmIDsOf(t, co.Dir)[0]; strings.Contains(err.Error(), "HSM "+hsm0) {
		t.Errorf("error %q blames the intact HSM %s", err, hsm0)
	}
	if got := exitCode(ctx, err, &bytes.Buffer{}); got != exitError {
		t.Errorf("exit code %d, want %d", got, exitError)
	}
}

// TestHSMLockedDirectory: a command on a cluster that another process holds
// waits a bounded time, then fails naming the directory and the holder.
func TestHSMLockedDirectory(t *testing.T) {
	ctx := context.Background()
	co := newTestCluster(t, 1)
	held, err := cluster.Open(ctx, co.Dir, cluster.OpenOptions{LockTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	co.LockTimeout = 300 * time.Millisecond
	start := time.Now()
	var out bytes.Buffer
	err = runHSMKeyList(ctx, withStreams(nil, &out, &out), hsmKeyListOptions{clusterOptions: co})
	waited := time.Since(start)
	if err == nil {
		t.Fatal("key list succeeded on a locked cluster")
	}
	for _, want := range []string{co.Dir, "in use by pid", "waited"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if waited < co.LockTimeout || waited > 10*co.LockTimeout {
		t.Errorf("waited %s, want about %s", waited, co.LockTimeout)
	}
	if err := held.Close(); err != nil {
		t.Fatal(err)
	}
	// Once released, the same command works and nothing was damaged.
	if err := runHSMKeyList(ctx, withStreams(nil, &out, &out), hsmKeyListOptions{clusterOptions: co}); err != nil {
		t.Fatalf("key list after the lock was released: %v", err)
	}
	if err := runHSMAuditVerify(ctx, withStreams(nil, &out, &out), hsmAuditOptions{clusterOptions: co}); err != nil {
		t.Fatalf("audit verify after the lock was released: %v", err)
	}
}

// TestHSMAddRemoveHSM grows a one-HSM cluster and shrinks it back; keys
// reach the new HSM.
func TestHSMAddRemoveHSM(t *testing.T) {
	ctx := context.Background()
	co := newTestCluster(t, 1)
	alice := addTestUser(t, co, "alice")
	var out bytes.Buffer
	if err := runHSMKeyGenerate(ctx, withStreams(nil, &out, &out), hsmKeyGenerateOptions{clusterOptions: alice, Type: "aes-128", Label: "k"}); err != nil {
		t.Fatalf("generate: %v", err)
	}
	out.Reset()
	if err := runHSMAddHSM(ctx, withStreams(nil, &out, &out), hsmMembershipOptions{clusterOptions: co, AZ: "us-east-1b"}); err != nil {
		t.Fatalf("add-hsm: %v", err)
	}
	if !strings.Contains(out.String(), "it now has 2 HSMs") {
		t.Errorf("add-hsm printed %q", out.String())
	}
	ids := hsmIDsOf(t, co.Dir)
	if len(ids) != 2 {
		t.Fatalf("cluster has HSMs %v, want 2", ids)
	}
	keys := listTestKeys(t, alice)
	if len(keys) != 1 || !keys[0].Coverage.Full() || keys[0].Coverage.Count() != 2 {
		t.Fatalf("after add-hsm, keys = %+v; want one key on both HSMs", keys)
	}
	out.Reset()
	if err := runHSMRemoveHSM(ctx, withStreams(nil, &out, &out), hsmMembershipOptions{clusterOptions: co, HSM: ids[1]}); err != nil {
		t.Fatalf("remove-hsm: %v", err)
	}
	if _, err := os.Stat(filepath.Join(co.Dir, ids[1]+".db")); !os.IsNotExist(err) {
		t.Errorf("the removed HSM's file is still there: %v", err)
	}
	if keys := listTestKeys(t, alice); len(keys) != 1 || !keys[0].Coverage.Full() {
		t.Fatalf("after remove-hsm, keys = %+v", keys)
	}
	err := runHSMRemoveHSM(ctx, withStreams(nil, &out, &out), hsmMembershipOptions{clusterOptions: co, HSM: ids[0]})
	if err == nil || !strings.Contains(err.Error(), "last HSM") {
		t.Fatalf("removing the last HSM: %v", err)
	}
}

// TestHSMKeyListJSONShape pins the JSON field names that scripts rely on.
func TestHSMKeyListJSONShape(t *testing.T) {
	k := hsm.KeyInfo{Ref: 0x2a, Label: "payments", ID: hsm.Bytes{0x0a}, Class: hsm.ClassSecret, Type: hsm.TypeAES,
		Bits: 256, KCV: hsm.Bytes{1, 2, 3}, Owner: "alice", Coverage: hsm.Coverage{HSMs: []string{"hsm-a"}}}
	var out bytes.Buffer
	if err := printKeys(&out, outputJSON, "dir", []hsm.KeyInfo{k}, false); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"cluster": "dir"`, `"key-reference": "0x000000000000002a"`, `"label": "payments"`,
		`"id": "0a"`, `"check-value": "010203"`, `"owner": "alice"`, `"shared-users": []`, `"extractable": false`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("key list JSON lacks %s:\n%s", want, out.String())
		}
	}
	out.Reset()
	if err := printKeys(&out, outputJSON, "dir", nil, false); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `"keys": []`) {
		t.Errorf("an empty list is not []: %s", out.String())
	}
}

// TestAddToID checks the ids --count gives successive keys.
func TestAddToID(t *testing.T) {
	tests := []struct {
		id   []byte
		n    int
		want string
	}{
		{[]byte{0x00, 0xff}, 1, "0100"},
		{[]byte{0x0a}, 2, "0c"},
		{[]byte{0xff}, 1, "0100"},
		{[]byte{0x00, 0x00, 0x01}, 0, "000001"},
	}
	for _, tt := range tests {
		if got := addToID(tt.id, tt.n).String(); got != tt.want {
			t.Errorf("addToID(%x, %d) = %s, want %s", tt.id, tt.n, got, tt.want)
		}
	}
}

// TestParseOutput checks the --output values.
func TestParseOutput(t *testing.T) {
	for in, want := range map[string]outputFormat{"": outputText, "text": outputText, "JSON": outputJSON} {
		if got, err := parseOutput(in); err != nil || got != want {
			t.Errorf("parseOutput(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := parseOutput("yaml"); err == nil {
		t.Error("parseOutput(yaml) succeeded")
	}
}

// TestHSMRestoreKeepsHandlesAndKCVs restores a backup into a clone in
// another directory and region: same users, handles and check values.
func TestHSMRestoreKeepsHandlesAndKCVs(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "us")
	cl, err := cluster.Init(ctx, cluster.InitOptions{Dir: dir, Region: "us-east-1", HSMs: 2, Officer: testOfficer})
	if err != nil {
		t.Fatal(err)
	}
	s, err := cl.Login(ctx, testOfficer)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.(hsm.Users).CreateUser(ctx, "alice", hsm.RoleCryptoUser, "alice-pass"); err != nil {
		t.Fatal(err)
	}
	s.Logout(ctx)
	alice := hsm.Credentials{User: "alice", Password: "alice-pass"}
	if s, err = cl.Login(ctx, alice); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "payments",
		Attrs: map[hsm.Attr]bool{hsm.AttrExtractable: false}}}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeRSA, Bits: 2048,
		Public: hsm.Template{Label: "transport"}, Private: hsm.Template{Label: "transport"}}); err != nil {
		t.Fatal(err)
	}
	s.Logout(ctx)
	backup := filepath.Join(t.TempDir(), "us.backup")
	if _, err := cl.Backup(ctx, backup); err != nil {
		t.Fatalf("backup: %v", err)
	}
	if err := cl.Close(); err != nil {
		t.Fatal(err)
	}

	var out bytes.Buffer
	co := clusterOptions{Dir: dir, Output: outputText, LockTimeout: 2 * time.Second}
	if err := runHSMBackupList(ctx, withStreams(nil, &out, &out), hsmBackupOptions{clusterOptions: co}); err != nil {
		t.Fatalf("backup list: %v", err)
	}
	if !strings.Contains(out.String(), "us-east-1") || !strings.Contains(out.String(), "backup-") {
		t.Errorf("backup list:\n%s", out.String())
	}
	clone := filepath.Join(t.TempDir(), "eu")
	out.Reset()
	if err := runHSMRestore(ctx, withStreams(nil, &out, &out), hsmRestoreOptions{Backup: backup, Dir: clone, Region: "eu-west-1", HSMs: 2, Output: outputText}); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if !strings.Contains(out.String(), "(region eu-west-1, 2 HSMs, 3 token keys)") {
		t.Errorf("restore printed:\n%s", out.String())
	}

	co.Creds = alice
	orig := listTestKeys(t, co)
	co.Dir = clone
	got := listTestKeys(t, co)
	if len(orig) != 3 || len(got) != len(orig) {
		t.Fatalf("clone has %d keys, original %d; want 3 each", len(got), len(orig))
	}
	for i := range orig {
		if got[i].Ref != orig[i].Ref || !bytes.Equal(got[i].KCV, orig[i].KCV) || got[i].Owner != "alice" {
			t.Errorf("clone key %s (kcv %s, owner %s) differs from original %s (kcv %s)", got[i].Ref, got[i].KCV, got[i].Owner, orig[i].Ref, orig[i].KCV)
		}
		if !got[i].Coverage.Full() {
			t.Errorf("clone key %s coverage %s", got[i].Ref, got[i].Coverage)
		}
	}
	var st bytes.Buffer
	if err := runHSMStatus(ctx, withStreams(nil, &st, &st), hsmStatusOptions{clusterOptions{Dir: clone, Output: outputJSON, LockTimeout: time.Second}}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(st.String(), `"region": "eu-west-1"`) {
		t.Errorf("clone status:\n%s", st.String())
	}
}
