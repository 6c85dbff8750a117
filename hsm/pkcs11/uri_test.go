package pkcs11

import (
	"bytes"
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	u, err := ParseURI("pkcs11:token=legacy%20hsm;object=pay;id=%01%02;type=secret-key?module-path=/usr/lib/softhsm/libsofthsm2.so")
	if err != nil {
		t.Fatal(err)
	}
	if u.Token != "legacy hsm" || u.Object != "pay" || !bytes.Equal(u.ID, []byte{1, 2}) || u.Type != "secret-key" || u.ModulePath != "/usr/lib/softhsm/libsofthsm2.so" {
		t.Fatalf("parsed %+v", u)
	}
	again, err := ParseURI(u.String())
	if err != nil || again.String() != u.String() {
		t.Fatalf("round trip: %q → %+v, %v", u.String(), again, err)
	}
	if u, err := ParseURI("pkcs11:token=a;id=0a0b?module-path=/m.so"); err != nil || !bytes.Equal(u.ID, []byte{10, 11}) {
		t.Fatalf("hex id: %+v %v", u, err)
	}
}

func TestParseURIRefusesPIN(t *testing.T) {
	for _, s := range []string{
		"pkcs11:token=legacy?module-path=/m.so&pin-value=s3cret-1234",
		"pkcs11:token=legacy?pin-value=s3cret-1234&module-path=/m.so",
		"pkcs11:token=legacy?module-path=/m.so&PIN-VALUE=s3cret-1234",
		"pkcs11:token=legacy?module-path=/m.so&pin-source=file:/tmp/s3cret-1234",
	} {
		_, err := ParseURI(s)
		if err == nil {
			t.Fatalf("%s: accepted", s)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("the error repeats the PIN: %v", err)
		}
		for _, want := range []string{"KEYMIG_PIN", "KEYMIG_SOURCE_PIN", "--pin-file", "prompt"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %q does not say %s", s, err, want)
			}
		}
	}
}

func TestParseURIErrors(t *testing.T) {
	for s, want := range map[string]string{
		"/srv/hsm":                          "not a PKCS#11 URI",
		"pkcs11:token=a":                    "module-path",
		"pkcs11:object=x?module-path=/m.so": "names no token",
		"pkcs11:token=a;colour=red?module-path=/m.so": "unknown attribute",
		"pkcs11:token=a;type=data?module-path=/m.so":  "type=data",
		"pkcs11:token=%zz?module-path=/m.so":          "percent-encoding",
		"pkcs11:token=a?module-name=softhsm2":         "module-name",
	} {
		_, err := ParseURI(s)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want one saying %q", s, err, want)
		}
	}
}

// FuzzParseURI checks that the parser never panics, never accepts a URI
// with a PIN, never echoes one, and that what it accepts round-trips.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"pkcs11:token=legacy;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so",
		"pkcs11:token=a;id=%01%02;type=private?module-path=/m.so",
		"pkcs11:serial=1234;slot-id=3?module-path=/m.so&x-vendor=1",
		"pkcs11:token=a?module-path=/m.so&pin-value=1234",
		"PKCS11:token=a%3Bb?module-path=/m%20.so#frag",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if l := strings.ToLower(s); (strings.Contains(l, "pin-value") || strings.Contains(l, "pin-source")) && strings.Contains(err.Error(), s) && !strings.Contains("the PKCS#11 URI has pin-value pin-source: "+pinHelp, s) {
				t.Fatalf("the error quotes a URI with a PIN: %v", err)
			}
			return
		}
		if strings.Contains(strings.ToLower(s), "pin-value") {
			t.Fatalf("accepted a URI with a PIN: %q", s)
		}
		again, err := ParseURI(u.String())
		if err != nil {
			t.Fatalf("%q parsed, but its canonical form %q does not: %v", s, u.String(), err)
		}
		if again.String() != u.String() {
			t.Fatalf("canonical form not stable: %q → %q", u.String(), again.String())
		}
	})
}
