package synckey

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/keymig/keymig/internal/failpoint"
)

// Schedule is how often Repeat runs a sync.
type Schedule struct {
	// Every is the period between the starts of two runs.
	Every time.Duration
	// Jitter moves each start by up to ±Jitter·Every at random (0 to 0.5),
	// so that many scheduled syncs do not hit a cluster at the same moment.
	Jitter float64
	// Wake, if set, cuts a wait short: a value received while Repeat
	// sleeps starts the next sync at once (keymig sends one on SIGUSR1).
	// The period then counts from that sync's start.
	Wake <-chan struct{}
}

// ParseJitter reads a jitter given as a percentage ("10%") or a fraction
// ("0.1") of the period.
func ParseJitter(s string) (float64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	pct := strings.HasSuffix(s, "%")
	v, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
	if err != nil {
		return 0, fmt.Errorf("jitter %q: want a percentage of the period such as 10%%", s)
	}
	if pct {
		v /= 100
	}
	if v < 0 || v > 0.5 {
		return 0, fmt.Errorf("jitter %q: want 0%% to 50%% of the period", s)
	}
	return v, nil
}

// Next is when the run after one that started at start should begin:
// the first tick of the period after now, moved by the jitter.
func (sc Schedule) Next(start, now time.Time) time.Time {
	next := start.Add(sc.Every)
	if next.Before(now) { // the run took longer than a period: skip the missed ticks
		missed := now.Sub(next)/sc.Every + 1
		next = next.Add(missed * sc.Every)
	}
	if sc.Jitter > 0 {
		span := time.Duration(sc.Jitter * float64(sc.Every))
		if span > 0 {
			next = next.Add(rand.N(2*span+1) - span)
		}
	}
	if next.Before(now) {
		next = now
	}
	return next
}

// Repeat calls run now and then once per period until ctx ends; one run at
// a time. A run's error is logged and the next tick tries again. When ctx
// ends between runs Repeat returns at once; a run in progress is left to
// stop by itself (it sees ctx too). Repeat returns the last run's error:
// nil if the last run was clean.
func Repeat(ctx context.Context, sc Schedule, log *slog.Logger, run func(context.Context) error) error {
	if sc.Every <= 0 {
		return fmt.Errorf("a schedule every %s: want a positive period such as 15m", sc.Every)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	for n := 1; ; n++ {
		start := time.Now()
		err := run(ctx)
		if err != nil {
			log.Error("scheduled sync failed; the next tick tries again", "run", n, "err", err)
		}
		if ctx.Err() != nil {
			return err
		}
		next := sc.Next(start, time.Now())
		log.Info("next sync", "at", next.Format(time.RFC3339), "in", time.Until(next).Round(time.Millisecond))
		if err := failpoint.Wait(ctx, failpoint.SynckeyBetweenSyncs); err != nil {
			return err
		}
		t := time.NewTimer(time.Until(next))
		select {
		case <-ctx.Done():
			t.Stop()
			log.Info("stopped between syncs", "last-run-clean", err == nil)
			return err
		case <-t.C:
		case <-sc.Wake:
			t.Stop()
			log.Info("woken up: syncing now")
		}
	}
}
