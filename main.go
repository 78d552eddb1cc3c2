// Command messenger serves a realtime messaging API over PostgreSQL, pushes each
// user's events to their open streams over Server-Sent Events, and serves the web
// client.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	_ "net/http/pprof" // served only on PPROF_ADDR
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "messenger: %v\n", err)
		os.Exit(1)
	}
}

// config is the server's configuration, read from the environment.
type config struct {
	databaseURL string // the pool's: PostgreSQL itself, or a pooler in transaction mode
	listenURL   string // the LISTEN connection's: always PostgreSQL itself
	addr        string // host:port to listen on
	tlsCertFile string // with tlsKeyFile: serve HTTPS (HTTP/2 and HTTP/1.1); empty: cleartext
	tlsKeyFile  string
	origin      *url.URL
	devLogin    bool
	tokenKey    []byte // empty: taken from the database (development only)
	tokenTTL    time.Duration

	natsURL           string // if set, instances wake each other through NATS, not NOTIFY
	natsSubjectPrefix string // subjects are <prefix>.user.<id>; empty: kept in the database

	sessionMaxAge        time.Duration // hard end of a session, whatever refreshes
	sessionCheckInterval time.Duration // how often streams' sessions are checked
	sessionCacheTTL      time.Duration // how long an open session is trusted without a lookup
	presenceInterval     time.Duration // how often an instance reads which others are there
	notifyAlways         bool          // NOTIFY even when alone (older instances hold no presence lock)
	maxSessionsPerUser   int           // open sessions a user keeps; a sign-in ends the oldest

	githubClientID     string
	githubClientSecret string
	githubWebURL       string // where users authorize (https://github.com)
	githubAPIURL       string // the REST API (https://api.github.com)

	keepAlive       time.Duration // longest silence on a stream
	writeTimeout    time.Duration // deadline of one write to a stream
	http2MaxStreams int           // requests one HTTP/2 connection may have open at once
	// hijackStreams: HTTP/1.1 streams take their connection over (SSE_HIJACK);
	// HTTP/2 streams are always served inside their handler.
	hijackStreams bool
	streamBuffer  int           // events a stream may fall behind before it is dropped
	syncInterval  time.Duration // how often streams are checked against the event log

	streamsPerUser int           // open streams one user may hold on this instance
	streamsMax     int           // open streams on this instance, all users together
	replayMax      int           // most events a resuming stream replays; beyond: reset
	eventRetention time.Duration // age past which events leave the log
	pruneInterval  time.Duration // how often the log is pruned

	dbMaxConns        int
	dbConnMaxLifetime time.Duration // after this, a database connection is replaced

	connMax        int           // open client connections, all addresses together
	connMaxPerAddr int           // open client connections from one address; 0: no cap
	idleTimeout    time.Duration // how long an idle keep-alive connection stays open

	rateSends         rateSpec
	rateConversations rateSpec
	rateLogins        rateSpec

	logFormat string
	pprofAddr string // where to serve net/http/pprof; empty: nowhere

	trustedProxies []netip.Prefix // peers whose X-Forwarded-For or Forwarded is believed
	metricsAddr    string         // where to serve /metrics; empty: on the public listener
}

// loadConfig reads the configuration from getenv, with the documented defaults.
func loadConfig(getenv func(string) string) (config, error) {
	cfg := config{
		databaseURL:        getenv("DATABASE_URL"),
		githubClientID:     getenv("GITHUB_CLIENT_ID"),
		githubClientSecret: getenv("GITHUB_CLIENT_SECRET"),
		githubWebURL:       strings.TrimSuffix(orDefault(getenv("GITHUB_WEB_URL"), "https://github.com"), "/"),
		githubAPIURL:       strings.TrimSuffix(orDefault(getenv("GITHUB_API_URL"), "https://api.github.com"), "/"),
		logFormat:          orDefault(getenv("LOG_FORMAT"), "text"),
		pprofAddr:          getenv("PPROF_ADDR"),
		metricsAddr:        getenv("METRICS_ADDR"),
		tlsCertFile:        getenv("TLS_CERT_FILE"),
		tlsKeyFile:         getenv("TLS_KEY_FILE"),
	}
	if (cfg.tlsCertFile == "") != (cfg.tlsKeyFile == "") {
		return cfg, errors.New("TLS_CERT_FILE and TLS_KEY_FILE: set both, or neither")
	}
	if cfg.databaseURL == "" {
		cfg.databaseURL = "postgres://postgres@127.0.0.1:5432/messenger?sslmode=disable"
	}
	cfg.listenURL = orDefault(getenv("DATABASE_LISTEN_URL"), cfg.databaseURL)
	cfg.natsURL, cfg.natsSubjectPrefix = getenv("NATS_URL"), getenv("NATS_SUBJECT_PREFIX")
	if p := cfg.natsSubjectPrefix; p != "" && (len(p) > 100 || !busPrefixRE.MatchString(p)) {
		return cfg, fmt.Errorf("NATS_SUBJECT_PREFIX %q: want dot-separated tokens of letters, digits, - and _ (at most 100 characters)", p)
	}
	port := orDefault(getenv("PORT"), "3000")
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return cfg, fmt.Errorf("PORT %q: not a port number", port)
	}
	cfg.addr = net.JoinHostPort(getenv("HOST"), port)
	origin, err := url.Parse(orDefault(getenv("ORIGIN"), cfg.scheme()+"://localhost:"+port+"/"))
	if err != nil || (origin.Scheme != "http" && origin.Scheme != "https") || origin.Host == "" {
		return cfg, fmt.Errorf("ORIGIN %q: want an http or https URL", getenv("ORIGIN"))
	}
	cfg.origin = origin

	if cfg.devLogin, err = parseBool(getenv, "DEV_LOGIN", false); err != nil {
		return cfg, err
	}
	if key := getenv("TOKEN_KEY"); key != "" {
		if len(key) < 32 {
			return cfg, errors.New("TOKEN_KEY: want at least 32 characters")
		}
		cfg.tokenKey = []byte(key)
	} else if !cfg.devLogin {
		return cfg, errors.New("TOKEN_KEY is required unless DEV_LOGIN=true (generate one with: openssl rand -hex 32)")
	}
	if cfg.tokenTTL, err = parseDuration(getenv, "TOKEN_TTL", 14*24*time.Hour); err != nil {
		return cfg, err
	}
	if cfg.sessionMaxAge, err = parseDuration(getenv, "SESSION_MAX_AGE", 30*24*time.Hour); err != nil {
		return cfg, err
	}
	if cfg.sessionCheckInterval, err = parseDuration(getenv, "SESSION_CHECK_INTERVAL", time.Minute); err != nil {
		return cfg, err
	}
	if cfg.sessionCacheTTL, err = parseDuration(getenv, "SESSION_CACHE_TTL", 30*time.Second); err != nil {
		return cfg, err
	}
	if cfg.presenceInterval, err = parseDuration(getenv, "PRESENCE_INTERVAL", time.Second); err != nil {
		return cfg, err
	}
	if cfg.presenceInterval >= presenceAckTimeout {
		// A hello lost with an instance's LISTEN connection is made up for by its
		// next read of pg_locks, which must come before the new instance serves.
		return cfg, fmt.Errorf("PRESENCE_INTERVAL %v: must be under %v", cfg.presenceInterval, presenceAckTimeout)
	}
	if cfg.notifyAlways, err = parseBool(getenv, "NOTIFY_ALWAYS", false); err != nil {
		return cfg, err
	}
	if cfg.maxSessionsPerUser, err = parseInt(getenv, "MAX_SESSIONS_PER_USER", 50); err != nil {
		return cfg, err
	}
	if cfg.keepAlive, err = parseDuration(getenv, "SSE_KEEPALIVE", 15*time.Second); err != nil {
		return cfg, err
	}
	if cfg.writeTimeout, err = parseDuration(getenv, "SSE_WRITE_TIMEOUT", 10*time.Second); err != nil {
		return cfg, err
	}
	if cfg.hijackStreams, err = parseBool(getenv, "SSE_HIJACK", true); err != nil {
		return cfg, err
	}
	if cfg.syncInterval, err = parseDuration(getenv, "SSE_SYNC_INTERVAL", 10*time.Second); err != nil {
		return cfg, err
	}
	if cfg.streamBuffer, err = parseInt(getenv, "SSE_BUFFER", 64); err != nil {
		return cfg, err
	}
	if cfg.dbMaxConns, err = parseInt(getenv, "DB_MAX_CONNS", 20); err != nil {
		return cfg, err
	}
	if cfg.dbConnMaxLifetime, err = parseDuration(getenv, "DB_CONN_MAX_LIFETIME", 5*time.Minute); err != nil {
		return cfg, err
	}
	if cfg.http2MaxStreams, err = parseInt(getenv, "HTTP2_MAX_STREAMS", 100); err != nil {
		return cfg, err
	}
	if cfg.streamsPerUser, err = parseInt(getenv, "STREAMS_PER_USER", defaultStreamsPerUser); err != nil {
		return cfg, err
	}
	if cfg.streamsMax, err = parseInt(getenv, "STREAMS_MAX", defaultStreamsMax(cfg.dbMaxConns)); err != nil {
		return cfg, err
	}
	if cfg.connMax, err = parseInt(getenv, "CONN_MAX", defaultConnMax(cfg.dbMaxConns)); err != nil {
		return cfg, err
	}
	if cfg.connMaxPerAddr, err = parseConnMaxPerAddr(getenv); err != nil {
		return cfg, err
	}
	if cfg.idleTimeout, err = parseDuration(getenv, "HTTP_IDLE_TIMEOUT", 75*time.Second); err != nil {
		return cfg, err
	}
	if cfg.replayMax, err = parseInt(getenv, "REPLAY_MAX", 1000); err != nil {
		return cfg, err
	}
	if cfg.eventRetention, err = parseDuration(getenv, "EVENT_RETENTION", 7*24*time.Hour); err != nil {
		return cfg, err
	}
	if cfg.pruneInterval, err = parseDuration(getenv, "EVENT_PRUNE_INTERVAL", 5*time.Minute); err != nil {
		return cfg, err
	}
	if cfg.rateSends, err = parseRate(getenv, "RATE_LIMIT_SENDS", "20/s,60"); err != nil {
		return cfg, err
	}
	if cfg.rateConversations, err = parseRate(getenv, "RATE_LIMIT_CONVERSATIONS", "1/s,20"); err != nil {
		return cfg, err
	}
	if cfg.rateLogins, err = parseRate(getenv, "RATE_LIMIT_LOGINS", "1/s,10"); err != nil {
		return cfg, err
	}
	if cfg.trustedProxies, err = parseTrustedProxies(getenv("TRUSTED_PROXIES")); err != nil {
		return cfg, err
	}
	if _, _, err := net.SplitHostPort(cfg.metricsAddr); cfg.metricsAddr != "" && err != nil {
		return cfg, fmt.Errorf("METRICS_ADDR %q: want host:port, such as 127.0.0.1:9090", cfg.metricsAddr)
	}
	if cfg.logFormat != "text" && cfg.logFormat != "json" {
		return cfg, fmt.Errorf("LOG_FORMAT %q: want text or json", cfg.logFormat)
	}
	return cfg, nil
}

// scheme is the URL scheme the server answers on: https with TLS_CERT_FILE.
func (cfg config) scheme() string {
	if cfg.tlsCertFile != "" {
		return "https"
	}
	return "http"
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func parseBool(getenv func(string) string, name string, def bool) (bool, error) {
	s := getenv(name)
	if s == "" {
		return def, nil
	}
	b, err := strconv.ParseBool(s)
	if err != nil {
		return false, fmt.Errorf("%s %q: want true or false", name, s)
	}
	return b, nil
}

func parseDuration(getenv func(string) string, name string, def time.Duration) (time.Duration, error) {
	s := getenv(name)
	if s == "" {
		return def, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%s %q: want a positive duration such as 15s", name, s)
	}
	return d, nil
}

func parseInt(getenv func(string) string, name string, def int) (int, error) {
	s := getenv(name)
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%s %q: want a positive whole number", name, s)
	}
	return n, nil
}

// run starts the server and blocks until ctx is done, then shuts it down.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	logger := newLogger(cfg.logFormat, stderr)
	var cert tls.Certificate
	if cfg.tlsCertFile != "" {
		// Checked here, so that a bad pair stops the start instead of the serving.
		if cert, err = tls.LoadX509KeyPair(cfg.tlsCertFile, cfg.tlsKeyFile); err != nil {
			return fmt.Errorf("TLS_CERT_FILE, TLS_KEY_FILE: %w", err)
		}
	}

	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv, err := newServer(ctx, cfg, logger)
	if err != nil {
		ln.Close()
		return err
	}
	defer srv.close()
	if cfg.pprofAddr != "" {
		pl, err := net.Listen("tcp", cfg.pprofAddr)
		if err != nil {
			return fmt.Errorf("listen for pprof: %w", err)
		}
		defer pl.Close()
		// The profiler has its own listener, never the public one.
		go http.Serve(pl, http.DefaultServeMux)
	}
	if cfg.metricsAddr != "" {
		stop, err := srv.serveMetrics(cfg.metricsAddr)
		if err != nil {
			ln.Close()
			return err
		}
		defer stop()
		fmt.Fprintf(stdout, "messenger serving /metrics on http://%s\n", cfg.metricsAddr)
	}
	limiter := newConnLimiter(ln, cfg.connMaxPerAddr, cfg.connMax, srv.trusted, srv.metrics)
	if cfg.tlsCertFile != "" {
		limiter.refuseOverTLS(cert)
	}
	ln = limiter
	fmt.Fprintf(stdout, "messenger listening on %s://%s\n", cfg.scheme(), ln.Addr())
	return srv.serve(ctx, ln)
}

// server is one running instance: its database, hub, listener and HTTP server.
type server struct {
	cfg      config
	db       *sql.DB
	hub      *Hub
	tokens   *tokenSigner
	limits   *rateLimits
	metrics  *metrics
	logger   *slog.Logger
	http     *http.Server
	listener *pgListener
	bus      *natsBus // nil unless NATS_URL is set
	notifier *notifier
	sends    *sendBatcher
	presence *presence // nil with the bus (NATS_URL)

	// The background work, in the order close stops it.
	listening      *group // the listener and the bus: notifications in
	sending        *group // the send workers
	notifying      *group // the notifier: notifications out
	upkeep         *group // stream syncs, session checks, clean-up, retention
	presenceAnswer *group // answering new instances (nil: no presence)
	presenceWatch  *group // reading who is there, keeping this instance's lock

	sessionCache *sessionCache // open sessions, remembered briefly (see sessions.go)
}

// newServer opens the database, applies the schema and starts the fan-out from
// PostgreSQL notifications. The caller must call close.
func newServer(ctx context.Context, cfg config, logger *slog.Logger) (*server, error) {
	db, err := openDB(ctx, cfg, logger)
	if err != nil {
		return nil, err
	}
	if cfg.tokenKey == nil {
		if cfg.tokenKey, err = developmentTokenKey(ctx, db); err != nil {
			db.Close()
			return nil, err
		}
	}
	m := newMetrics(db)
	s := &server{
		cfg:     cfg,
		db:      db,
		tokens:  &tokenSigner{key: cfg.tokenKey, ttl: cfg.tokenTTL},
		limits:  newRateLimits(cfg),
		metrics: m,
		logger:  logger,

		sessionCache: newSessionCache(cfg.sessionCacheTTL),
	}
	channels := []string{notifyChannel, sessionsChannel, instancesChannel}
	if cfg.natsURL != "" {
		if s.bus, err = openBus(ctx, cfg, db, m, logger); err != nil {
			db.Close()
			return nil, err
		}
		channels = []string{sessionsChannel} // sign-outs stay on PostgreSQL
	}
	s.hub = newHub(db, cfg, m, logger)
	s.hub.bus = s.bus
	s.notifier = newNotifier(db, s.hub, s.bus, m, logger)
	if s.bus == nil {
		direct, err := sql.Open("postgres", cfg.listenURL)
		if err != nil {
			db.Close()
			return nil, fmt.Errorf("DATABASE_LISTEN_URL: %w", err)
		}
		direct.SetMaxOpenConns(2)
		s.presence = newPresence(direct, db, s.hub, cfg.presenceInterval, m, logger)
		s.presence.always = cfg.notifyAlways
		s.notifier.peers = s.presence
	}
	s.sends = newSendBatcher(db, s.notifier.enqueue, cfg.listenURL == cfg.databaseURL, cfg.dbConnMaxLifetime, m, logger)
	sessions := newSessionWatcher(s.hub, s.sessionCache, db, cfg.sessionCheckInterval, logger)
	if s.listener, err = listen(cfg.listenURL, channels, s.hub, sessions, s.presence, m, logger); err != nil {
		s.presence.close()
		s.bus.close()
		db.Close()
		return nil, err
	}

	// The background work, in the groups that stop in turn (see close).
	listeners := []func(context.Context){func(ctx context.Context) { s.listener.run(ctx, cfg.syncInterval) }}
	if s.bus != nil {
		listeners = append(listeners, func(ctx context.Context) { s.bus.run(ctx, s.hub) })
	}
	s.listening = startGroup(listeners...)
	s.sending = startGroup(s.sends.run)
	s.notifying = startGroup(s.notifier.run)
	s.upkeep = startGroup(
		func(ctx context.Context) { s.hub.syncStreams(ctx, cfg.syncInterval) },
		func(ctx context.Context) { s.hub.keepAlives(ctx, cfg.keepAlive) },
		sessions.run,
		s.cleanUp,
		func(ctx context.Context) { every(ctx, cfg.pruneInterval, nil, func() { s.pruneEvents(ctx) }) },
	)
	if s.presence != nil {
		// Before serving: every running instance notifies this one from now on.
		// Hellos are answered from the start, so that instances starting together
		// do not wait for each other.
		s.presenceAnswer = startGroup(s.presence.answer)
		if err := s.presence.register(ctx); err != nil {
			s.close()
			return nil, err
		}
		s.presenceWatch = startGroup(s.presence.watch)
	}

	s.http = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       cfg.idleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		// No WriteTimeout: it would end every event stream. Streams set a deadline
		// per write, and other handlers answer from the database, whose calls are
		// bounded by requestTimeout.
		Protocols: serverProtocols(),
		// Over HTTP/2 a stuck connection must not hold its streams: a write that
		// moves no byte for SSE_WRITE_TIMEOUT fails the whole connection (a stream's
		// own write deadline only queues a reset behind the stuck writer). And one
		// connection carries at most HTTP2_MAX_STREAMS requests at once, so that
		// CONN_MAX_PER_ADDR still bounds what one address holds.
		HTTP2: &http.HTTP2Config{WriteByteTimeout: cfg.writeTimeout, MaxConcurrentStreams: cfg.http2MaxStreams},
	}
	s.http.RegisterOnShutdown(s.hub.closeAll)
	return s, nil
}

// serverProtocols are the protocols the server speaks: HTTP/1.1; HTTP/2 over TLS,
// which browsers use (one connection for all of a person's tabs, where HTTP/1.1
// allows 6 connections to a site and so at most 6 open streams); and cleartext
// HTTP/2 with prior knowledge (h2c), which reverse proxies speak to back ends.
func serverProtocols() *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetHTTP2(true)
	p.SetUnencryptedHTTP2(true)
	return &p
}

// serve answers requests on ln until ctx is done, then shuts down gracefully: it
// stops accepting, ends every stream (clients reconnect elsewhere and resume), and
// waits for requests in flight.
func (s *server) serve(ctx context.Context, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() {
		if s.cfg.tlsCertFile != "" {
			errc <- s.http.ServeTLS(ln, s.cfg.tlsCertFile, s.cfg.tlsKeyFile)
			return
		}
		errc <- s.http.Serve(ln)
	}()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.http.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	// Hijacked streams run outside the HTTP server (see handleStream); Shutdown
	// has ended them through closeAll, and they finish their last write here.
	streamsDone := make(chan struct{})
	go func() {
		s.hub.running.Wait()
		close(streamsDone)
	}()
	select {
	case <-streamsDone:
	case <-shutdownCtx.Done():
		return errors.New("shutdown: streams did not end in time")
	}
	return nil
}

// serveMetrics serves /metrics on its own listener at addr, which the public one
// then does not. stop closes it and waits until it has stopped.
func (s *server) serveMetrics(addr string) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", s.metrics.handler())
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		ErrorLog: slog.NewLogLogger(s.logger.Handler(), slog.LevelWarn)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := hs.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			s.logger.Error("serve metrics", "err", err)
		}
	}()
	return func() {
		hs.Close()
		<-done
	}, nil
}

// close stops what newServer started, after serve has shut the HTTP server down
// (it stopped accepting, ended every stream with a last retry and waited for the
// requests in flight, so no request is left waiting on a send). The whole order of
// a shutdown is:
//
//  1. stop accepting connections; end every stream (serve);
//  2. stop the listener and the bus's subscriptions: no more notifications in;
//  3. drain the send workers: batches in flight commit and are answered;
//  4. stop the notifier, which sends what the last batches queued, through the bus
//     if there is one; then close the bus's connection and the listener's;
//  5. stop the upkeep loops (stream syncs, session checks, clean-up, retention);
//  6. close the database.
//
// Before 2 it also stops answering new instances and releases its presence lock:
// its streams have ended, so the others need not notify it any more, and an
// instance starting meanwhile stops waiting for its answer once the lock is gone.
func (s *server) close() {
	for _, g := range []*group{s.presenceWatch, s.presenceAnswer} {
		if g != nil {
			g.stop()
		}
	}
	s.presence.close()
	s.listening.stop()
	s.sending.stop()
	s.notifying.stop()
	s.bus.close()
	s.listener.close()
	s.upkeep.stop()
	s.db.Close()
}

// group is background work that runs until stopped.
type group struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startGroup runs each fn on a goroutine of its own with a context that stop
// cancels.
func startGroup(fns ...func(ctx context.Context)) *group {
	ctx, cancel := context.WithCancel(context.Background())
	g := &group{cancel: cancel}
	for _, fn := range fns {
		g.wg.Go(func() { fn(ctx) })
	}
	return g
}

// stop cancels the group's context and waits until every goroutine has returned.
func (g *group) stop() {
	g.cancel()
	g.wg.Wait()
}

// cleanUp deletes expired idempotency keys and sessions once an hour.
func (s *server) cleanUp(ctx context.Context) {
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	for {
		if _, err := s.db.ExecContext(ctx, `DELETE FROM idempotency_keys WHERE created_at < now() - interval '48 hours'`); err != nil && ctx.Err() == nil {
			s.logger.Warn("clean up idempotency keys", "err", err)
		}
		// An ended session's row stays a day, so that streams learn why it ended.
		if _, err := s.db.ExecContext(ctx, `DELETE FROM sessions WHERE expires_at < now() OR ended_at < now() - interval '1 day'`); err != nil && ctx.Err() == nil {
			s.logger.Warn("clean up sessions", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// openDB connects to PostgreSQL, sizes the pool and applies the migrations.
func openDB(ctx context.Context, cfg config, logger *slog.Logger) (*sql.DB, error) {
	dsn, err := poolerSafeDSN(cfg.databaseURL)
	if err != nil {
		return nil, fmt.Errorf("DATABASE_URL: %w", err)
	}
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	db.SetMaxOpenConns(cfg.dbMaxConns)
	db.SetMaxIdleConns(cfg.dbMaxConns)
	db.SetConnMaxIdleTime(5 * time.Minute)
	// A session keeps the plans it made (PL/pgSQL's, the send workers' prepared
	// statement) until a table's statistics change. Plans made on a new, empty
	// database are scans; where autovacuum is off they would last as long as the
	// connection, so no connection lasts much longer than this (the send workers'
	// own: sendBatcher.renew).
	db.SetConnMaxLifetime(cfg.dbConnMaxLifetime)
	if err := migrate(ctx, db, logger); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// poolerSafeDSN returns dsn with lib/pq's binary_parameters on, unless dsn sets it.
// With it, a query with parameters goes out as one Parse/Bind/Execute/Sync in a
// single round trip on the unnamed statement, instead of a Parse and Sync first and
// the Bind after: one round trip fewer for every query, and a PgBouncer in
// transaction mode, which may hand each Sync to another server connection, never
// sees a statement parsed on one connection and bound on another. Behind a pooler
// the server prepares no named statements (the send workers prepare theirs only
// straight to PostgreSQL), so nothing else depends on the session.
func poolerSafeDSN(dsn string) (string, error) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", errors.New("not a valid URL")
		}
		q := u.Query()
		if q.Get("binary_parameters") == "" {
			q.Set("binary_parameters", "yes")
			u.RawQuery = q.Encode()
		}
		return u.String(), nil
	}
	if strings.Contains(dsn, "binary_parameters") {
		return dsn, nil
	}
	return strings.TrimSpace(dsn + " binary_parameters=yes"), nil
}

// developmentTokenKey returns the token key kept in the database, creating it on
// first use, so that tokens survive restarts and work on every instance.
func developmentTokenKey(ctx context.Context, db *sql.DB) ([]byte, error) {
	b := make([]byte, 32)
	rand.Read(b)
	key, err := storedSetting(ctx, db, "dev_token_key", hex.EncodeToString(b))
	if err != nil {
		return nil, fmt.Errorf("development token key: %w", err)
	}
	return []byte(key), nil
}
