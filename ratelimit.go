package main

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// rateSpec is a token bucket: perSecond tokens a second, up to burst saved up.
// The zero value means no limit.
type rateSpec struct {
	perSecond float64
	burst     int
}

// parseRate reads a limit written "N/s,B" (or /m, /h) or "off" from name.
func parseRate(getenv func(string) string, name, def string) (rateSpec, error) {
	s := strings.TrimSpace(getenv(name))
	if s == "" {
		s = def
	}
	if s == "off" {
		return rateSpec{}, nil
	}
	bad := fmt.Errorf("%s %q: want a rate such as 20/s,60 (per second, burst) or off", name, s)
	r, burstStr, ok := strings.Cut(s, ",")
	count, unit, ok2 := strings.Cut(r, "/")
	if !ok || !ok2 {
		return rateSpec{}, bad
	}
	n, err1 := strconv.ParseFloat(count, 64)
	burst, err2 := strconv.Atoi(burstStr)
	per := map[string]float64{"s": 1, "m": 60, "h": 3600}[unit]
	if err1 != nil || err2 != nil || n <= 0 || burst < 1 || per == 0 {
		return rateSpec{}, bad
	}
	return rateSpec{perSecond: n / per, burst: burst}, nil
}

// rateLimits holds the limiters of each limited action.
type rateLimits struct {
	sends, conversations, typing *limiter[int64]
	logins                       *limiter[string]
}

func newRateLimits(cfg config) *rateLimits {
	return &rateLimits{
		sends:         newLimiter[int64](cfg.rateSends),
		conversations: newLimiter[int64](cfg.rateConversations),
		typing:        newLimiter[int64](rateSpec{perSecond: 2, burst: 5}),
		logins:        newLimiter[string](cfg.rateLogins),
	}
}

// limiter keeps one token bucket per key (a user or a client address), forgetting
// buckets that have been full for a while.
type limiter[K comparable] struct {
	spec rateSpec

	mu      sync.Mutex // guards buckets and swept
	buckets map[K]*rate.Limiter
	swept   time.Time
}

func newLimiter[K comparable](spec rateSpec) *limiter[K] {
	return &limiter[K]{spec: spec, buckets: make(map[K]*rate.Limiter), swept: time.Now()}
}

// allow takes a token for key, or returns a 429 apiError saying when to retry.
func (l *limiter[K]) allow(key K) error {
	if l.spec.perSecond == 0 {
		return nil
	}
	now := time.Now()
	l.mu.Lock()
	if now.Sub(l.swept) > time.Minute {
		for k, b := range l.buckets {
			if b.TokensAt(now) >= float64(l.spec.burst) {
				delete(l.buckets, k)
			}
		}
		l.swept = now
	}
	b := l.buckets[key]
	if b == nil {
		b = rate.NewLimiter(rate.Limit(l.spec.perSecond), l.spec.burst)
		l.buckets[key] = b
	}
	l.mu.Unlock()
	res := b.ReserveN(now, 1)
	if delay := res.DelayFrom(now); delay > 0 {
		res.CancelAt(now)
		return tooMany("too many requests, slow down", delay)
	}
	return nil
}
