package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/lib/pq"
)

// pgListener feeds the hub from PostgreSQL's LISTEN, on a connection of its own
// (DATABASE_LISTEN_URL). It has one path for each thing that can happen:
//   - a notification on notifyChannel: the hub dispatches its events;
//   - one on sessionsChannel: sessions ended (see sessionWatcher);
//   - one on instancesChannel: an instance starting, or answering (see presence);
//   - a lost connection: lib/pq reconnects by itself and then sends a nil
//     notification, as notifications may have been missed meanwhile: every stream
//     is synced with the event log (Hub.resyncSoon), and the session cache is
//     emptied and every stream's session checked (sessionWatcher.missed).
//
// A ping every interval notices a connection that died quietly. Pinging runs on a
// goroutine of its own: the loop that drains notifications must never stop, or
// the connection (which a ping also needs) stalls.
type pgListener struct {
	l        *pq.Listener
	hub      *Hub
	sessions *sessionWatcher // takes sessionsChannel's payloads
	peers    *presence       // takes instancesChannel's payloads
	metrics  *metrics
	logger   *slog.Logger
}

// listen connects to url and listens on channels. It returns once the connection
// is LISTENing, so that no event committed after the server starts serving can
// go unannounced to it: lib/pq's Listen only queues the channel when the
// connection is not up yet, and announces the first connection (after its
// LISTENs) with ListenerEventConnected.
func listen(url string, channels []string, hub *Hub, sessions *sessionWatcher, peers *presence, m *metrics, logger *slog.Logger) (*pgListener, error) {
	connected := make(chan struct{})
	var once sync.Once
	l := pq.NewListener(url, 100*time.Millisecond, 5*time.Second, func(ev pq.ListenerEventType, err error) {
		if ev == pq.ListenerEventConnected {
			once.Do(func() { close(connected) })
		}
		if err != nil {
			logger.Warn("event listener", "state", ev.String(), "err", err)
		}
	})
	for _, channel := range channels {
		if err := l.Listen(channel); err != nil {
			l.Close()
			return nil, fmt.Errorf("listen for events: %w", err)
		}
	}
	select {
	case <-connected:
	case <-time.After(listenConnectTimeout):
		l.Close()
		return nil, fmt.Errorf("listen for events: not connected after %v", listenConnectTimeout)
	}
	return &pgListener{l: l, hub: hub, sessions: sessions, peers: peers, metrics: m, logger: logger}, nil
}

// listenConnectTimeout is how long the server waits at start for its LISTEN
// connection.
const listenConnectTimeout = 15 * time.Second

// run feeds notifications to the hub until ctx is done or the listener is closed.
func (pl *pgListener) run(ctx context.Context, pingInterval time.Duration) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		every(ctx, pingInterval, nil, func() {
			if err := pl.l.Ping(); err != nil && ctx.Err() == nil {
				pl.logger.Warn("event listener ping", "err", err)
			}
		})
	})
	for {
		select {
		case <-ctx.Done():
			return
		case n, ok := <-pl.l.Notify:
			switch {
			case !ok:
				return // closed
			case n == nil: // reconnected: some may have been missed
				pl.metrics.listenerReconnects.Inc()
				pl.hub.resyncSoon()
				pl.sessions.missed()
				pl.peers.notifyAnyway() // a hello may have been missed
			case n.Channel == notifyChannel:
				pl.hub.dispatch(n.Extra)
			case n.Channel == sessionsChannel:
				pl.sessions.noted(n.Extra)
			case n.Channel == instancesChannel:
				pl.peers.noted(n.Extra)
			}
		}
	}
}

// close closes the connection.
func (pl *pgListener) close() { pl.l.Close() }
