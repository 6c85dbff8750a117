package synckey_test

import (
	"testing"
	"time"

	"github.com/keymig/keymig/synckey"
)

func TestParseJitter(t *testing.T) {
	for in, want := range map[string]float64{"": 0, "10%": 0.1, "0.25": 0.25, "0%": 0, "50%": 0.5} {
		if got, err := synckey.ParseJitter(in); err != nil || got != want {
			t.Errorf("ParseJitter(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"60%", "-1%", "ten", "%"} {
		if _, err := synckey.ParseJitter(in); err == nil {
			t.Errorf("ParseJitter(%q) accepted", in)
		}
	}
}

func TestScheduleNext(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	sc := synckey.Schedule{Every: 15 * time.Minute}
	if got := sc.Next(t0, t0.Add(time.Minute)); !got.Equal(t0.Add(15 * time.Minute)) {
		t.Errorf("next tick: %s", got)
	}
	// A run longer than the period skips the ticks it missed.
	if got := sc.Next(t0, t0.Add(40*time.Minute)); !got.Equal(t0.Add(45 * time.Minute)) {
		t.Errorf("after a long run: %s", got)
	}
	sc.Jitter = 0.1
	for i := 0; i < 200; i++ {
		got := sc.Next(t0, t0.Add(time.Minute))
		if d := got.Sub(t0.Add(15 * time.Minute)); d < -90*time.Second || d > 90*time.Second {
			t.Fatalf("jitter moved the tick by %s, more than ±10%% of 15m", d)
		}
	}
}
