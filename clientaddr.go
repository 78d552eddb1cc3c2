package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// parseTrustedProxies reads TRUSTED_PROXIES: comma-separated CIDRs (a bare address
// is one host), empty for none.
func parseTrustedProxies(s string) ([]netip.Prefix, error) {
	var nets []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return nil, fmt.Errorf("TRUSTED_PROXIES %q: %q is not a CIDR such as 10.0.0.0/8 or an address", s, f)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		nets = append(nets, p.Masked())
	}
	return nets, nil
}

type clientAddrKey struct{}

// clientIP is the address of the client that sent r, as clientAddress found it:
// the key of per-client limits before sign-in, and the client in the request log.
func clientIP(r *http.Request) string {
	if a, ok := r.Context().Value(clientAddrKey{}).(string); ok {
		return a
	}
	return peerIP(r)
}

// peerIP is the address of the TCP peer of r.
func peerIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// clientAddress finds the client's address for clientIP. It is the TCP peer's,
// unless the peer is one of TRUSTED_PROXIES: then it is the rightmost address of
// X-Forwarded-For (or, without one, of Forwarded's for= parameters) that is not a
// trusted proxy, as each proxy appends the address it got the request from. A
// header that cannot be read that far leaves the peer's address: the limits are
// then shared by everyone behind that proxy, as without the setting.
func (s *server) clientAddress(h http.Handler) http.Handler {
	if len(s.cfg.trustedProxies) == 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		peer := peerIP(r)
		if addr, err := netip.ParseAddr(peer); err == nil && s.trusted(addr.Unmap().WithZone("")) {
			if client, ok := s.forwardedClient(r.Header); ok {
				r = r.WithContext(context.WithValue(r.Context(), clientAddrKey{}, client))
			}
		}
		h.ServeHTTP(w, r)
	})
}

func (s *server) trusted(a netip.Addr) bool {
	for _, p := range s.cfg.trustedProxies {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// forwardedClient returns the rightmost forwarded address that is not a trusted
// proxy (the leftmost, if all are), or false if there is none or an entry up to it
// is not an address.
func (s *server) forwardedClient(h http.Header) (string, bool) {
	var hops []string
	if xff := h.Values("X-Forwarded-For"); len(xff) > 0 {
		for _, line := range xff {
			hops = append(hops, strings.Split(line, ",")...)
		}
	} else if fwd := h.Values("Forwarded"); len(fwd) > 0 {
		for _, line := range fwd {
			for _, elem := range splitQuoted(line, ',') {
				hops = append(hops, forwardedFor(elem))
			}
		}
	} else {
		return "", false
	}
	var client netip.Addr
	for i := len(hops) - 1; i >= 0; i-- {
		a, ok := parseHop(hops[i])
		if !ok {
			return "", false
		}
		client = a
		if !s.trusted(a) {
			break
		}
	}
	return client.String(), true
}

// parseHop reads one forwarded address: "192.0.2.1", "2001:db8::1", and the same
// with a port ("192.0.2.1:4711", "[2001:db8::1]:4711"), as some proxies write.
func parseHop(s string) (netip.Addr, bool) {
	s = strings.TrimSpace(s)
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		return a.Unmap().WithZone(""), true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap().WithZone(""), true
	}
	return netip.Addr{}, false
}

// forwardedFor returns the for= parameter of one element of a Forwarded header
// (RFC 7239), unquoted; "" when it has none.
func forwardedFor(elem string) string {
	for _, pair := range splitQuoted(elem, ';') {
		name, value, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if ok && strings.EqualFold(name, "for") {
			if len(value) >= 2 && value[0] == '"' && value[len(value)-1] == '"' {
				value = strings.ReplaceAll(value[1:len(value)-1], `\`, "")
			}
			return value
		}
	}
	return ""
}

// splitQuoted splits s at sep outside double quotes.
func splitQuoted(s string, sep byte) []string {
	var parts []string
	quoted, start := false, 0
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '"':
			quoted = !quoted
		case s[i] == '\\' && quoted:
			i++
		case s[i] == sep && !quoted:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:])
}
