package runner

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/schollz/progressbar/v3"
)

// NewProgress returns the progress display for a run: a bar redrawn on w
// when w is a terminal, otherwise a log line every interval (never redraws
// into a file). unit names the items, e.g. "keys".
func NewProgress(w io.Writer, terminal bool, log *slog.Logger, unit string, interval time.Duration) Progress {
	if terminal {
		return &barProgress{w: w, unit: unit}
	}
	if interval <= 0 {
		interval = 5 * time.Second
	}
	return &logProgress{log: log, unit: unit, interval: interval}
}

type barProgress struct {
	w      io.Writer
	unit   string
	bar    *progressbar.ProgressBar
	failed atomic.Int64
}

func (p *barProgress) Start(total, already int) {
	p.bar = progressbar.NewOptions(total,
		progressbar.OptionSetWriter(p.w),
		progressbar.OptionSetDescription(p.unit),
		progressbar.OptionShowCount(),
		progressbar.OptionShowIts(),
		progressbar.OptionSetItsString(p.unit),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionSetWidth(30),
	)
	p.bar.Set(already)
}

func (p *barProgress) Finished(ok bool) {
	if !ok {
		n := p.failed.Add(1)
		p.bar.Describe(fmt.Sprintf("%s (%d failed)", p.unit, n))
	}
	p.bar.Add(1)
}

func (p *barProgress) Stop() {
	p.bar.Finish()
	fmt.Fprintln(p.w)
}

type logProgress struct {
	log      *slog.Logger
	unit     string
	interval time.Duration

	total, start int
	done, failed atomic.Int64
	began        time.Time
	stop         chan struct{}
	wg           sync.WaitGroup
}

func (p *logProgress) Start(total, already int) {
	p.total, p.start, p.began = total, already, time.Now()
	p.stop = make(chan struct{})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(p.interval)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				p.line()
			}
		}
	}()
}

func (p *logProgress) line() {
	if p.log == nil {
		return
	}
	done := p.done.Load()
	rate := float64(done) / time.Since(p.began).Seconds()
	left := p.total - p.start - int(done) - int(p.failed.Load())
	eta := "unknown"
	if rate > 0 {
		eta = time.Duration(float64(left) / rate * float64(time.Second)).Round(time.Second).String()
	}
	p.log.Info("progress", p.unit, fmt.Sprintf("%d/%d", p.start+int(done), p.total),
		"failed", p.failed.Load(), "rate", fmt.Sprintf("%.0f %s/s", rate, p.unit), "eta", eta)
}

func (p *logProgress) Finished(ok bool) {
	if ok {
		p.done.Add(1)
	} else {
		p.failed.Add(1)
	}
}

func (p *logProgress) Stop() {
	close(p.stop)
	p.wg.Wait()
}
