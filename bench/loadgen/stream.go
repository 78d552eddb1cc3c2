package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// receipt is one message event read from a stream: the message id and when its
// data line was read.
type receipt struct {
	id int64
	at time.Time
}

// maxReconnects bounds how often one stream reconnects after the server ended it.
const maxReconnects = 5

// eventStream is one user's open GET /api/messages, read by a goroutine of its own
// until its context is done. When the server ends it (a slow stream is dropped, for
// instance) it reconnects with Last-Event-ID, as EventSource does, and the server
// replays what it missed.
type eventStream struct {
	mu  sync.Mutex // guards got
	got []receipt

	reconnects atomic.Int32
	failed     error         // why it stopped early; read only after done is closed
	done       chan struct{} // closed when the reading goroutine returns
}

// receipts returns a copy of the message events read so far.
func (st *eventStream) receipts() []receipt {
	st.mu.Lock()
	defer st.mu.Unlock()
	return append([]receipt(nil), st.got...)
}

// messagePrefix starts the data line of a message event: messages are the only
// events whose JSON begins with their id.
var messagePrefix = []byte(`data: {"id":"`)

// openStream connects token's stream and returns once the server's first comment
// has been read, that is once the stream is registered with the server's hub. Each
// message event read adds one to delivered.
func (c *client) openStream(ctx context.Context, token string, delivered *atomic.Int64) (*eventStream, error) {
	body, r, err := c.connectStream(ctx, token, "")
	if err != nil {
		return nil, err
	}
	st := &eventStream{done: make(chan struct{})}
	go func() {
		defer close(st.done)
		lastID := ""
		for {
			st.read(r, &lastID, delivered)
			body.Close()
			if ctx.Err() != nil {
				return
			}
			if st.reconnects.Add(1) > maxReconnects {
				st.failed = fmt.Errorf("stream ended more than %d times", maxReconnects)
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			if body, r, err = c.connectStream(ctx, token, lastID); err != nil {
				if ctx.Err() == nil {
					st.failed = fmt.Errorf("reconnect: %w", err)
				}
				return
			}
		}
	}()
	return st, nil
}

// connectStream sends the stream's request and reads up to the server's first
// comment.
func (c *client) connectStream(ctx context.Context, token, lastID string) (io.ReadCloser, *bufio.Reader, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/api/messages", nil)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Authorization", "Bearer "+token)
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	resp, err := c.streams.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("open stream: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, nil, fmt.Errorf("open stream: status %d", resp.StatusCode)
	}
	r := bufio.NewReaderSize(resp.Body, 4096)
	line, err := r.ReadSlice('\n')
	if err != nil || !bytes.HasPrefix(line, []byte(":")) {
		resp.Body.Close()
		return nil, nil, fmt.Errorf("open stream: no opening comment (%q, %v)", line, err)
	}
	return resp.Body, r, nil
}

// read records the stream's message events until it ends, keeping the last event
// id for a reconnect.
func (st *eventStream) read(r *bufio.Reader, lastID *string, delivered *atomic.Int64) {
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A line longer than the buffer is no event this benchmark sends: skip it.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = r.ReadSlice('\n')
			}
			continue
		}
		if err != nil {
			return
		}
		now := time.Now()
		switch {
		case bytes.HasPrefix(line, messagePrefix):
			rest := line[len(messagePrefix):]
			end := bytes.IndexByte(rest, '"')
			id, err := strconv.ParseInt(string(rest[:max(end, 0)]), 10, 64)
			if err != nil {
				continue
			}
			st.mu.Lock()
			st.got = append(st.got, receipt{id: id, at: now})
			st.mu.Unlock()
			delivered.Add(1)
		case bytes.HasPrefix(line, []byte("id: ")):
			*lastID = string(bytes.TrimSpace(line[len("id: "):]))
		}
	}
}
