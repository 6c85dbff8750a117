package cluster

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keymig/keymig/hsm"
)

// 20% throttling on every HSM: a few thousand operations all succeed, and
// the retries are counted.
func TestThrottling(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	s := login(t, c, alice)
	k := genAES(t, s, "k", nil)
	// At 10%, an operation throttled on all 8 tries is a 1-in-10^8 event;
	// at 20% it was about 1 in 400,000, and this test makes 3,200.
	if err := c.SetFault(AllHSMs, hsm.Fault{Throttle: 0.1}); err != nil {
		t.Fatal(err)
	}
	const workers, per = 16, 200
	var failed atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range per {
				if err := encrypt(ctx, s, k.Ref); err != nil {
					failed.Add(1)
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	st := c.Stats()
	t.Logf("%d operations: %+v", workers*per, st)
	if failed.Load() > 0 {
		t.Fatalf("%d operations failed", failed.Load())
	}
	if st.Throttled < workers*per/20 || st.Retries < st.Throttled {
		t.Errorf("throttling not counted: %+v", st)
	}
}

// A throttled answer that persists is returned after a bounded number of
// tries.
func TestThrottlingGivesUp(t *testing.T) {
	c := newCluster(t, 1)
	s := login(t, c, alice)
	k := genAES(t, s, "k", nil)
	c.SetFault(AllHSMs, hsm.Fault{Throttle: 1})
	err := encrypt(context.Background(), s, k.Ref)
	if !errors.Is(err, hsm.ErrThrottled) {
		t.Fatalf("err = %v, want throttled", err)
	}
	if got := c.Stats().Throttled; got != int64(c.retry.attempts) {
		t.Errorf("%d tries, want %d", got, c.retry.attempts)
	}
}

// hookedMember lets a test act at a chosen moment of a member's work.
type hookedMember struct {
	Member
	beforeExport func()
}

func (h *hookedMember) PeerExportMasked(ctx context.Context, ref hsm.KeyRef) ([]byte, error) {
	if h.beforeExport != nil {
		h.beforeExport()
	}
	return h.Member.PeerExportMasked(ctx, ref)
}

// An HSM dies between creating a key and cloning it: the key is reported
// with partial coverage, never used on one HSM, and Sync completes it.
// An HSM that dies between the create and the copy: the create is refused
// with the quorum error and leaves the key on neither HSM.
func TestHSMKilledBetweenCreateAndClone(t *testing.T) {
	ctx := context.Background()
	for _, victim := range []string{"creator", "clone-target"} {
		t.Run(victim, func(t *testing.T) {
			c := newCluster(t, 2)
			s := login(t, c, alice)
			var once sync.Once
			var killed string
			for _, m := range c.memberList() {
				h := &hookedMember{Member: m.m}
				h.beforeExport = func() {
					once.Do(func() {
						killed = m.id
						if victim == "clone-target" {
							killed = otherID(c, m.id)
						}
						c.memberByID(killed).m.SetFault(hsm.Fault{Down: true})
					})
				}
				m.m = h
			}
			_, err := s.GenerateKey(ctx, aesSpec("k", nil))
			if !errors.Is(err, hsm.ErrQuorum) || !strings.Contains(err.Error(), "nothing was created") {
				t.Fatalf("generate while the copy fails: %v, want the quorum refusal", err)
			}
			if st := c.Stats(); st.CloneFailures == 0 {
				t.Errorf("clone failure not counted: %+v", st)
			}
			c.SetFault(killed, hsm.Fault{})
			c.Sync(ctx)
			for _, m := range c.memberList() {
				if keys, err := m.m.PeerListKeys(ctx); err != nil || len(keys) != 0 {
					t.Errorf("HSM %s holds %d keys (%v) after a refused create, want none", m.id, len(keys), err)
				}
			}
		})
	}
}

func otherID(c *Cluster, id string) string {
	for _, m := range c.memberList() {
		if m.id != id {
			return m.id
		}
	}
	return ""
}

// An HSM that fails before doing anything is skipped, even for a create.
func TestFailoverBeforeExecution(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3)
	s := login(t, c, alice)
	ids := hsmIDs(c)
	c.SetFault(ids[0], hsm.Fault{FailNext: 1000})
	for range 20 {
		k := genAES(t, s, "k", nil)
		if err := encrypt(ctx, s, k.Ref); err != nil {
			t.Fatal(err)
		}
	}
	if st := c.Stats(); st.MarkedDown == 0 {
		t.Errorf("HSM never marked down: %+v", st)
	}
}

// A create that times out is not retried elsewhere: the key may exist.
func TestCreateWithUnknownOutcomeIsNotRetried(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	s := login(t, c, alice)
	c.retry.callTimeout = 20 * time.Millisecond
	c.SetFault(AllHSMs, hsm.Fault{Latency: 200 * time.Millisecond})
	_, err := s.GenerateKey(ctx, aesSpec("slow", nil))
	if !errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), "look for it") {
		t.Fatalf("GenerateKey on a slow HSM: %v", err)
	}
	if st := c.Stats(); st.Failovers != 0 {
		t.Errorf("create was retried on another HSM: %+v", st)
	}
	// Reads do fail over.
	c.SetFault(AllHSMs, hsm.Fault{})
	k := genAES(t, s, "k", nil)
	c.SetFault(hsmIDs(c)[0], hsm.Fault{Latency: 200 * time.Millisecond})
	for range 5 {
		if err := encrypt(ctx, s, k.Ref); err != nil {
			t.Fatalf("encrypt with one slow HSM: %v", err)
		}
	}
}

func TestShareAttributeDeleteEverywhere(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 3)
	s := login(t, c, alice)
	k := genAES(t, s, "k", nil)
	if err := s.ShareKey(ctx, k.Ref, bob.User); err != nil {
		t.Fatal(err)
	}
	if err := s.SetAttribute(ctx, k.Ref, hsm.AttrDecrypt, false); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetKey(ctx, k.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Coverage.Full() || !slices.Equal(got.SharedWith, []string{bob.User}) || got.Attrs.Decrypt {
		t.Fatalf("GetKey = %+v", got)
	}
	sb := login(t, c, bob)
	if err := encrypt(ctx, sb, k.Ref); err != nil {
		t.Fatalf("bob encrypt with shared key: %v", err)
	}
	if err := sb.DeleteKey(ctx, k.Ref); !errors.Is(err, hsm.ErrPermission) {
		t.Fatalf("bob deletes alice's key: %v", err)
	}
	// Delete while one HSM is down: Sync must delete it there, not copy it back.
	ids := hsmIDs(c)
	c.SetFault(ids[2], hsm.Fault{Down: true})
	if err := s.DeleteKey(ctx, k.Ref); err != nil {
		t.Fatal(err)
	}
	c.SetFault(ids[2], hsm.Fault{})
	rep, err := c.Sync(ctx)
	if err != nil || rep.KeysDeleted != 1 || rep.KeysCopied != 0 {
		t.Fatalf("Sync = %+v, %v", rep, err)
	}
	if _, err := s.GetKey(ctx, k.Ref); !errors.Is(err, hsm.ErrNotFound) {
		t.Fatalf("GetKey of deleted key: %v", err)
	}
}

func TestSessionKeysStayOnOneHSM(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	s := login(t, c, alice)
	spec := aesSpec("sess", nil)
	spec.Session = true
	k, err := s.GenerateKey(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if k.Coverage.Count() != 1 || !k.Coverage.Full() {
		t.Fatalf("session key coverage %+v", k.Coverage)
	}
	for range 20 {
		if err := encrypt(ctx, s, k.Ref); err != nil {
			t.Fatalf("encrypt with session key: %v", err)
		}
	}
	if c.Info().Keys != 0 {
		t.Errorf("session key counted as token key")
	}
}

func TestKeyCapacity(t *testing.T) {
	c := newCluster(t, 2, func(o *InitOptions) { o.KeyCapacity = 3 })
	s := login(t, c, alice)
	for range 3 {
		genAES(t, s, "k", nil)
	}
	_, err := s.GenerateKey(context.Background(), aesSpec("over", nil))
	if !errors.Is(err, hsm.ErrCapacity) {
		t.Fatalf("4th key in a cluster of capacity 3: %v", err)
	}
}

func TestAddRemoveHSM(t *testing.T) {
	ctx := context.Background()
	c := newCluster(t, 2)
	s := login(t, c, alice)
	var refs []hsm.KeyRef
	for range 5 {
		refs = append(refs, genAES(t, s, "k", nil).Ref)
	}
	added, err := c.AddHSM(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if added.AZ != DefaultRegion+"c" || len(c.Info().HSMs) != 3 {
		t.Errorf("added %+v; cluster %+v", added, c.Info().HSMs)
	}
	keys, err := s.ListKeys(ctx, hsm.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if !k.Coverage.Full() || k.Coverage.Count() != 3 {
			t.Errorf("key %s after AddHSM: %s", k.Ref, k.Coverage)
		}
	}
	first := hsmIDs(c)[0]
	if err := c.RemoveHSM(ctx, first); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(hsmIDs(c), first) {
		t.Fatal("HSM still listed after RemoveHSM")
	}
	for _, r := range refs {
		if err := encrypt(ctx, s, r); err != nil {
			t.Fatalf("encrypt after RemoveHSM: %v", err)
		}
	}
	bs, err := ListBackups(c.Dir())
	if err != nil || len(bs) != 2 {
		t.Fatalf("ListBackups = %v, %v; want one per membership change", bs, err)
	}
	dir := c.Dir()
	c.Close()
	c2, err := Open(ctx, dir, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if len(c2.Info().HSMs) != 2 {
		t.Errorf("reopened with %d HSMs", len(c2.Info().HSMs))
	}
	if _, err := filepath.Glob(filepath.Join(dir, first+".db")); err != nil {
		t.Fatal(err)
	}
}
