package hsmtest

import (
	"context"
	"strings"
	"testing"

	"github.com/keymig/keymig/hsm"
)

func testLogin(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	if err := f.co.CreateUser(ctx, "erin", hsm.RoleCryptoUser, userPassword); err != nil {
		t.Fatal(err)
	}
	_, errUnknown := f.b.Login(ctx, hsm.Credentials{User: "nobody", Password: userPassword})
	wantCode(t, "login as unknown user", errUnknown, hsm.CodePermission)
	var errBad error
	for i := 0; i < 5; i++ {
		_, errBad = f.b.Login(ctx, hsm.Credentials{User: "erin", Password: "wrong-password"})
		wantCode(t, "login with a bad password", errBad, hsm.CodePermission)
		if i == 0 && errBad.Error() != errUnknown.Error() {
			t.Errorf("unknown user and bad password give different errors:\n%q\n%q", errUnknown, errBad)
		}
	}
	_, err := f.b.Login(ctx, hsm.Credentials{User: "erin", Password: userPassword})
	wantCode(t, "login after 5 failures", err, hsm.CodePermission)
	mentions(t, "locked login", err, "locked", "crypto officer")
	if err := f.co.ChangePassword(ctx, "erin", "new-password-1"); err != nil {
		t.Fatalf("officer unlocks erin: %v", err)
	}
	login, err := f.b.Login(ctx, hsm.Credentials{User: "erin", Password: "new-password-1"})
	if err != nil {
		t.Fatalf("login after unlock: %v", err)
	}
	defer login.Logout(context.Background())
	s := full(t, login)
	if u := s.User(); u.Name != "erin" || u.Role != hsm.RoleCryptoUser {
		t.Errorf("User() = %+v", u)
	}
	// A user changes its own password, not another's.
	wantCode(t, "erin changes her own password", s.ChangePassword(ctx, "erin", "newer-password"), "")
	wantCode(t, "erin changes alice's password", s.ChangePassword(ctx, "alice", "newer-password"), hsm.CodePermission)
	// Fewer than 5 failures then a success resets the count.
	for i := 0; i < 4; i++ {
		f.b.Login(ctx, hsm.Credentials{User: "bob", Password: "wrong-password"})
	}
	s2 := f.login(hsm.Credentials{User: "bob", Password: userPassword})
	s2.Logout(ctx)
	for i := 0; i < 4; i++ {
		f.b.Login(ctx, hsm.Credentials{User: "bob", Password: "wrong-password"})
	}
	f.login(hsm.Credentials{User: "bob", Password: userPassword})
	// Logout is idempotent; a logged-out session refuses work.
	wantCode(t, "logout", s.Logout(ctx), "")
	wantCode(t, "logout twice", s.Logout(ctx), "")
	_, err = s.ListKeys(ctx, hsm.Filter{})
	if err == nil {
		t.Error("a logged-out session still lists keys")
	}
}

func testUsers(t *testing.T, h Harness) {
	f := newFixture(t, h)
	ctx := ctxT(t)
	wantCode(t, "crypto user creates a user", f.alice.CreateUser(ctx, "mallory", hsm.RoleCryptoOfficer, userPassword), hsm.CodePermission)
	wantCode(t, "create an existing user", f.co.CreateUser(ctx, "alice", hsm.RoleCryptoUser, userPassword), hsm.CodeExists)
	users, err := f.co.ListUsers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, u := range users {
		names = append(names, u.Name)
	}
	if got := strings.Join(names, ","); !strings.Contains(got, "alice,bob,carol,dave") {
		t.Errorf("ListUsers = %s, want alice,bob,carol,dave among them, ordered", got)
	}
	_, err = f.co.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 256})
	wantCode(t, "crypto officer generates a key", err, hsm.CodePermission)
	aesKey(t, f.alice, "a1", nil)
	aesKey(t, f.alice, "a2", nil)
	err = wantCode(t, "delete a user who owns keys", f.co.DeleteUser(ctx, "alice"), hsm.CodePermission)
	mentions(t, "delete a user who owns keys", err, "alice", "2 keys")
	wantCode(t, "delete carol", f.co.DeleteUser(ctx, "carol"), "")
	wantCode(t, "delete carol again", f.co.DeleteUser(ctx, "carol"), hsm.CodeNotFound)
	wantCode(t, "crypto user deletes a user", f.alice.DeleteUser(ctx, "dave"), hsm.CodePermission)
}
