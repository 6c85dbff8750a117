package plan

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/keymig/keymig/hsm"
)

// FormatVersion is the plan file format this package writes and reads.
const FormatVersion = 1

// TransportLabelPrefix starts the label of every key keymig makes for its
// own use (transport keys, session KEKs); such keys are never planned and
// never count as inventory.
const TransportLabelPrefix = "keymig-transport"

// Action is what a plan does with a key.
type Action string

// The actions.
const (
	Transfer Action = "transfer" // wrap on the source, unwrap on the target
	Sync     Action = "sync"     // masked copy between clones, handle kept
	Skip     Action = "skip"     // already on the target with the same id and KCV
	Blocked  Action = "blocked"  // cannot move; Reason says why and what to do
	// Rotate is for a master key that cannot leave its HSM but whose data
	// keys were given (--datakeys): a new key with its label, id and
	// attributes is made on the target and every data key is re-encrypted
	// under it inside the HSMs.
	Rotate Action = "rotate"
)

// Method is how a transfer or sync moves a key.
type Method string

// The methods.
const (
	MethodRSAOAEP    Method = "rsa-oaep"    // one RSA-OAEP wrap per key; secret keys that fit
	MethodRSAAES     Method = "rsa-aes"     // CKM_RSA_AES_KEY_WRAP per key; anything, private keys as PKCS#8
	MethodSessionKEK Method = "session-kek" // one RSA-OAEP per run, then AES-KWP per key
	MethodPublic     Method = "public"      // public keys: export and import PEM
	MethodMasked     Method = "masked"      // masked object between clones
)

// Reason codes of blocked keys; each comes with a sentence in Item.Reason.
const (
	ReasonNotExtractable  = "not-extractable"
	ReasonNotOwner        = "not-owner"
	ReasonSessionKey      = "session-key"
	ReasonNotFIPS         = "not-fips"
	ReasonUserMissing     = "user-missing"
	ReasonCapacity        = "target-capacity"
	ReasonConflict        = "id-conflict"
	ReasonWrapWithTrusted = "wrap-with-trusted"
	ReasonNoID            = "no-id"
	ReasonUnsynced        = "not-synchronised"
	ReasonDataKeys        = "datakeys" // a data-key file cannot be rotated as it is
	ReasonNoKCV           = "no-check-value"
)

// Options are the choices a user made when planning.
type Options struct {
	Filter    []string `json:"filter,omitempty"`
	Transport string   `json:"transport"` // auto, rsa-aes, rsa-oaep, session-kek
	// Hash is the OAEP hash of the transport; "" lets plan pick sha256,
	// or the strongest both sides take when one does not (a PKCS#11 token
	// may take sha1 only).
	Hash          string `json:"hash"`
	TransportBits int    `json:"transport-bits"`
	// DataKeys are the data-key files of master keys that cannot leave
	// their HSM, by master label.
	DataKeys []DataKeys `json:"datakeys,omitempty"`
	// Advice, if set, says what a user should do about a key blocked with
	// a reason code, in the caller's words for its own options (the CLI
	// names its flags); "" keeps plan's own advice. It is not part of the
	// plan file.
	Advice func(code string, it Item) string `json:"-"`
}

// advise is the caller's advice for a key blocked with code, or def.
func (o Options) advise(code string, it Item, def string) string {
	if o.Advice != nil {
		if a := o.Advice(code, it); a != "" {
			return a
		}
	}
	return def
}

// OptionError is an option Build cannot use. Option is its name in the
// plan file's options (transport, hash, transport-bits, datakeys); the
// CLI shows it as the flag that set it.
type OptionError struct {
	Option  string
	Value   string
	Problem string
}

// Error names the option, its value and what is wrong.
func (e *OptionError) Error() string {
	return fmt.Sprintf("option %s %s: %s", e.Option, e.Value, e.Problem)
}

// withDefaults fills in the options left empty.
func (o Options) withDefaults() Options {
	if o.TransportBits == 0 {
		o.TransportBits = 3072
	}
	if o.Transport == "" {
		o.Transport = "auto"
	}
	return o
}

// hashSizes are the OAEP hashes a plan may choose, by their output size.
var hashSizes = map[string]int{"sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}

// Validate checks the options, with defaults filled in, before any
// cluster is asked anything.
func (o Options) Validate() error {
	o = o.withDefaults()
	if _, err := hsm.ParseFilter(o.Filter); err != nil {
		return err
	}
	switch o.Transport {
	case "auto", string(MethodRSAAES), string(MethodRSAOAEP), string(MethodSessionKEK):
	default:
		return &OptionError{"transport", fmt.Sprintf("%q", o.Transport), "want auto, rsa-aes, rsa-oaep or session-kek"}
	}
	if o.TransportBits < 2048 || o.TransportBits > 4096 || o.TransportBits%1024 != 0 {
		return &OptionError{"transport-bits", fmt.Sprint(o.TransportBits), "want 2048, 3072 or 4096"}
	}
	if _, ok := hashSizes[o.Hash]; !ok && o.Hash != "" {
		return &OptionError{"hash", fmt.Sprintf("%q", o.Hash), "want sha1, sha224, sha256, sha384 or sha512"}
	}
	_, err := dataKeysByLabel(o.DataKeys)
	return err
}

// DataKeys is a data-key file given for a master key (--datakeys
// LABEL=FILE), as read when planning. It holds counts and a digest, never
// a ciphertext.
type DataKeys struct {
	Label   string `json:"master-label"`
	In      string `json:"in"`
	Out     string `json:"out"` // where migrate writes the rotated file
	SHA256  string `json:"in-sha256"`
	Records int64  `json:"records"`
	Bad     int64  `json:"bad-lines"`
	// Problem is the first bad line, with its number, when Bad > 0.
	Problem string `json:"first-problem,omitempty"`
	// Table says In is the address of a data-key table (a postgres:// URL
	// naming the table, never with a password), rotated where it is: Out
	// is the same address, Records the rows under the master when planned,
	// Bad the rows rotate would reject. A live table has no SHA256.
	Table bool `json:"table,omitempty"`
}

// Route says where the data keys are read and the rotated ones written,
// for messages: "from FILE into FILE.rotated", "in the table ADDRESS".
func (dk DataKeys) Route() string {
	if dk.Table {
		return "in the table " + dk.In
	}
	return fmt.Sprintf("from %s into %s", dk.In, dk.Out)
}

// Cluster records one side of the plan.
type Cluster struct {
	Dir       string `json:"dir"`
	ID        string `json:"cluster-id"`
	Region    string `json:"region"`
	Lineage   string `json:"lineage"`
	User      string `json:"user"`
	FIPS      bool   `json:"fips"`
	Capacity  int    `json:"key-capacity"`
	Keys      int    `json:"token-keys"`
	Inventory string `json:"inventory-digest"`
}

// Item is one source key and what the plan does with it.
type Item struct {
	Ref        hsm.KeyRef     `json:"key-reference"`
	Label      string         `json:"label"`
	ID         hsm.Bytes      `json:"id"`
	Class      hsm.Class      `json:"class"`
	Type       hsm.KeyType    `json:"key-type"`
	Bits       int            `json:"size-bits"`
	Curve      string         `json:"curve,omitempty"`
	Attrs      hsm.Attributes `json:"attributes"`
	KCV        hsm.Bytes      `json:"check-value"`
	Owner      string         `json:"owner"`
	Shares     []string       `json:"shared-users"`
	Action     Action         `json:"action"`
	Method     Method         `json:"method,omitempty"`
	ReasonCode string         `json:"reason-code,omitempty"`
	Reason     string         `json:"reason,omitempty"`
	TargetRef  hsm.KeyRef     `json:"target-key-reference,omitempty"` // skip: the key already there; rotate: the new master, if made
	Rotation   *DataKeys      `json:"rotation,omitempty"`             // rotate: the data keys to re-encrypt
	// NotPreserved says what of the key the target cannot keep (its shares,
	// on a backend without them); the key moves without it.
	NotPreserved string `json:"not-preserved,omitempty"`
}

// Key is the item's journal key: its source handle.
func (it Item) Key() string { return it.Ref.String() }

// Transport is the run-wide transport choice and why it was made.
type Transport struct {
	Method Method `json:"method"`
	Why    string `json:"why"`
	Hash   string `json:"hash"`
	Bits   int    `json:"bits"`
}

// Plan is a classified migration, as written to a plan file.
type Plan struct {
	Format    int       `json:"format-version"`
	Created   time.Time `json:"created"`
	Source    Cluster   `json:"source"`
	Target    Cluster   `json:"target"`
	Options   Options   `json:"options"`
	Transport Transport `json:"transport"`
	Items     []Item    `json:"items"`
	Digest    string    `json:"digest"`
}

// Counts returns how many items take each action.
func (p *Plan) Counts() map[Action]int {
	c := map[Action]int{}
	for _, it := range p.Items {
		c[it.Action]++
	}
	return c
}

// Work is the number of items that change the target.
func (p *Plan) Work() int {
	c := p.Counts()
	return c[Transfer] + c[Sync] + c[Rotate]
}

// canonical is the plan's JSON with an empty digest: compact, fields in
// declaration order, no map iteration — the bytes the digest covers.
func (p *Plan) canonical() ([]byte, error) {
	q := *p
	q.Digest = ""
	return json.Marshal(&q)
}

// Seal computes and sets the plan's digest.
func (p *Plan) Seal() error {
	b, err := p.canonical()
	if err != nil {
		return err
	}
	sum := sha256.Sum256(b)
	p.Digest = "sha256:" + hex.EncodeToString(sum[:])
	return nil
}

// ShortDigest is the first 12 hex digits of the digest, for names.
func (p *Plan) ShortDigest() string {
	d := strings.TrimPrefix(p.Digest, "sha256:")
	return d[:min(12, len(d))]
}

// Write writes the sealed plan as indented JSON.
func (p *Plan) Write(w io.Writer) error {
	if p.Digest == "" {
		if err := p.Seal(); err != nil {
			return err
		}
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(p)
}

// ErrTampered reports a plan whose content does not match its digest.
var ErrTampered = errors.New("plan does not match its digest")

// Decode parses a plan and checks its format and digest. Every parse or
// digest failure is an error that wraps ErrTampered or says what is wrong.
func Decode(data []byte) (*Plan, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var p Plan
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("not a keymig plan (%v): %w", err, ErrTampered)
	}
	if dec.More() {
		return nil, fmt.Errorf("trailing data after the plan: %w", ErrTampered)
	}
	want := p.Digest
	if err := p.Seal(); err != nil {
		return nil, err
	}
	if want != p.Digest {
		return nil, fmt.Errorf("its content was changed after planning (digest %s, content hashes to %s): %w", short(want), short(p.Digest), ErrTampered)
	}
	if p.Format != FormatVersion {
		return nil, fmt.Errorf("plan format version %d; this keymig reads %d: re-plan with this keymig", p.Format, FormatVersion)
	}
	seen := make(map[hsm.KeyRef]bool, len(p.Items))
	for _, it := range p.Items {
		if it.Ref == 0 || seen[it.Ref] {
			return nil, fmt.Errorf("item %s is missing a handle or listed twice: %w", it.Ref, ErrTampered)
		}
		seen[it.Ref] = true
	}
	return &p, nil
}

func short(d string) string {
	d = strings.TrimPrefix(d, "sha256:")
	if len(d) > 12 {
		return d[:12] + "…"
	}
	return d
}

// Read reads and checks the plan file at path; errors name the file and
// say how to re-plan.
func Read(path string) (*Plan, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read plan: %w", err)
	}
	p, err := Decode(data)
	if err != nil {
		if errors.Is(err, ErrTampered) {
			return nil, fmt.Errorf("plan %s: %w; make a new one with keymig plan", path, err)
		}
		return nil, fmt.Errorf("plan %s: %w", path, err)
	}
	return p, nil
}

// InventoryDigest hashes what a plan depends on in keys: handle, label, id,
// class, type, size, attributes, KCV, owner and shares, in handle order.
// Keys keymig made for itself are left out.
func InventoryDigest(keys []hsm.KeyInfo) string {
	sorted := make([]hsm.KeyInfo, 0, len(keys))
	for _, k := range keys {
		if !strings.HasPrefix(k.Label, TransportLabelPrefix) {
			sorted = append(sorted, k)
		}
	}
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Ref < sorted[j].Ref })
	h := sha256.New()
	enc := json.NewEncoder(h)
	for _, k := range sorted {
		shares := append([]string(nil), k.SharedWith...)
		sort.Strings(shares)
		enc.Encode([]any{k.Ref, k.Label, k.ID, k.Class, k.Type, k.Bits, k.Curve, k.Attrs, k.KCV, k.Owner, shares})
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}
