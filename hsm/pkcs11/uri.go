package pkcs11

import (
	"encoding/hex"
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// URI is a parsed RFC 7512 PKCS#11 URI: which module to load, which token
// of it to use and, optionally, which objects on it keymig sees.
type URI struct {
	Token        string // token=: the token label
	Manufacturer string // manufacturer=
	Serial       string // serial=
	Model        string // model=
	SlotID       *uint  // slot-id=
	Object       string // object=: only keys with this CKA_LABEL
	ID           []byte // id=: only keys with this CKA_ID
	Type         string // type=: secret-key, private, public (RFC 7512 names)
	ModulePath   string // module-path=: the module's file
}

// pinHelp says where PINs go; every refusal of a PIN in a URI ends with it.
const pinHelp = "keymig never reads a PIN from a URI (it would be seen in shell history and the process list): " +
	"set KEYMIG_PIN (KEYMIG_SOURCE_PIN or KEYMIG_TARGET_PIN for plan, migrate and verify), " +
	"pass --pin-file FILE (a file only you can read), or type it at the prompt"

// IsURI reports whether s names a PKCS#11 token rather than a directory.
func IsURI(s string) bool { return strings.HasPrefix(strings.ToLower(s), "pkcs11:") }

// ParseURI parses s, an RFC 7512 URI such as
// pkcs11:token=legacy;object=payments?module-path=/usr/lib/softhsm/libsofthsm2.so.
// A URI carrying a PIN (pin-value, pin-source) is refused, with an error
// that says where PINs go and never repeats the URI.
func ParseURI(s string) (URI, error) {
	var u URI
	// Look for a PIN first, anywhere: no error may quote a URI that has one.
	for _, name := range []string{"pin-value", "pin-source"} {
		if strings.Contains(strings.ToLower(s), name) {
			return URI{}, fmt.Errorf("the PKCS#11 URI has %s: %s", name, pinHelp)
		}
	}
	rest, ok := cutPrefixFold(s, "pkcs11:")
	if !ok {
		return u, fmt.Errorf("%q is not a PKCS#11 URI: it must start with pkcs11:", s)
	}
	path, query, _ := strings.Cut(rest, "?")
	if i := strings.IndexByte(query, '#'); i >= 0 {
		query = query[:i]
	}
	if path != "" {
		for _, part := range strings.Split(path, ";") {
			name, raw, ok := strings.Cut(part, "=")
			if !ok {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: path attribute %q needs a value (NAME=VALUE)", s, part)
			}
			v, err := unescape(raw)
			if err != nil {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: attribute %s: %v", s, name, err)
			}
			switch strings.ToLower(name) {
			case "token":
				u.Token = v
			case "manufacturer":
				u.Manufacturer = v
			case "serial":
				u.Serial = v
			case "model":
				u.Model = v
			case "object":
				u.Object = v
			case "id":
				// RFC 7512 percent-encodes the bytes of an id (id=%01%02);
				// plain hex (id=0102), as pkcs11-tool prints ids, is read as hex.
				u.ID = []byte(v)
				if b, err := hex.DecodeString(raw); err == nil && len(b) > 0 {
					u.ID = b
				}
			case "type":
				switch v {
				case "secret-key", "private", "public":
					u.Type = v
				default:
					return URI{}, fmt.Errorf("PKCS#11 URI %q: type=%s: keymig moves keys; want secret-key, private or public", s, v)
				}
			case "slot-id":
				n, err := strconv.ParseUint(v, 10, 32)
				if err != nil {
					return URI{}, fmt.Errorf("PKCS#11 URI %q: slot-id=%s is not a number", s, v)
				}
				id := uint(n)
				u.SlotID = &id
			case "library-manufacturer", "library-description", "library-version", "slot-description", "slot-manufacturer":
				// Describe the module or slot; the module path and token already pick them.
			default:
				if !strings.HasPrefix(strings.ToLower(name), "x-") {
					return URI{}, fmt.Errorf("PKCS#11 URI %q: unknown attribute %q (RFC 7512 path attributes: token, manufacturer, serial, model, object, id, type, slot-id)", s, name)
				}
			}
		}
	}
	if query != "" {
		for _, part := range strings.Split(query, "&") {
			name, raw, ok := strings.Cut(part, "=")
			if !ok {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: query attribute %q needs a value (NAME=VALUE)", s, part)
			}
			v, err := unescape(raw)
			if err != nil {
				return URI{}, fmt.Errorf("PKCS#11 URI %q: attribute %s: %v", s, name, err)
			}
			switch strings.ToLower(name) {
			case "module-path":
				u.ModulePath = v
			case "module-name":
				return URI{}, fmt.Errorf("PKCS#11 URI %q: module-name is not supported; give the module file with module-path=/path/to/module.so", s)
			default:
				if !strings.HasPrefix(strings.ToLower(name), "x-") {
					return URI{}, fmt.Errorf("PKCS#11 URI %q: unknown query attribute %q (keymig reads module-path)", s, name)
				}
			}
		}
	}
	if u.ModulePath == "" {
		return URI{}, fmt.Errorf("PKCS#11 URI %q names no module: add ?module-path=/path/to/module.so (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)", s)
	}
	if u.Token == "" && u.Serial == "" && u.SlotID == nil {
		return URI{}, fmt.Errorf("PKCS#11 URI %q names no token: add token=LABEL (or serial= or slot-id=)", s)
	}
	return u, nil
}

// String is the URI in canonical form. It never holds a PIN.
func (u URI) String() string {
	var path []string
	add := func(name, v string) {
		if v != "" {
			path = append(path, name+"="+escape(v))
		}
	}
	add("token", u.Token)
	add("manufacturer", u.Manufacturer)
	add("serial", u.Serial)
	add("model", u.Model)
	if u.SlotID != nil {
		path = append(path, "slot-id="+strconv.FormatUint(uint64(*u.SlotID), 10))
	}
	add("object", u.Object)
	if len(u.ID) > 0 {
		var b strings.Builder
		for _, c := range u.ID {
			fmt.Fprintf(&b, "%%%02x", c)
		}
		path = append(path, "id="+b.String())
	}
	add("type", u.Type)
	return "pkcs11:" + strings.Join(path, ";") + "?module-path=" + escape(u.ModulePath)
}

// Name is how messages name the token: its label, or its serial or slot.
func (u URI) Name() string {
	switch {
	case u.Token != "":
		return u.Token
	case u.Serial != "":
		return "serial " + u.Serial
	case u.SlotID != nil:
		return fmt.Sprintf("slot %d", *u.SlotID)
	}
	return "?"
}

func unescape(s string) (string, error) {
	v, err := url.PathUnescape(s)
	if err != nil {
		return "", fmt.Errorf("bad percent-encoding in %q", s)
	}
	return v, nil
}

// escape percent-encodes what RFC 7512 does not allow as is in a value.
func escape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~:[]@!$'()*+,/", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}
