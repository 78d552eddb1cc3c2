package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"unicode/utf8"
)

// Log lines carry strings that come from requests (a method, a path, an error
// that quotes its input, a line of net/http's own ErrorLog), so every string is
// cut, in this one place, before it reaches a log: an attribute's value at
// maxLogValue bytes, a message at maxLogMessage. The handlers below quote what
// they write, so control characters show as escapes (\x00, \n) and cannot forge
// a line.
const (
	maxLogValue   = 256
	maxLogMessage = 1024
)

// newLogger returns a structured logger writing text or JSON to w, with every
// string cut to its limit.
func newLogger(format string, w io.Writer) *slog.Logger {
	var h slog.Handler = slog.NewTextHandler(w, nil)
	if format == "json" {
		h = slog.NewJSONHandler(w, nil)
	}
	return slog.New(boundedHandler{h})
}

// boundedHandler cuts the message and every string attribute (errors and other
// values included, as their text) of each record before its handler writes it.
type boundedHandler struct{ slog.Handler }

func (h boundedHandler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, cutLogString(r.Message, maxLogMessage), r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(boundAttr(a))
		return true
	})
	return h.Handler.Handle(ctx, out)
}

func (h boundedHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	bounded := make([]slog.Attr, len(attrs))
	for i, a := range attrs {
		bounded[i] = boundAttr(a)
	}
	return boundedHandler{h.Handler.WithAttrs(bounded)}
}

func (h boundedHandler) WithGroup(name string) slog.Handler {
	return boundedHandler{h.Handler.WithGroup(name)}
}

// boundAttr returns a with its value cut to maxLogValue bytes: strings as they
// are, groups member by member, anything else that is not a number, a time or a
// duration by its text.
func boundAttr(a slog.Attr) slog.Attr {
	v := a.Value.Resolve()
	switch v.Kind() {
	case slog.KindString:
		v = slog.StringValue(cutLogString(v.String(), maxLogValue))
	case slog.KindGroup:
		group := v.Group()
		bounded := make([]slog.Attr, len(group))
		for i, g := range group {
			bounded[i] = boundAttr(g)
		}
		v = slog.GroupValue(bounded...)
	case slog.KindAny:
		var s string
		switch x := v.Any().(type) {
		case error:
			s = x.Error()
		case fmt.Stringer:
			s = x.String()
		default:
			s = fmt.Sprintf("%+v", x)
		}
		v = slog.StringValue(cutLogString(s, maxLogValue))
	}
	return slog.Attr{Key: a.Key, Value: v}
}

// cutLogString returns s if it has at most n bytes, else its first n bytes (at
// most, back to the start of a UTF-8 sequence) followed by how many were cut.
func cutLogString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := n
	for i > 0 && !utf8.RuneStart(s[i]) && n-i < utf8.UTFMax {
		i--
	}
	return s[:i] + "…(" + strconv.Itoa(len(s)-i) + " more bytes)"
}
