package pkcs11

import (
	"context"
	"testing"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/hsmtest"
	"github.com/keymig/keymig/internal/softhsmtest"
)

// TestConformance runs the contract's suites against SoftHSM2 tokens: the
// core suite in full, and the CloudHSM suite, which skips (saying why)
// what needs users, owners, shares or masked objects.
func TestConformance(t *testing.T) {
	newToken := func(t *testing.T) (hsm.Backend, hsm.Credentials) {
		e := softhsmtest.Shared(t)
		u, err := ParseURI(e.URI(e.NewToken(t, "conf")))
		if err != nil {
			t.Fatal(err)
		}
		tok, err := Open(context.Background(), u, Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tok.Close() })
		return tok, hsm.Credentials{Password: softhsmtest.UserPIN}
	}
	t.Run("Core", func(t *testing.T) { hsmtest.RunCore(t, hsmtest.CoreHarness{New: newToken}) })
	t.Run("CloudHSM", func(t *testing.T) { hsmtest.Run(t, hsmtest.Harness{New: newToken}) })
}
