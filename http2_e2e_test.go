package main

import (
	"fmt"
	"os"
	"testing"

	"github.com/chromedp/chromedp"
)

// TestE2EEightTabsOverHTTP2: one person with 8 tabs of the web client open, served
// over HTTP/2 (TLS), receives a live message in every tab. Over HTTP/1.1 a browser
// opens at most 6 connections to a site, each open stream holds one, and the 7th
// tab hangs: E2E_TABS_OVER_HTTP1=1 runs the same test over HTTP/1.1, where it fails.
func TestE2EEightTabsOverHTTP2(t *testing.T) {
	const tabs = 8
	proto := protocolNamed("HTTP2-TLS")
	if os.Getenv("E2E_TABS_OVER_HTTP1") != "" {
		proto = protocolNamed("HTTP1.1-hijacked")
	}
	ts := newTestServerOver(t, proto)
	name := uniqueName("tabs")
	b := newBrowser(t, ts, "tab 1", desktop)
	b.signIn(name)
	me, friend := ts.login(t, name), ts.newUser(t, "friend")
	conv := friend.startConversation(me)

	// Tabs 2 to 8: more tabs of the same browser, signed in through its storage.
	all := []*browser{b}
	for i := 2; i <= tabs; i++ {
		ctx, cancel := chromedp.NewContext(b.ctx)
		t.Cleanup(cancel)
		tab := &browser{t: t, name: fmt.Sprintf("tab %d", i), base: b.base, ctx: ctx}
		// A tab that cannot get a connection never loads: do not wait for it here.
		go chromedp.Run(ctx, chromedp.Navigate(b.base+"/"))
		all = append(all, tab)
	}
	open := 0.0
	waitFor(t, 2*e2eWait, fmt.Sprintf("%d open streams", tabs), func() bool {
		if n := metricValue(t, ts, "messenger_streams_open"); n != open {
			t.Logf("%v streams open", n)
			open = n
		}
		return open == tabs
	})

	text := "to every tab " + randomHex(3)
	friend.send(conv.ID, text)
	preview := fmt.Sprintf(`document.querySelector('.conversation-item[data-id="%s"] .preview')?.textContent.includes(%s)`,
		conv.ID, jsString(text))
	for _, tab := range all {
		tab.waitUntil("the message arrives live", preview)
	}
	if got := eval[string](all[tabs-1], `performance.getEntriesByType('navigation')[0].nextHopProtocol`); got != "h2" {
		t.Errorf("the page came over %q, want h2", got)
	}
}
