package wrap

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Interoperability with the openssl CLI, in both directions: what the AWS
// KMS and Google Cloud KMS import guides tell users to run is what our blobs
// must match.

func needOpenSSL(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl is not on PATH; skipping the interoperability tests (install OpenSSL 3 to run them)")
	}
}

// openssl runs the openssl CLI with args and fails the test on error.
func openssl(t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.Command("openssl", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
}

// writeTemp writes data to a new file in dir and returns its path.
func writeTemp(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// keyFiles writes the PEM private and public halves of the RSA test key.
func keyFiles(t *testing.T, dir string, bits int) (privPath, pubPath string) {
	t.Helper()
	priv := rsaKey(t, bits)
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	spki, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	privPath = writeTemp(t, dir, fmt.Sprintf("rsa%d.pem", bits), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	pubPath = writeTemp(t, dir, fmt.Sprintf("rsa%d.pub.pem", bits), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki}))
	return privPath, pubPath
}

func oaepOpts(p OAEPParams) []string {
	args := []string{"-pkeyopt", "rsa_padding_mode:oaep",
		"-pkeyopt", "rsa_oaep_md:" + HashName(p.hash()),
		"-pkeyopt", "rsa_mgf1_md:" + HashName(p.mgf1Hash())}
	if len(p.Label) > 0 {
		args = append(args, "-pkeyopt", "rsa_oaep_label:"+hex.EncodeToString(p.Label))
	}
	return args
}

// interopPayloads are a 16-byte and a 32-byte AES key and a PKCS#8 RSA-2048
// private key.
func interopPayloads(t *testing.T) map[string][]byte {
	pkcs8, err := MarshalPKCS8(rsaKey(t, 2048))
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]byte{"aes128": seq(16), "aes256": seq(32), "pkcs8-rsa2048": pkcs8}
}

func TestOpenSSLOAEP(t *testing.T) {
	needOpenSSL(t)
	dir := t.TempDir()
	for _, bits := range testKeyBits {
		privPath, pubPath := keyFiles(t, dir, bits)
		priv := rsaKey(t, bits)
		for _, p := range []OAEPParams{
			{Hash: crypto.SHA1, MGF1Hash: crypto.SHA1},
			{Hash: crypto.SHA256, MGF1Hash: crypto.SHA256},
			{Hash: crypto.SHA256, MGF1Hash: crypto.SHA1},
			{Hash: crypto.SHA256, MGF1Hash: crypto.SHA1, Label: []byte("keymig label")},
		} {
			name := fmt.Sprintf("rsa%d_%s_mgf1%s_label%d", bits, HashName(p.Hash), HashName(p.MGF1Hash), len(p.Label))
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				payload := seq(32)
				in := writeTemp(t, dir, name+".in", payload)

				// openssl -> us
				enc := filepath.Join(dir, name+".ossl")
				openssl(t, append([]string{"pkeyutl", "-encrypt", "-pubin", "-inkey", pubPath, "-in", in, "-out", enc}, oaepOpts(p)...)...)
				got, err := UnwrapOAEP(priv, readFile(t, enc), p)
				if err != nil || !bytes.Equal(got, payload) {
					t.Fatalf("UnwrapOAEP(openssl blob) = %x, %v", got, err)
				}

				// us -> openssl
				blob, err := WrapOAEP(&priv.PublicKey, payload, p)
				if err != nil {
					t.Fatal(err)
				}
				ours := writeTemp(t, dir, name+".ours", blob)
				dec := filepath.Join(dir, name+".dec")
				openssl(t, append([]string{"pkeyutl", "-decrypt", "-inkey", privPath, "-in", ours, "-out", dec}, oaepOpts(p)...)...)
				if got := readFile(t, dec); !bytes.Equal(got, payload) {
					t.Fatalf("openssl decrypted %x, want %x", got, payload)
				}
			})
		}
	}
}

func TestOpenSSLKeyWrap(t *testing.T) {
	needOpenSSL(t)
	dir := t.TempDir()
	payloads := interopPayloads(t)
	payloads["7bytes"] = seq(7)
	for _, kekBits := range []int{128, 192, 256} {
		kek := seq(kekBits / 8)
		for pname, payload := range payloads {
			for _, pad := range []bool{true, false} {
				if !pad && (len(payload)%8 != 0 || len(payload) < 16) {
					continue
				}
				cipherName, iv := fmt.Sprintf("-id-aes%d-wrap-pad", kekBits), "A65959A6"
				wrapFn, unwrapFn := KeyWrapPad, KeyUnwrapPad
				if !pad {
					cipherName, iv = fmt.Sprintf("-id-aes%d-wrap", kekBits), "A6A6A6A6A6A6A6A6"
					wrapFn, unwrapFn = KeyWrap, KeyUnwrap
				}
				name := fmt.Sprintf("%s_%s", strings.TrimPrefix(cipherName, "-"), pname)
				t.Run(name, func(t *testing.T) {
					t.Parallel()
					in := writeTemp(t, dir, name+".in", payload)
					ossl := filepath.Join(dir, name+".ossl")
					openssl(t, "enc", cipherName, "-iv", iv, "-K", hex.EncodeToString(kek), "-in", in, "-out", ossl)
					want, err := wrapFn(kek, payload)
					if err != nil {
						t.Fatal(err)
					}
					// Key wrap is deterministic: the blobs must be identical.
					if got := readFile(t, ossl); !bytes.Equal(got, want) {
						t.Fatalf("openssl wrapped %x, we wrap %x", got, want)
					}
					if got, err := unwrapFn(kek, readFile(t, ossl)); err != nil || !bytes.Equal(got, payload) {
						t.Fatalf("unwrapping the openssl blob = %x, %v", got, err)
					}
					ours := writeTemp(t, dir, name+".ours", want)
					dec := filepath.Join(dir, name+".dec")
					openssl(t, "enc", "-d", cipherName, "-iv", iv, "-K", hex.EncodeToString(kek), "-in", ours, "-out", dec)
					if got := readFile(t, dec); !bytes.Equal(got, payload) {
						t.Fatalf("openssl unwrapped %x, want %x", got, payload)
					}
				})
			}
		}
	}
}

// TestOpenSSLRSAAES builds CKM_RSA_AES_KEY_WRAP blobs the way the AWS KMS and
// Google Cloud KMS import guides do (pkeyutl for the ephemeral key, enc
// -id-aes256-wrap-pad for the payload, concatenate) and takes ours apart the
// same way.
func TestOpenSSLRSAAES(t *testing.T) {
	needOpenSSL(t)
	dir := t.TempDir()
	payloads := interopPayloads(t)
	for _, bits := range testKeyBits {
		privPath, pubPath := keyFiles(t, dir, bits)
		priv := rsaKey(t, bits)
		for _, h := range []crypto.Hash{crypto.SHA1, crypto.SHA256} {
			p := RSAAESParams{OAEP: OAEPParams{Hash: h, MGF1Hash: h}}
			for pname, payload := range payloads {
				name := fmt.Sprintf("rsa%d_%s_%s", bits, HashName(h), pname)
				t.Run(name, func(t *testing.T) {
					t.Parallel()
					in := writeTemp(t, dir, name+".in", payload)

					// openssl -> us
					eph := seq(32)
					for i := range eph {
						eph[i] ^= byte(bits)
					}
					ephPath := writeTemp(t, dir, name+".eph", eph)
					head := filepath.Join(dir, name+".head")
					tail := filepath.Join(dir, name+".tail")
					openssl(t, append([]string{"pkeyutl", "-encrypt", "-pubin", "-inkey", pubPath, "-in", ephPath, "-out", head}, oaepOpts(p.OAEP)...)...)
					openssl(t, "enc", "-id-aes256-wrap-pad", "-iv", "A65959A6", "-K", hex.EncodeToString(eph), "-in", in, "-out", tail)
					blob := append(readFile(t, head), readFile(t, tail)...)
					got, err := UnwrapRSAAES(priv, blob, p)
					if err != nil || !bytes.Equal(got, payload) {
						t.Fatalf("UnwrapRSAAES(openssl blob) = %x, %v", got, err)
					}

					// us -> openssl
					ours, err := WrapRSAAES(&priv.PublicKey, payload, p)
					if err != nil {
						t.Fatal(err)
					}
					k := priv.Size()
					oursHead := writeTemp(t, dir, name+".ours.head", ours[:k])
					oursTail := writeTemp(t, dir, name+".ours.tail", ours[k:])
					ephOut := filepath.Join(dir, name+".eph.out")
					openssl(t, append([]string{"pkeyutl", "-decrypt", "-inkey", privPath, "-in", oursHead, "-out", ephOut}, oaepOpts(p.OAEP)...)...)
					ephKey := readFile(t, ephOut)
					if len(ephKey) != 32 {
						t.Fatalf("ephemeral key is %d bytes, want 32", len(ephKey))
					}
					dec := filepath.Join(dir, name+".dec")
					openssl(t, "enc", "-d", "-id-aes256-wrap-pad", "-iv", "A65959A6", "-K", hex.EncodeToString(ephKey), "-in", oursTail, "-out", dec)
					if got := readFile(t, dec); !bytes.Equal(got, payload) {
						t.Fatalf("openssl unwrapped %x, want %x", got, payload)
					}
				})
			}
		}
	}
}
