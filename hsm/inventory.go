package hsm

import (
	"context"
	"fmt"
)

// Inventory is one backend's keys as listed once, with the facts about it
// that plans and diffs depend on. Keys are never looked up one at a time:
// whoever needs a key finds it here.
type Inventory struct {
	// Name is how the caller names the backend in messages: a cluster
	// directory, a PKCS#11 URI.
	Name  string       `json:"name"`
	Info  ClusterInfo  `json:"info"`
	User  User         `json:"user"`
	Users []string     `json:"users"` // names of the backend's users; empty when it has none (Can.Users false)
	Can   Capabilities `json:"capabilities"`
	// Mechanisms are what the backend offers, when it offers only some
	// (MechanismLister); nil means every mechanism of this package.
	Mechanisms []MechanismInfo `json:"mechanisms,omitempty"`
	Keys       []KeyInfo       `json:"-"`
}

// TakeInventory lists the backend behind s once: its facts, its users (if
// it has any) and every key the logged-in user can see. name names it in
// errors.
func TakeInventory(ctx context.Context, s Session, name string) (Inventory, error) {
	info, err := s.Info(ctx)
	if err != nil {
		return Inventory{}, fmt.Errorf("cluster %s: %w", name, err)
	}
	inv := Inventory{Name: name, Info: info, User: s.User(), Can: CapabilitiesOf(s)}
	if u, ok := s.(Users); ok {
		users, err := u.ListUsers(ctx)
		if err != nil {
			return Inventory{}, fmt.Errorf("cluster %s: listing users: %w", name, err)
		}
		for _, u := range users {
			inv.Users = append(inv.Users, u.Name)
		}
	}
	if ml, ok := s.(MechanismLister); ok {
		if inv.Mechanisms, err = ml.Mechanisms(ctx); err != nil {
			return Inventory{}, fmt.Errorf("cluster %s: listing mechanisms: %w", name, err)
		}
	}
	if inv.Keys, err = s.ListKeys(ctx, Filter{}); err != nil {
		return Inventory{}, fmt.Errorf("cluster %s: listing keys: %w", name, err)
	}
	return inv, nil
}
