package remote

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/keymig/keymig/hsm"
	"github.com/keymig/keymig/hsm/internal/wire"
)

// Once the HSM has said it takes them (wire.HeaderStream), a Member sends
// its calls on one long-lived stream request (wire.OpStream) on its
// connection: a writer sends every call queued since its last write in one
// write, and a reader hands each answer to its caller as it comes. Calls
// made at once by many callers so share HTTP/2 frames, TLS records and
// syscalls, and a call made alone is sent at once: nothing waits for a
// timer or for another call's answer (BenchmarkMigrateNetworked).
//
// A call whose caller gives up before it is written is never sent. Once
// written it runs on the HSM under its deadline even if its caller has
// returned, as a request of its own would after it was sent; the callers
// of Member (hsm/cluster, and migrate's journal above it) already treat a
// call that ended with its context as one that may have been done. When
// the stream breaks, calls written and unanswered may have been done (a
// lostAnswer); when the HSM ends it (its daemon is stopping), calls it did
// not answer were never run, and are plain unavailable errors.

// closeStreamWait bounds how long Close waits for the HSM to answer the
// calls in flight on the stream before it cuts the stream off.
const closeStreamWait = 5 * time.Second

// streams is a Member's stream of calls, opened at need.
type streams struct {
	mu      sync.Mutex
	cur     *callStream
	opening chan struct{} // closed when the open in progress ends; nil when none
}

// callStream is one open OpStream request.
type callStream struct {
	m      *Member
	pw     *io.PipeWriter
	cancel context.CancelFunc
	wake   chan struct{} // buffered: the writer has calls to write
	done   chan struct{} // closed when the reader has ended

	mu      sync.Mutex
	queue   []*pending          // not yet taken by the writer
	calls   map[uint64]*pending // taken by the writer (so maybe sent), unanswered
	nextID  uint64
	dead    bool // no call is added any more
	closing bool // Close has closed our side
}

// pending is one call on a stream: its body is marshaled by its caller, so
// that nothing of the caller's is read after it returns.
type pending struct {
	ctx     context.Context
	id      uint64
	op      string
	session string
	body    []byte
	done    chan answer // buffered: nobody blocks on a caller gone
}

type answer struct {
	res wire.Result
	err error
}

// viaStream makes a call on the Member's stream, opening one if none is
// open.
func (m *Member) viaStream(ctx context.Context, op, session string, body []byte, out *wire.Result) error {
	if err := ctx.Err(); err != nil {
		return m.transportErr(ctx, op, err)
	}
	p := &pending{ctx: ctx, op: op, session: session, body: body, done: make(chan answer, 1)}
	for {
		cs, err := m.callStream(ctx, op)
		if errors.Is(err, errNoStreams) {
			return m.callOne(ctx, op, session, body, out)
		}
		if err != nil {
			return err
		}
		if cs.add(p) {
			break
		}
		// It ended between our finding it and adding the call, which it
		// never saw: the next stream takes it.
	}
	select {
	case a := <-p.done:
		*out = a.res
		return a.err
	case <-ctx.Done():
		return m.transportErr(ctx, op, ctx.Err())
	}
}

// callStream returns the open stream, opening one if there is none; op names
// the call waiting for it in an error.
func (m *Member) callStream(ctx context.Context, op string) (*callStream, error) {
	for {
		m.streams.mu.Lock()
		if cs := m.streams.cur; cs != nil {
			m.streams.mu.Unlock()
			return cs, nil
		}
		if wait := m.streams.opening; wait != nil {
			m.streams.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, m.transportErr(ctx, op, ctx.Err())
			}
		}
		opened := make(chan struct{})
		m.streams.opening = opened
		m.streams.mu.Unlock()
		cs, err := m.openStream(ctx, op)
		m.streams.mu.Lock()
		m.streams.opening = nil
		if err == nil {
			m.streams.cur = cs
		}
		m.streams.mu.Unlock()
		close(opened)
		return cs, err
	}
}

// openStream opens an OpStream request; ctx bounds the opening only.
func (m *Member) openStream(ctx context.Context, op string) (*callStream, error) {
	sctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	req, err := http.NewRequestWithContext(sctx, http.MethodPost, m.base+wire.OpStream, pr)
	if err != nil {
		cancel()
		return nil, err
	}
	req.Header.Set("Content-Type", "application/x-ndjson")
	stopOpen := context.AfterFunc(ctx, cancel)
	resp, err := m.do(req)
	stopOpen()
	if err != nil {
		cancel()
		err = m.transportErr(ctx, op, err)
		var la *lostAnswer
		if errors.As(err, &la) {
			err = la.err // no call was on the stream: none was done
		}
		return nil, err
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get(wire.HeaderStream) == "" {
		// A daemon replaced by one that takes no streams: calls go in
		// requests of their own again.
		cancel()
		resp.Body.Close()
		m.canStream.Store(false)
		return nil, errNoStreams
	}
	cs := &callStream{m: m, pw: pw, cancel: cancel, wake: make(chan struct{}, 1), done: make(chan struct{}), calls: map[uint64]*pending{}}
	go cs.write()
	go cs.read(resp.Body)
	return cs, nil
}

// errNoStreams says the HSM no longer takes streams of calls.
var errNoStreams = errors.New("the HSM takes no streams of calls")

// add queues p, or reports that the stream has ended.
func (cs *callStream) add(p *pending) bool {
	cs.mu.Lock()
	if cs.dead {
		cs.mu.Unlock()
		return false
	}
	cs.queue = append(cs.queue, p)
	cs.mu.Unlock()
	select {
	case cs.wake <- struct{}{}:
	default: // the writer will see it
	}
	return true
}

// write sends the queued calls, all that are queued in one write.
func (cs *callStream) write() {
	bw := bufio.NewWriterSize(cs.pw, 32<<10)
	enc := json.NewEncoder(bw)
	for {
		select {
		case <-cs.wake:
		case <-cs.done:
			return
		}
		cs.mu.Lock()
		q := cs.queue
		cs.queue = nil
		closing := cs.closing
		for _, p := range q {
			if p.ctx.Err() == nil { // else its caller has returned: never sent
				cs.nextID++
				p.id = cs.nextID
				cs.calls[p.id] = p
			}
		}
		cs.mu.Unlock()
		for _, p := range q {
			if p.id == 0 {
				continue
			}
			c := wire.StreamCall{ID: p.id, Op: p.op, Session: p.session, Call: p.body}
			if dl, ok := p.ctx.Deadline(); ok {
				c.Deadline = dl.UTC()
			}
			if err := enc.Encode(&c); err != nil {
				cs.fail(err)
				return
			}
		}
		if err := bw.Flush(); err != nil {
			cs.fail(err)
			return
		}
		if closing { // and so dead: nothing more is queued
			cs.pw.Close()
			return
		}
	}
}

// read hands each answer to its caller until the stream ends.
func (cs *callStream) read(body io.ReadCloser) {
	defer close(cs.done)
	defer body.Close()
	dec := json.NewDecoder(body)
	for {
		var a wire.StreamAnswer
		if err := dec.Decode(&a); err != nil {
			cs.fail(err)
			return
		}
		if a.End {
			// Read to the stream's end, so that the connection is idle
			// once read returns (Close then closes it).
			io.Copy(io.Discard, body)
			cs.end()
			return
		}
		cs.mu.Lock()
		p := cs.calls[a.ID]
		delete(cs.calls, a.ID)
		cs.mu.Unlock()
		switch {
		case p == nil: // not a call of ours: ignored
		case a.Error != nil:
			p.done <- answer{err: cs.m.answerErr(p.op, a.Error)}
		case a.Result != nil:
			p.done <- answer{res: *a.Result}
		default:
			p.done <- answer{}
		}
	}
}

// retire marks the stream ended, so that new calls go to a new one, and
// returns the calls written and not answered, and those never written.
func (cs *callStream) retire() (sent, unsent []*pending) {
	cs.mu.Lock()
	cs.dead = true
	for _, p := range cs.calls {
		sent = append(sent, p)
	}
	cs.calls = map[uint64]*pending{}
	unsent, cs.queue = cs.queue, nil
	cs.mu.Unlock()
	cs.detach()
	cs.pw.Close()
	return sent, unsent
}

// detach makes sure new calls do not go to this stream.
func (cs *callStream) detach() {
	m := cs.m
	m.streams.mu.Lock()
	if m.streams.cur == cs {
		m.streams.cur = nil
	}
	m.streams.mu.Unlock()
}

// fail ends a stream that broke: calls written may have been done.
func (cs *callStream) fail(err error) {
	sent, unsent := cs.retire()
	cs.cancel()
	m := cs.m
	cs.mu.Lock()
	closing := cs.closing
	cs.mu.Unlock()
	for _, p := range sent {
		if cerr := p.ctx.Err(); cerr != nil {
			p.done <- answer{err: fmt.Errorf("HSM %s at %s: %s: %w", m.id, m.addr, p.op, cerr)}
			continue
		}
		he := hsm.Errorf(hsm.CodeUnavailable, p.op, 0, "HSM %s at %s is unreachable: the connection broke during the call (%v); retry, or check that its daemon (keymig hsm serve) runs", m.id, m.addr, err)
		if closing {
			he = hsm.Errorf(hsm.CodeUnavailable, p.op, 0, "HSM %s at %s: the client was closed during the call", m.id, m.addr)
		}
		p.done <- answer{err: &lostAnswer{he}}
	}
	cs.refuse(unsent)
}

// end ends a stream the HSM ended: it never ran the calls it did not
// answer.
func (cs *callStream) end() {
	sent, unsent := cs.retire()
	cs.cancel()
	cs.refuse(append(sent, unsent...))
}

// refuse answers calls that were never run.
func (cs *callStream) refuse(calls []*pending) {
	m := cs.m
	for _, p := range calls {
		p.done <- answer{err: hsm.Errorf(hsm.CodeUnavailable, p.op, 0, "HSM %s at %s ended its stream of calls before it ran this one (its daemon is stopping?); retry", m.id, m.addr)}
	}
}

// close closes our side of the stream once the calls queued are written:
// the HSM answers the calls in flight and ends it. It waits for that at
// most closeStreamWait, then cuts it off. Calls made meanwhile go to a new
// stream.
func (cs *callStream) close() {
	cs.mu.Lock()
	cs.closing, cs.dead = true, true
	cs.mu.Unlock()
	cs.detach()
	select {
	case cs.wake <- struct{}{}:
	default:
	}
	t := time.NewTimer(closeStreamWait)
	defer t.Stop()
	select {
	case <-cs.done:
	case <-t.C:
		cs.cancel()
		<-cs.done
	}
}
