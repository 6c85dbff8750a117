package server

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sync"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/internal/wire"
)

// maxStreamCalls bounds the calls of one stream running at once; past it
// the server stops reading the stream until one ends, which HTTP/2 flow
// control passes back to the client.
const maxStreamCalls = 1024

// serveStream answers an OpStream: it reads calls from the request body
// and runs each at once, and a writer sends each answer as it comes,
// flushing when no other answer is ready, so that answers finished
// together share frames and syscalls. The stream ends when the client
// closes its side, goes away, or the server shuts down; the server then
// reads no more calls, waits for the ones running, answers them, and
// writes End.
func (s *Server) serveStream(ctx context.Context, w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		return
	}
	answers := make(chan *wire.StreamAnswer, maxStreamCalls)
	written := make(chan struct{})
	go func() {
		defer close(written)
		bw := bufio.NewWriterSize(w, 32<<10)
		enc := json.NewEncoder(bw)
		broken := false // the client is gone: answers are dropped
		for a := range answers {
			if broken {
				continue
			}
			if err := enc.Encode(a); err != nil {
				broken = true
				continue
			}
			if len(answers) == 0 {
				broken = bw.Flush() != nil || rc.Flush() != nil
			}
		}
		if !broken {
			enc.Encode(&wire.StreamAnswer{End: true})
			if bw.Flush() == nil {
				rc.Flush()
			}
		}
	}()

	var (
		running sync.WaitGroup // calls handed to workers and not answered
		mu      sync.Mutex
		stopped bool // under mu: no call is started any more
	)
	// Calls run on workers that live as long as the stream, so that a call
	// does not pay for a new goroutine and for growing its stack (JSON and
	// the HSM's work grow it past its first size: 14% of the CPU time of
	// BenchmarkWrap/remote with a goroutine per call). A call goes to an
	// idle worker, or to a new one when none is idle.
	work := make(chan *wire.StreamCall)
	sem := make(chan struct{}, maxStreamCalls)
	worker := func(c *wire.StreamCall) {
		for ; c != nil; c = <-work {
			answers <- s.runStreamCall(ctx, c)
			<-sem
			running.Done()
		}
	}
	stop := make(chan struct{}) // closed with stopped set, to wake the reader
	read := make(chan struct{})
	go func() {
		defer close(read)
		dec := json.NewDecoder(r.Body)
		for {
			c := new(wire.StreamCall)
			if err := dec.Decode(c); err != nil {
				if !errors.Is(err, io.EOF) && ctx.Err() == nil {
					s.log.Warn("a stream of calls broke off", "err", err)
				}
				return
			}
			select {
			case sem <- struct{}{}:
			case <-stop:
			}
			mu.Lock()
			if stopped {
				mu.Unlock()
				// Read but never run, until the answer ends (and the
				// body with it): the client learns so from End.
				s.log.Info(StreamRefused, "op", c.Op, "remote", r.RemoteAddr)
				continue
			}
			running.Add(1)
			mu.Unlock()
			select {
			case work <- c:
			default:
				go worker(c)
			}
		}
	}()
	shutdown := false
	select {
	case <-read:
	case <-s.closing:
		shutdown = true
	case <-ctx.Done():
	}
	mu.Lock()
	stopped = true
	mu.Unlock()
	close(stop)
	if shutdown {
		s.log.Info(StreamDrained, "remote", r.RemoteAddr)
	}
	running.Wait()
	close(work) // the workers end; the reader hands them nothing more
	close(answers)
	<-written
}

// StreamDrained is logged when a stream of calls stops reading calls
// because the server is shutting down: it answers those running, and a
// call sent after it is never run.
const StreamDrained = "shutting down: this stream of calls runs no new call"

// StreamRefused is logged for each call a stream reads after it stopped
// running new ones.
const StreamRefused = "shutting down: a call was not run"

// runStreamCall runs one call of a stream under its own deadline. A call
// that panics is answered as one whose outcome is unknown: it may have
// been committed before the panic.
func (s *Server) runStreamCall(ctx context.Context, c *wire.StreamCall) (a *wire.StreamAnswer) {
	a = &wire.StreamAnswer{ID: c.ID}
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("a call panicked", "op", c.Op, "panic", p)
			a.Result = nil
			a.Error = &wire.Error{Code: hsm.CodeUnavailable, Op: c.Op, Msg: "the HSM failed during the call, which may have been done", Unknown: true}
		}
	}()
	switch c.Op {
	case wire.OpStream, wire.OpListKeys, wire.OpPeerListKeys, wire.OpAudit:
		a.Error = wireError(hsm.Errorf(hsm.CodeInvalidInput, c.Op, 0, "%s cannot travel in a stream of calls", c.Op))
		return a
	}
	if !c.Deadline.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, c.Deadline)
		defer cancel()
	}
	var in wire.Call
	if err := json.Unmarshal(c.Call, &in); err != nil {
		a.Error = wireError(hsm.Errorf(hsm.CodeInvalidInput, c.Op, 0, "the call's body is not valid JSON: %v", err))
		return a
	}
	var out wire.Result
	if err := s.dispatch(ctx, c.Session, c.Op, &in, &out); err != nil {
		s.logFailed(ctx, c.Op, err)
		a.Error = wireError(err)
		return a
	}
	a.Result = &out
	return a
}
