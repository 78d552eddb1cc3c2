package main

import (
	"database/sql"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the server's Prometheus metrics, in a registry of its own so that
// several servers can run in one process (as the tests do).
type metrics struct {
	registry           *prometheus.Registry
	requests           *prometheus.CounterVec
	requestDuration    *prometheus.HistogramVec
	streamsOpen        prometheus.Gauge
	eventsDelivered    prometheus.Counter
	streamsDroppedSlow prometheus.Counter
	streamsRefused     *prometheus.CounterVec // by reason: user_limit, server_full
	streamResets       *prometheus.CounterVec // by reason: too_far_behind, expired, unknown_position
	eventsPruned       prometheus.Counter
	listenerReconnects prometheus.Counter
	notifyFailures     prometheus.Counter
	busMessages        *prometheus.CounterVec
	busReconnects      prometheus.Counter
	busSlow            prometheus.Counter
	sessionsEnded      *prometheus.CounterVec
	connectionsOpen    prometheus.Gauge
	connectionsRefused *prometheus.CounterVec // by reason: addr_limit, server_full
	peerInstances      prometheus.Gauge
	sendBatchDuration  prometheus.Histogram
	sendBatchMessages  prometheus.Histogram
}

func newMetrics(db *sql.DB) *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "messenger_http_requests_total", Help: "HTTP requests by route, method and status.",
		}, []string{"route", "method", "status"}),
		requestDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "messenger_http_request_duration_seconds", Help: "HTTP request duration by route (streams: until the stream starts).",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10, 60, 600},
		}, []string{"route"}),
		streamsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "messenger_streams_open", Help: "Event streams open on this instance.",
		}),
		eventsDelivered: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "messenger_events_delivered_total", Help: "Events written to streams (live and replayed).",
		}),
		streamsDroppedSlow: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "messenger_streams_dropped_slow_total", Help: "Streams ended because they fell behind.",
		}),
		streamsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "messenger_streams_refused_total", Help: "Stream requests refused at a cap: user_limit (STREAMS_PER_USER) or server_full (STREAMS_MAX).",
		}, []string{"reason"}),
		streamResets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "messenger_stream_resets_total", Help: "Resuming streams sent reset instead of a replay, by reason.",
		}, []string{"reason"}),
		eventsPruned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "messenger_events_pruned_total", Help: "Events deleted from the log past EVENT_RETENTION.",
		}),
		listenerReconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "messenger_listener_reconnects_total", Help: "Times the LISTEN connection was re-established.",
		}),
		notifyFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "messenger_notify_failures_total", Help: "NOTIFY round trips or bus publishes that failed (their events reach streams at the next sync).",
		}),
		busMessages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "messenger_bus_messages_total", Help: "NATS bus messages by direction (published, received).",
		}, []string{"direction"}),
		busReconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "messenger_bus_reconnects_total", Help: "Times the NATS connection was re-established.",
		}),
		busSlow: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "messenger_bus_slow_consumer_total", Help: "Times NATS dropped wake-ups because this instance fell behind (its streams then sync with the log).",
		}),
		sessionsEnded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "messenger_sessions_ended_total", Help: "Sessions ended through this instance, by reason (signed_out, signed_out_everywhere, too_many_sessions).",
		}, []string{"reason"}),
		connectionsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "messenger_connections_open", Help: "Client connections open on the public listener (event streams included).",
		}),
		connectionsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "messenger_connections_refused_total", Help: "Connections refused at a cap: addr_limit (CONN_MAX_PER_ADDR) or server_full (CONN_MAX).",
		}, []string{"reason"}),
		peerInstances: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "messenger_peer_instances", Help: "Other instances sharing the database, as last read (LISTEN/NOTIFY only: with none, no NOTIFY is sent).",
		}),
		sendBatchDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "messenger_send_batch_duration_seconds",
			Help: "Time each send transaction (send_messages) held the send path, until its answer was read and its messages handed on. " +
				"Batches normally run one at a time: the rate of the sum is the share of time one is in flight.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 12), // 0.5 ms to 1 s
		}),
		sendBatchMessages: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "messenger_send_batch_messages",
			Help:    "Messages in each send transaction (send_messages); a split batch's messages count again when retried alone.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 7), // 1 to maxSendBatch
		}),
	}
	m.registry.MustRegister(m.sendBatchDuration, m.sendBatchMessages, m.peerInstances, m.connectionsOpen, m.connectionsRefused, m.sessionsEnded, m.notifyFailures, m.requests, m.requestDuration, m.streamsOpen, m.eventsDelivered,
		m.streamsDroppedSlow, m.streamsRefused, m.streamResets, m.eventsPruned, m.listenerReconnects,
		m.busMessages, m.busReconnects, m.busSlow,
		collectors.NewDBStatsCollector(db, "messenger"),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Every label value exists from the start, so that a dashboard sees zeros.
	for _, direction := range []string{"published", "received"} {
		m.busMessages.WithLabelValues(direction)
	}
	for _, reason := range []string{"user_limit", "server_full"} {
		m.streamsRefused.WithLabelValues(reason)
	}
	for _, reason := range []string{refusedAddrLimit, refusedServerFull} {
		m.connectionsRefused.WithLabelValues(reason)
	}
	for _, reason := range []string{resetTooFarBehind, resetExpired, resetUnknownPosition} {
		m.streamResets.WithLabelValues(reason)
	}
	return m
}

// observeRequest counts a request under labels from closed sets only, so that
// what a client sends cannot add series: route is a registered pattern or
// "(not found)" (the caller's, never the path), the method is a standard one or
// "other", and the status is one net/http names or "other".
func (m *metrics) observeRequest(route, method string, status int, d time.Duration) {
	m.requests.WithLabelValues(route, methodLabel(method), statusLabel(status)).Inc()
	m.requestDuration.WithLabelValues(route).Observe(d.Seconds())
}

// methodLabel returns method if it is one of HTTP's standard methods, else "other".
func methodLabel(method string) string {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodOptions, http.MethodConnect, http.MethodTrace:
		return method
	}
	return "other"
}

// statusLabel returns the status code as text if net/http knows it, else "other".
func statusLabel(status int) string {
	if http.StatusText(status) == "" && status != statusClientGone {
		return "other"
	}
	return strconv.Itoa(status)
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}
