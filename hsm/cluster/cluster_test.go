package cluster

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
)

func TestInitOpenInfo(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3, func(o *InitOptions) { o.Region = "eu-west-1"; o.AZs = []string{"eu-west-1a", "eu-west-1b"} })
	info := c.Info()
	if len(info.HSMs) != 3 || info.Region != "eu-west-1" || !info.Policy.KeyAvailabilityCheck || info.Policy.KeyCapacity != DefaultKeyCapacity || !info.Policy.FIPS {
		t.Fatalf("Info = %+v", info)
	}
	if info.HSMs[0].AZ != "eu-west-1a" || info.HSMs[1].AZ != "eu-west-1b" || info.HSMs[2].AZ != "eu-west-1a" {
		t.Errorf("AZs not round-robin: %+v", info.HSMs)
	}
	s := login(t, c, alice)
	k := genAES(t, s, "k1", nil)
	if !k.Coverage.Full() || k.Coverage.Count() != 3 {
		t.Errorf("new key coverage = %+v, want full on 3", k.Coverage)
	}
	dir := c.Dir()
	c.Close()

	c2, err := Open(ctx, dir, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if c2.Info().ID != info.ID {
		t.Errorf("reopened id %s, want %s", c2.Info().ID, info.ID)
	}
	s2, err := c2.Login(ctx, alice)
	if err != nil {
		t.Fatal(err)
	}
	if err := encrypt(ctx, s2, k.Ref); err != nil {
		t.Fatalf("encrypt after reopen: %v", err)
	}
	if c2.Info().Keys != 1 {
		t.Errorf("Keys = %d, want 1", c2.Info().Keys)
	}
}

func TestOneHSMDisablesQuorum(t *testing.T) {
	c := newCluster(t, 1)
	if c.Info().Policy.KeyAvailabilityCheck {
		t.Fatal("1-HSM cluster has the availability check on")
	}
	if len(c.Notes()) == 0 {
		t.Error("Init did not say why the check is off")
	}
	s := login(t, c, alice)
	k := genAES(t, s, "k", nil)
	if err := encrypt(context.Background(), s, k.Ref); err != nil {
		t.Fatal(err)
	}
}

func TestDirLock(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 1)
	dir := c.Dir()
	start := time.Now()
	_, err := Open(ctx, dir, OpenOptions{LockTimeout: 150 * time.Millisecond})
	if err == nil {
		t.Fatal("second Open of the same directory in one process succeeded")
	}
	if time.Since(start) < 150*time.Millisecond {
		t.Errorf("gave up after %s, before the lock timeout", time.Since(start))
	}
	for _, want := range []string{dir, "pid", "in use"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	c.Close()
	c2, err := Open(ctx, dir, OpenOptions{LockTimeout: time.Second})
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	c2.Close()
}

func TestInitRefusesNonEmptyDir(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "x"), []byte("x"), 0o600)
	_, err := Init(context.Background(), InitOptions{Dir: dir, Officer: officer})
	if !errors.Is(err, hsm.ErrExists) {
		t.Fatalf("Init into non-empty dir: %v", err)
	}
}

// One HSM of two down: keys made meanwhile are on one HSM and refused under
// the quorum, then usable once the HSM returns and Sync copies them.
// One HSM of three down: the caller sees no error; coverage shows the gap,
// and Sync closes it.
func TestOneOfThreeDown(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3)
	ids := hsmIDs(c)
	s := login(t, c, alice)
	old := genAES(t, s, "old", nil)
	if err := c.SetFault(ids[2], hsm.Fault{Down: true}); err != nil {
		t.Fatal(err)
	}
	var refs []hsm.KeyRef
	for i := range 10 {
		k := genAES(t, s, "k", nil)
		refs = append(refs, k.Ref)
		for _, r := range []hsm.KeyRef{k.Ref, old.Ref} {
			ct, err := s.Encrypt(ctx, r, hsm.MechAESGCM, hsm.Params{}, []byte("x"))
			if err != nil {
				t.Fatalf("op %d: encrypt: %v", i, err)
			}
			if _, err := s.Decrypt(ctx, r, hsm.MechAESGCM, hsm.Params{}, ct); err != nil {
				t.Fatalf("op %d: decrypt: %v", i, err)
			}
		}
	}
	keys, err := s.ListKeys(ctx, hsm.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	partial := 0
	for _, k := range keys {
		if !k.Coverage.Full() {
			partial++
			if k.Coverage.String() != "unreachable "+ids[2] {
				t.Errorf("coverage %q", k.Coverage)
			}
		}
	}
	if partial != 10 {
		t.Errorf("%d keys with partial coverage, want 10", partial)
	}
	c.SetFault(ids[2], hsm.Fault{})
	if rep, err := c.Sync(ctx); err != nil || rep.KeysCopied != 10 {
		t.Fatalf("Sync = %+v, %v", rep, err)
	}
	keys, _ = s.ListKeys(ctx, hsm.Filter{})
	for _, k := range keys {
		if !k.Coverage.Full() {
			t.Errorf("after sync %s coverage %s", k.Ref, k.Coverage)
		}
	}
}

func TestUsersReachDownHSMAtSync(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	ids := hsmIDs(c)
	co := login(t, c, officer)
	c.SetFault(ids[1], hsm.Fault{Down: true})
	if err := co.CreateUser(ctx, "carol", hsm.RoleCryptoUser, "carol-pw1"); err != nil {
		t.Fatalf("CreateUser with an HSM down: %v", err)
	}
	// A change other than a creation must not be half-applied silently.
	if err := co.ChangePassword(ctx, "carol", "carol-pw2"); err == nil || !strings.Contains(err.Error(), ids[1]) {
		t.Errorf("ChangePassword with an HSM down: %v, want an error naming %s", err, ids[1])
	}
	c.SetFault(ids[1], hsm.Fault{})
	users, err := co.ListUsers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		if u.Name == "carol" && u.Coverage.Full() {
			t.Error("carol on both HSMs before sync")
		}
	}
	rep, err := c.Sync(ctx)
	if err != nil || rep.UsersCopied != 1 {
		t.Fatalf("Sync = %+v, %v", rep, err)
	}
	users, _ = co.ListUsers(ctx)
	for _, u := range users {
		if !u.Coverage.Full() {
			t.Errorf("user %s coverage %s after sync", u.Name, u.Coverage)
		}
	}
}

func TestFaultsAppliedAtOpen(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	ids := hsmIDs(c)
	dir := c.Dir()
	c.Close()
	if err := SetFault(dir, ids[0], hsm.Fault{Down: true}); err != nil {
		t.Fatal(err)
	}
	if err := SetFault(dir, "nope", hsm.Fault{Down: true}); !errors.Is(err, hsm.ErrNotFound) {
		t.Errorf("SetFault on unknown HSM: %v", err)
	}
	f, _ := Faults(dir)
	if !f[ids[0]].Down {
		t.Fatalf("Faults = %v", f)
	}
	c2, err := Open(ctx, dir, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if st := c2.Info().HSMs[0].State; st != "down" {
		t.Errorf("state of downed HSM = %s", st)
	}
	if _, err := c2.Login(ctx, alice); err != nil {
		t.Fatalf("login with one HSM down: %v", err)
	}
	if err := ClearFault(dir, AllHSMs); err != nil {
		t.Fatal(err)
	}
	if f, _ := Faults(dir); len(f) != 0 {
		t.Errorf("after ClearFault: %v", f)
	}
}

func TestInfoCountsKeysWithoutLogin(t *testing.T) {
	c := newCluster(t, 2)
	s := login(t, c, alice)
	genAES(t, s, "a", nil)
	genAES(t, s, "b", nil)
	dir := c.Dir()
	c.Close()
	c2, err := Open(context.Background(), dir, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if got := c2.Info().Keys; got != 2 {
		t.Errorf("Info().Keys = %d, want 2", got)
	}
}
