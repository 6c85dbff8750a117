package hsm

import (
	"context"
	"sync"
)

// MaskedCopies collects the masked objects of the token keys that calls
// under a context from WithMaskedCopies make, as the HSM that made them
// exported them in the same call: a cluster copies a new key to its other
// HSMs with them, and needs no export call of its own. A backend that
// does not fill it (an in-process HSM, for which a call costs no round
// trip) leaves the caller to export as before.
type MaskedCopies struct {
	mu    sync.Mutex
	blobs map[KeyRef][]byte
}

// Put records the masked object of key ref.
func (mc *MaskedCopies) Put(ref KeyRef, blob []byte) {
	mc.mu.Lock()
	defer mc.mu.Unlock()
	if mc.blobs == nil {
		mc.blobs = map[KeyRef][]byte{}
	}
	mc.blobs[ref] = blob
}

// Take returns the masked object of key ref, if one was put, and forgets
// it: a copy is for the moment the key was made, not for later, when its
// attributes may have changed.
func (mc *MaskedCopies) Take(ref KeyRef) ([]byte, bool) {
	if mc == nil {
		return nil, false
	}
	mc.mu.Lock()
	defer mc.mu.Unlock()
	blob, ok := mc.blobs[ref]
	delete(mc.blobs, ref)
	return blob, ok
}

type maskedCopiesKey struct{}

// WithMaskedCopies returns a context under which backends that can put the
// masked objects of the token keys their calls make into mc.
func WithMaskedCopies(ctx context.Context, mc *MaskedCopies) context.Context {
	return context.WithValue(ctx, maskedCopiesKey{}, mc)
}

// MaskedCopiesFrom returns the MaskedCopies of ctx, or nil.
func MaskedCopiesFrom(ctx context.Context) *MaskedCopies {
	mc, _ := ctx.Value(maskedCopiesKey{}).(*MaskedCopies)
	return mc
}
