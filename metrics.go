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
	listenerReconnects prometheus.Counter
	notifyFailures     prometheus.Counter
	busMessages        *prometheus.CounterVec
	busReconnects      prometheus.Counter
	sessionsEnded      *prometheus.CounterVec
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
		sessionsEnded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "messenger_sessions_ended_total", Help: "Sessions ended through this instance, by reason (signed_out, signed_out_everywhere, too_many_sessions).",
		}, []string{"reason"}),
	}
	m.registry.MustRegister(m.sessionsEnded, m.notifyFailures, m.requests, m.requestDuration, m.streamsOpen, m.eventsDelivered,
		m.streamsDroppedSlow, m.listenerReconnects, m.busMessages, m.busReconnects,
		collectors.NewDBStatsCollector(db, "messenger"),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, direction := range []string{"published", "received"} {
		m.busMessages.WithLabelValues(direction) // shown at 0 from the start
	}
	return m
}

func (m *metrics) observeRequest(route, method string, status int, d time.Duration) {
	m.requests.WithLabelValues(route, method, strconv.Itoa(status)).Inc()
	m.requestDuration.WithLabelValues(route).Observe(d.Seconds())
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}
