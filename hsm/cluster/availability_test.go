package cluster

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/keymig/keymig/hsm"
)

// Rule 6: with one HSM of two down, no token key can be created, by any of
// the calls that make one, and nothing is left behind.
func TestCreateRefusedWithoutQuorum(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	ids := hsmIDs(c)
	s := login(t, c, alice)
	kek := genAES(t, s, "kek", nil)
	blob, err := s.WrapKey(ctx, hsm.WrapRequest{Mechanism: hsm.MechAESKWP, WrappingKey: kek.Ref, Payload: genAES(t, s, "payload", nil).Ref})
	if err != nil {
		t.Fatal(err)
	}
	pubPEM, err := s.ExportPublicKey(ctx, func() hsm.KeyRef {
		pub, _, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-256"})
		if err != nil {
			t.Fatal(err)
		}
		return pub.Ref
	}())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetFault(ids[1], hsm.Fault{Down: true}); err != nil {
		t.Fatal(err)
	}
	before, _ := c.memberByID(ids[0]).m.PeerListKeys(ctx)
	creates := []struct {
		name string
		run  func() error
	}{
		{"generate", func() error { _, err := s.GenerateKey(ctx, aesSpec("during", nil)); return err }},
		{"generate-key-pair", func() error {
			_, _, err := s.GenerateKeyPair(ctx, hsm.KeyPairSpec{Type: hsm.TypeEC, Curve: "P-256"})
			return err
		}},
		{"unwrap", func() error {
			_, err := s.UnwrapKey(ctx, hsm.UnwrapRequest{Mechanism: hsm.MechAESKWP, UnwrappingKey: kek.Ref, Blob: blob, Class: hsm.ClassSecret, Type: hsm.TypeAES})
			return err
		}},
		{"import-public-key", func() error { _, err := s.ImportPublicKey(ctx, pubPEM, hsm.Template{}); return err }},
	}
	for _, tc := range creates {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			if !errors.Is(err, hsm.ErrQuorum) || !hsm.IsRetryable(err) {
				t.Fatalf("%s with %s down: %v, want a retryable quorum error", tc.name, ids[1], err)
			}
			for _, part := range []string{"does not meet the availability requirements", "at least 2 HSMs", ids[1], "nothing was created"} {
				if !strings.Contains(strings.ReplaceAll(err.Error(), "would not meet", "does not meet"), part) {
					t.Errorf("error %q does not mention %q", err, part)
				}
			}
		})
	}
	after, _ := c.memberByID(ids[0]).m.PeerListKeys(ctx)
	if len(after) != len(before) {
		t.Errorf("refused creates left %d keys behind on %s", len(after)-len(before), ids[0])
	}
	// A session key needs no quorum.
	if _, err := s.GenerateKey(ctx, hsm.KeySpec{Type: hsm.TypeAES, Bits: 128, Template: hsm.Template{Session: true}}); err != nil {
		t.Errorf("session key with one HSM down: %v", err)
	}
}

// Rule 7: a key on one HSM only is copied to a reachable HSM that lacks it
// before it is used; while that HSM is down, CloudHSM's quorum error.
func TestUseCopiesToReachableHSM(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	ids := hsmIDs(c)
	s := login(t, c, alice)
	k := genAES(t, s, "k", nil)
	// ids[1] lost the key (as after a crash between create and copy); a
	// new process learns that from the HSMs.
	if err := c.memberByID(ids[1]).m.PeerDeleteKey(ctx, k.Ref); err != nil {
		t.Fatal(err)
	}
	dir := c.Dir()
	c.Close()
	if err := SetFault(dir, ids[1], hsm.Fault{Down: true}); err != nil {
		t.Fatal(err)
	}
	c2, err := Open(ctx, dir, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	s2, err := c2.Login(ctx, alice)
	if err != nil {
		t.Fatal(err)
	}
	err = encrypt(ctx, s2, k.Ref)
	if want := hsm.QuorumError("encrypt", k.Ref).Error(); err == nil || err.Error() != want {
		t.Fatalf("encrypt with the other HSM down: %v, want %q", err, want)
	}
	if err := c2.SetFault(ids[1], hsm.Fault{}); err != nil {
		t.Fatal(err)
	}
	if err := encrypt(ctx, s2, k.Ref); err != nil {
		t.Fatalf("encrypt once the HSM is back: %v, want the key copied there first", err)
	}
	if keys, _ := c2.memberByID(ids[1]).m.PeerListKeys(ctx); len(keys) != 1 || keys[0].Ref != k.Ref {
		t.Errorf("%s holds %v, want the key copied", ids[1], keys)
	}
}

// Rule 7: keys and users made while an HSM was down reach it at the next
// Open once it is back, with no manual sync; until then key list says the
// HSM is unreachable, not that it lacks the key.
func TestOpenSyncsReturnedHSM(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3)
	ids := hsmIDs(c)
	dir := c.Dir()
	if err := c.SetFault(ids[2], hsm.Fault{Down: true}); err != nil {
		t.Fatal(err)
	}
	s := login(t, c, alice)
	k := genAES(t, s, "during", nil)
	if got := k.Coverage.String(); got != "unreachable "+ids[2] {
		t.Errorf("coverage of a key made with %s down: %q, want unreachable", ids[2], got)
	}
	co := login(t, c, officer)
	if err := co.CreateUser(ctx, "carol", hsm.RoleCryptoUser, "carol-pw1"); err != nil {
		t.Fatal(err)
	}
	if cfg, _ := readConfig(dir); !slices.Equal(cfg.Behind, []string{ids[2]}) {
		t.Errorf("cluster.json behind = %v, want [%s]", cfg.Behind, ids[2])
	}
	c.Close()
	if err := ClearFault(dir, ids[2]); err != nil {
		t.Fatal(err)
	}
	c2, err := Open(ctx, dir, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	m := c2.memberByID(ids[2])
	if keys, _ := m.m.PeerListKeys(ctx); len(keys) != 1 || keys[0].Ref != k.Ref {
		t.Errorf("after Open %s holds %v, want the key made while it was down", ids[2], keys)
	}
	users, _ := m.m.PeerUsers(ctx)
	if !slices.ContainsFunc(users, func(u hsm.UserRecord) bool { return u.Name == "carol" }) {
		t.Errorf("after Open %s lacks carol", ids[2])
	}
	if cfg, _ := readConfig(dir); len(cfg.Behind) != 0 {
		t.Errorf("cluster.json behind = %v after the sync, want none", cfg.Behind)
	}
}

// stuckPeer is a member whose masked inserts and deletes fail while stuck
// is set, as when an HSM dies between answering a create and the cluster's
// undo of it.
type stuckPeer struct {
	Member
	stuck *atomic.Bool
}

var errStuck = errors.New("injected: the HSM did not take the call")

func (p stuckPeer) PeerInsertMasked(ctx context.Context, blob []byte) (hsm.KeyInfo, error) {
	if p.stuck.Load() {
		return hsm.KeyInfo{}, errStuck
	}
	return p.Member.PeerInsertMasked(ctx, blob)
}

func (p stuckPeer) PeerDeleteKey(ctx context.Context, ref hsm.KeyRef) error {
	if p.stuck.Load() {
		return errStuck
	}
	return p.Member.PeerDeleteKey(ctx, ref)
}

// A create refused because its key reached one HSM, whose undo could not
// delete it there, leaves a key the caller was told was not made: no
// listing or lookup shows it (a caller looking for an earlier attempt
// would adopt it, and Sync would then delete it under them), and the retry
// of the create makes the key again despite the id the undone one holds.
// A new key has a new handle, so the undone one is deleted everywhere
// afterwards; a masked object keeps its handle, so its retry makes the
// very key the record is about, and Sync must leave it.
func TestUndoneCreateIsNeitherListedNorInTheWay(t *testing.T) {
	spec := hsm.KeySpec{Type: hsm.TypeAES, Bits: 256, Template: hsm.Template{Label: "undone", ID: hsm.Bytes("k1")}}
	for _, tc := range []struct {
		name    string
		sameRef bool // the retry makes the key the undo recorded as deleted
		setup   func(t *testing.T, s hsm.FullSession) func() (hsm.KeyInfo, error)
	}{
		{"generate", false, func(t *testing.T, s hsm.FullSession) func() (hsm.KeyInfo, error) {
			return func() (hsm.KeyInfo, error) { return s.GenerateKey(context.Background(), spec) }
		}},
		{"insert-masked", true, func(t *testing.T, s hsm.FullSession) func() (hsm.KeyInfo, error) {
			ctx := context.Background()
			k, err := s.GenerateKey(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			blob, err := s.ExportMasked(ctx, k.Ref)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.DeleteKey(ctx, k.Ref); err != nil {
				t.Fatal(err)
			}
			return func() (hsm.KeyInfo, error) { return s.InsertMasked(ctx, blob) }
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			c := newCluster(t, 2)
			ids := hsmIDs(c)
			var stuck atomic.Bool
			for _, id := range ids {
				m := c.memberByID(id)
				m.m = stuckPeer{Member: m.m, stuck: &stuck}
			}
			s := login(t, c, alice)
			create := tc.setup(t, s)

			stuck.Store(true)
			if _, err := create(); !errors.Is(err, hsm.ErrQuorum) {
				t.Fatalf("create whose copy failed: %v, want a quorum error", err)
			}
			var undone hsm.KeyInfo
			for _, id := range ids {
				keys, _ := c.memberByID(id).m.PeerListKeys(ctx)
				for _, k := range keys {
					if k.Label == "undone" {
						undone = k
					}
				}
			}
			if undone.Ref == 0 {
				t.Fatal("the undo deleted the key although deletes fail: the test sets up nothing")
			}
			if keys, err := s.ListKeys(ctx, hsm.Filter{ID: spec.Template.ID}); err != nil || len(keys) != 0 {
				t.Errorf("listing after the refused create: %v, %v; want no key", keys, err)
			}
			if _, err := s.GetKey(ctx, undone.Ref); !errors.Is(err, hsm.ErrNotFound) {
				t.Errorf("GetKey of the undone key %s: %v, want not found", undone.Ref, err)
			}

			stuck.Store(false)
			k, err := create()
			if err != nil {
				t.Fatalf("retry of the refused create: %v", err)
			}
			if k.Coverage.Count() != 2 {
				t.Errorf("retried key on %s, want both HSMs", k.Coverage)
			}
			if (k.Ref == undone.Ref) != tc.sameRef {
				t.Fatalf("retried key %s, undone key %s: same handle is %v, want %v", k.Ref, undone.Ref, !tc.sameRef, tc.sameRef)
			}
			cfg, _ := readConfig(c.Dir())
			if recorded := slices.Contains(cfg.Deleted, undone.Ref); recorded == tc.sameRef {
				t.Errorf("cluster.json deleted-keys %v: undone key %s recorded is %v, want %v", cfg.Deleted, undone.Ref, recorded, !tc.sameRef)
			}
			if _, err := c.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			for _, id := range ids {
				keys, _ := c.memberByID(id).m.PeerListKeys(ctx)
				for _, got := range keys {
					if got.Ref == undone.Ref && !tc.sameRef {
						t.Errorf("undone key %s still on %s after the retry and a sync", undone.Ref, id)
					}
				}
				if !slices.ContainsFunc(keys, func(got hsm.KeyInfo) bool { return got.Ref == k.Ref }) {
					t.Errorf("retried key %s not on %s after a sync", k.Ref, id)
				}
			}
			if keys, err := s.ListKeys(ctx, hsm.Filter{ID: spec.Template.ID}); err != nil || len(keys) != 1 || keys[0].Ref != k.Ref {
				t.Errorf("listing after the retry and a sync: %v, %v; want %s only", keys, err, k.Ref)
			}
			if cfg, _ := readConfig(c.Dir()); len(cfg.Deleted) != 0 || len(cfg.Behind) != 0 {
				t.Errorf("after Sync cluster.json deleted %v, behind %v; want none", cfg.Deleted, cfg.Behind)
			}
		})
	}
}
