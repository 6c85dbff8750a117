package hsm

import (
	"bytes"
	"context"
	"testing"
)

func TestMaskedCopies(t *testing.T) {
	if MaskedCopiesFrom(context.Background()) != nil {
		t.Fatal("a bare context has masked copies")
	}
	var none *MaskedCopies
	if _, ok := none.Take(1); ok {
		t.Error("Take on no MaskedCopies found a blob")
	}
	mc := new(MaskedCopies)
	ctx := WithMaskedCopies(context.Background(), mc)
	MaskedCopiesFrom(ctx).Put(7, []byte("blob"))
	if _, ok := mc.Take(8); ok {
		t.Error("Take found a blob for a key never put")
	}
	if b, ok := mc.Take(7); !ok || !bytes.Equal(b, []byte("blob")) {
		t.Errorf("Take(7) = %q, %v; want the blob put", b, ok)
	}
	if _, ok := mc.Take(7); ok {
		t.Error("a second Take found the blob again: a copy is for the moment the key was made")
	}
}
