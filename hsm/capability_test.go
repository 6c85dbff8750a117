package hsm

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// coreOnly is a backend with the core session and nothing else, as a
// PKCS#11 token is; it names itself.
type coreOnly struct{ Session }

func (coreOnly) BackendName() string { return "PKCS#11 token legacy" }

// sharing adds one capability.
type sharing struct{ coreOnly }

func (sharing) ShareKey(context.Context, KeyRef, string) error   { return nil }
func (sharing) UnshareKey(context.Context, KeyRef, string) error { return nil }

func TestCapabilities(t *testing.T) {
	tests := []struct {
		name string
		s    Session
		want Capabilities
	}{
		{"core only", coreOnly{}, Capabilities{}},
		{"sharing", sharing{}, Capabilities{Share: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := CapabilitiesOf(tt.s); got != tt.want {
				t.Errorf("CapabilitiesOf = %+v, want %+v", got, tt.want)
			}
		})
	}
	if _, err := As[Sharer](sharing{}, "share keys"); err != nil {
		t.Errorf("As[Sharer] on a sharer: %v", err)
	}
	_, err := As[Masker](coreOnly{}, "export masked objects")
	if !errors.Is(err, ErrUnsupported) || err.Error() != "PKCS#11 token legacy cannot export masked objects" {
		t.Errorf("As[Masker] on a core-only backend: %v, want an unsupported error naming it", err)
	}
	if _, err := As[Users](sharing{}, "list users"); err == nil || !strings.Contains(err.Error(), "cannot list users") {
		t.Errorf("As[Users]: %v", err)
	}
}
