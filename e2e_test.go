package main

// End-to-end tests of the web client: Debian's Chromium, driven through the
// DevTools protocol, against the real server of newTestServer. Each browser is a
// separate Chromium process with its own fresh profile, so two browsers are two
// people. Every test saves what it ends on (see screenshotDirectory).
//
// Run them with: go test -race -run E2E ./...

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/fetch"
	"github.com/chromedp/cdproto/input"
	"github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// e2eWait is the longest a test waits for one thing to show in a browser.
const e2eWait = 20 * time.Second

// screenshotDirectory is where screenshots go: $SCREENSHOT_DIR (make screenshots
// sets docs/screenshots, which the README shows), else a folder in the system's
// temporary directory, so that a test run leaves the work tree as it was.
func screenshotDirectory() string {
	if d := os.Getenv("SCREENSHOT_DIR"); d != "" {
		return d
	}
	return filepath.Join(os.TempDir(), "messenger-screenshots")
}

type viewport struct {
	width, height int64
	mobile        bool
}

var (
	desktop = viewport{width: 1200, height: 800}
	phone   = viewport{width: 390, height: 844, mobile: true}
)

// chromiumPath returns the browser to drive. Without one the test is skipped,
// except under CI, where a missing browser is a failure.
func chromiumPath(t *testing.T) string {
	t.Helper()
	skipInShortMode(t, "a browser test")
	for _, p := range []string{"/usr/bin/chromium", "/usr/bin/chromium-browser"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("Chromium is not installed (apt-get install chromium): CI must run the browser tests")
	}
	t.Skip("Chromium is not installed (apt-get install chromium); skipping the browser tests")
	return ""
}

// browser is one Chromium with one tab, signed in as one user.
type browser struct {
	t    *testing.T
	name string
	base string
	ctx  context.Context

	mu       sync.Mutex // guards dialogs and problems
	dialogs  []string   // alert, confirm and prompt messages the page opened
	problems []string   // uncaught exceptions and Content-Security-Policy violations
}

// newBrowser starts a Chromium with a fresh profile for the test server ts.
func newBrowser(t *testing.T, ts *testServer, name string, vp viewport) *browser {
	t.Helper()
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-background-timer-throttling", true),
		chromedp.Flag("disable-renderer-backgrounding", true),
		chromedp.Flag("disable-backgrounding-occluded-windows", true),
		chromedp.Flag("password-store", "basic"),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(int(vp.width), int(vp.height)),
	}
	if strings.HasPrefix(ts.URL, "https:") {
		// The test server's certificate is made by the test (selfSignedCert).
		opts = append(opts, chromedp.Flag("ignore-certificate-errors", true))
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelCtx := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		cancelCtx()
		cancelAlloc()
	})
	b := &browser{t: t, name: name, base: ts.URL, ctx: ctx}
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("%s: start Chromium: %v", name, err)
	}
	if vp.mobile {
		if err := chromedp.Do(ctx, chromedp.EmulateViewport(vp.width, vp.height, chromedp.EmulateMobile)); err != nil {
			t.Fatalf("%s: emulate a phone: %v", name, err)
		}
	}
	err := chromedp.Listen(ctx, func(ev any) {
		switch ev := ev.(type) {
		case *page.EventJavascriptDialogOpening:
			b.note(&b.dialogs, ev.Message)
			// Close it from another goroutine: a listener must not send commands.
			go chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: false})
		case *runtime.EventExceptionThrown:
			d := ev.ExceptionDetails
			text := d.Text
			if d.Exception != nil {
				text += " " + d.Exception.Description
			}
			b.note(&b.problems, fmt.Sprintf("uncaught exception at %s:%d: %s", d.URL, d.LineNumber+1, text))
		case *log.EventEntryAdded:
			if strings.Contains(ev.Entry.Text, "Content Security Policy") {
				b.note(&b.problems, "CSP violation: "+ev.Entry.Text)
			}
		}
	})
	if err != nil {
		t.Fatalf("%s: listen to the page: %v", name, err)
	}
	t.Cleanup(func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, p := range b.problems {
			t.Errorf("%s: %s", name, p)
		}
	})
	return b
}

func (b *browser) note(list *[]string, s string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	*list = append(*list, s)
}

func (b *browser) dialogsOpened() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.dialogs)
}

// do runs the steps within e2eWait; on failure it saves a screenshot next to
// the test's temporary files and fails the test.
func (b *browser) do(what string, steps ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, e2eWait)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		b.fail(what, err)
	}
}

func (b *browser) fail(what string, err error) {
	b.t.Helper()
	msg := fmt.Sprintf("%s: %s: %v", b.name, what, err)
	ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
	defer cancel()
	if png, serr := chromedp.Run(ctx, chromedp.CaptureScreenshot()); serr == nil {
		file := filepath.Join(os.TempDir(), fmt.Sprintf("e2e-failure-%s-%s.png", strings.ReplaceAll(b.t.Name(), "/", "_"), b.name))
		if os.WriteFile(file, png, 0o644) == nil {
			msg += "\nscreenshot: " + file
		}
	}
	if html, herr := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body.innerText`)); herr == nil {
		msg += "\npage text:\n" + html
	}
	b.t.Fatal(msg)
}

// eval evaluates a JavaScript expression in the page and decodes its value.
func eval[T any](b *browser, expr string) T {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, e2eWait)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		b.fail("evaluate "+expr, err)
	}
	return v
}

// waitUntil waits until the JavaScript expression is truthy.
func (b *browser) waitUntil(what, expr string) {
	b.t.Helper()
	b.do("wait until "+what, chromedp.Poll[chromedp.Void](expr,
		chromedp.WithPollingInterval(50*time.Millisecond), chromedp.WithPollingTimeout(e2eWait)))
}

// screenshot saves the visible page as name.png in screenshotDirectory.
func (b *browser) screenshot(name string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, e2eWait)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
	if err != nil {
		b.fail("screenshot", err)
	}
	if err := os.MkdirAll(screenshotDirectory(), 0o755); err != nil {
		b.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(screenshotDirectory(), name+".png"), png, 0o644); err != nil {
		b.t.Fatal(err)
	}
}

// signIn signs in through the sign-in page and waits for the home page.
func (b *browser) signIn(username string) {
	b.t.Helper()
	b.do("sign in as "+username,
		chromedp.Navigate(b.base+"/"),
		chromedp.WaitVisible(chromedp.CSS("#login-form")),
		chromedp.SendKeys(chromedp.CSS("#username"), username),
		chromedp.Click(chromedp.CSS(`#login-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS("#new-conversation-form")),
	)
}

// openConversation clicks a conversation on the home page and waits for its history.
func (b *browser) openConversation(id string) {
	b.t.Helper()
	b.do("open conversation "+id,
		chromedp.Click(chromedp.CSS(fmt.Sprintf(`.conversation-item[data-id="%s"] a`, id))),
		chromedp.WaitVisible(chromedp.CSS("#message-form")),
	)
	b.waitUntil("the history has loaded", `document.querySelector('#messages .message[data-id]') !== null || /beginning/.test(document.querySelector('.older-status')?.textContent)`)
}

// send types a message in the conversation's box and presses Enter.
func (b *browser) send(text string) {
	b.t.Helper()
	b.do("type a message", chromedp.SendKeys(chromedp.CSS("#message-input"), text))
	b.pressEnter()
}

// pressEnter presses Enter in the focused element the way a keyboard does: one
// keyDown that carries the text, so that preventDefault on keydown stops the new
// line (chromedp's SendKeys("\r") sends the text in a separate char event).
func (b *browser) pressEnter() {
	b.t.Helper()
	b.pressKey("Enter", 13, "\r", 0)
}

// pressKey presses and releases a key in the focused element. modifiers is a bit
// field: Alt=1, Ctrl=2, Meta=4, Shift=8.
func (b *browser) pressKey(key string, keyCode int64, text string, modifiers int64) {
	b.t.Helper()
	b.do("press "+key, chromedp.Func(func(ctx context.Context, t *chromedp.Target) error {
		ev := input.DispatchKeyEventParams{Key: key, Code: key, WindowsVirtualKeyCode: keyCode, NativeVirtualKeyCode: keyCode, Modifiers: modifiers}
		down, up := ev, ev
		down.Type, down.Text, down.UnmodifiedText = input.DispatchKeyEventTypeKeyDown, text, text
		if text == "" {
			down.Type = input.DispatchKeyEventTypeRawKeyDown
		}
		up.Type = input.DispatchKeyEventTypeKeyUp
		for _, ev := range []input.DispatchKeyEventParams{down, up} {
			if _, err := chromedp.Call(ctx, input.DispatchKeyEvent, ev); err != nil {
				return err
			}
		}
		return nil
	}))
}

// tabTo presses Tab until the focused element matches the CSS selector, and
// checks that focus is visible there.
func (b *browser) tabTo(selector string) {
	b.t.Helper()
	for range 30 {
		if eval[bool](b, fmt.Sprintf(`document.activeElement?.matches(%s) === true`, jsString(selector))) {
			style := eval[string](b, `(() => { const s = getComputedStyle(document.activeElement); return s.outlineStyle + ' ' + s.outlineWidth; })()`)
			if strings.HasPrefix(style, "none") || strings.HasSuffix(style, " 0px") {
				b.t.Errorf("%s: focus on %s is not visible (outline %s)", b.name, selector, style)
			}
			return
		}
		b.pressKey("Tab", 9, "", 0)
	}
	b.fail("tab to "+selector, errors.New("not reached in 30 presses of Tab"))
}

// shownMessage is a message as the conversation page shows it.
type shownMessage struct {
	ID      string `json:"id"`
	Content string `json:"content"`
	Mine    bool   `json:"mine"`
	Pending bool   `json:"pending"`
	Failed  bool   `json:"failed"`
}

// messages returns every message on the conversation page, top to bottom.
func (b *browser) messages() []shownMessage {
	b.t.Helper()
	return eval[[]shownMessage](b, `[...document.querySelectorAll('#messages .message')].map(li => ({
		id: li.dataset.id ?? '',
		content: li.querySelector('.content').textContent,
		mine: li.classList.contains('mine'),
		pending: li.classList.contains('pending'),
		failed: li.classList.contains('failed'),
	}))`)
}

// jsString quotes s as a JavaScript string literal.
func jsString(s string) string {
	var sb strings.Builder
	sb.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			sb.WriteByte('\\')
			sb.WriteRune(r)
		case r < 0x20 || r == 0x2028 || r == 0x2029:
			fmt.Fprintf(&sb, `\u%04x`, r)
		default:
			sb.WriteRune(r)
		}
	}
	sb.WriteByte('"')
	return sb.String()
}

// messageShownOnce is a JavaScript condition: exactly one confirmed message has content.
func messageShownOnce(content string) string {
	return fmt.Sprintf(`[...document.querySelectorAll('#messages .message[data-id] .content')].filter(c => c.textContent === %s).length === 1`, jsString(content))
}

// checkEachOnce fails unless every message id on the page is unique and each of
// contents is shown exactly once.
func checkEachOnce(t *testing.T, shown []shownMessage, contents ...string) {
	t.Helper()
	ids := map[string]int{}
	texts := map[string]int{}
	for _, m := range shown {
		if m.ID == "" {
			t.Errorf("message %q has no id (pending %v, failed %v)", m.Content, m.Pending, m.Failed)
			continue
		}
		ids[m.ID]++
		texts[m.Content]++
	}
	for id, n := range ids {
		if n != 1 {
			t.Errorf("message %s shown %d times, want once", id, n)
		}
	}
	for _, c := range contents {
		if texts[c] != 1 {
			t.Errorf("message %q shown %d times, want once", c, texts[c])
		}
	}
}

// TestE2ETwoPeopleTalk: alice and bob, each in their own browser, talk live.
func TestE2ETwoPeopleTalk(t *testing.T) {
	ts := newTestServer(t)
	aliceName, bobName := uniqueName("alice"), uniqueName("bob")
	alice := newBrowser(t, ts, "alice", desktop)
	bob := newBrowser(t, ts, "bob", phone)

	bob.signIn(bobName)
	bob.do("mark the page, to tell a reload", chromedp.Evaluate[chromedp.Void](`window.sameDocument = true`))
	alice.signIn(aliceName)

	// Alice finds bob through the suggestions and starts a conversation.
	alice.do("type bob's name", chromedp.SendKeys(chromedp.CSS("#new-username"), bobName[:len(bobName)-3]))
	alice.waitUntil("bob is suggested", fmt.Sprintf(`[...document.querySelectorAll('#username-suggestions option')].some(o => o.value === %s)`, jsString(bobName)))
	alice.do("start the conversation",
		chromedp.SendKeys(chromedp.CSS("#new-username"), bobName[len(bobName)-3:]),
		chromedp.Click(chromedp.CSS(`#new-conversation-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS("#message-input")),
	)
	alice.waitUntil("the page is the conversation with bob", fmt.Sprintf(`/^\/conversations\/[^/]+$/.test(location.pathname) && document.querySelector('h1').textContent === %s`, jsString(bobName)))
	conversationID := eval[string](alice, `location.pathname.split('/').pop()`)

	// Bob's tab goes to the background: the title counts what he has not read.
	bob.do("hide bob's page", chromedp.Evaluate[chromedp.Void](`Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
		document.dispatchEvent(new Event('visibilitychange'))`))

	hello := "Hello Bob! How are you?"
	alice.send(hello)
	alice.waitUntil("the message is confirmed", messageShownOnce(hello)+` && !document.querySelector('.message.pending')`)
	if v := eval[string](alice, `document.querySelector('#message-input').value`); v != "" {
		t.Errorf("message box after sending holds %q, want it empty", v)
	}

	// Bob, on his home page, sees it arrive with an unread badge, without a reload.
	item := fmt.Sprintf(`.conversation-item[data-id="%s"]`, conversationID)
	bob.waitUntil("the conversation shows with 1 unread", fmt.Sprintf(
		`document.querySelector(%s)?.querySelector('.badge')?.textContent === '1' && document.querySelector(%s).querySelector('.preview').textContent.includes(%s)`,
		jsString(item), jsString(item), jsString(hello)))
	if !eval[bool](bob, `window.sameDocument === true`) {
		t.Error("bob's page was reloaded, want the conversation to arrive live")
	}
	bob.waitUntil("the hidden tab's title counts 1 unread", `document.title === '(1) Messenger'`)
	bob.do("show bob's page again", chromedp.Evaluate[chromedp.Void](`delete document.visibilityState;
		document.dispatchEvent(new Event('visibilitychange'))`))
	bob.waitUntil("the visible tab's title is plain", `document.visibilityState === 'visible' && document.title === 'Messenger'`)
	bob.screenshot("e2e-home-unread-phone")

	// Bob opens it (which marks it read) and replies; alice sees him typing.
	bob.openConversation(conversationID)
	bob.waitUntil("alice's message is shown", messageShownOnce(hello))
	alice.waitUntil("alice sees Seen under her message", `document.querySelector('.message.mine[data-id] .seen') !== null`)

	reply := "Hi Alice, all good."
	bob.do("type a reply", chromedp.SendKeys(chromedp.CSS("#message-input"), reply))
	alice.do("alice sees bob typing", chromedp.WaitVisible(chromedp.CSS(".typing")))
	alice.screenshot("e2e-typing")
	bob.pressEnter()

	alice.waitUntil("alice sees the reply", messageShownOnce(reply))
	alice.waitUntil("Seen is still under alice's message", `document.querySelector('.message.mine[data-id] .seen') !== null`)
	bob.waitUntil("bob's reply is confirmed", messageShownOnce(reply)+` && !document.querySelector('.message.pending')`)

	for _, b := range []*browser{alice, bob} {
		shown := b.messages()
		checkEachOnce(t, shown, hello, reply)
		if len(shown) != 2 {
			t.Errorf("%s sees %d messages, want 2: %+v", b.name, len(shown), shown)
		}
	}
	// Alice has the conversation open, so the reply is read at once, and bob sees it.
	bob.waitUntil("bob sees Seen under his reply", `document.querySelector('.message.mine[data-id] .seen') !== null`)
	if n := eval[int](alice, `document.querySelectorAll('.seen').length`); n != 1 {
		t.Errorf("alice sees %d Seen marks, want 1", n)
	}
	alice.screenshot("e2e-conversation-desktop")
	bob.screenshot("e2e-conversation-phone")
}

// TestE2EHistory: a reload keeps the conversation, and scrolling up loads all of
// a long history, each message once, without the view jumping.
func TestE2EHistory(t *testing.T) {
	ts := newTestServer(t)
	carol, dave := ts.newUser(t, "carol"), ts.newUser(t, "dave")
	conv := carol.startConversation(dave)
	var want []string
	for i := 1; i <= 60; i++ {
		sender := carol
		if i%3 == 0 {
			sender = dave
		}
		content := fmt.Sprintf("Message %02d", i)
		sender.send(conv.ID, content)
		want = append(want, content)
	}

	b := newBrowser(t, ts, "carol", desktop)
	b.signIn(carol.User.Username)
	b.openConversation(conv.ID)
	b.waitUntil("the newest page is shown", `document.querySelectorAll('#messages .message[data-id]').length === 25`)
	b.waitUntil("the newest message is at the bottom, in view", `(() => {
		const m = document.getElementById('messages');
		const items = m.querySelectorAll('.message[data-id]');
		return items[items.length - 1].querySelector('.content').textContent === 'Message 60' &&
			m.scrollHeight - m.scrollTop - m.clientHeight < 2;
	})()`)

	b.do("reload", chromedp.Reload())
	b.waitUntil("the reloaded page shows the same conversation", fmt.Sprintf(
		`location.pathname === %s && document.querySelector('h1')?.textContent === %s && document.querySelectorAll('#messages .message[data-id]').length === 25`,
		jsString("/conversations/"+conv.ID), jsString(dave.User.Username)))

	// Scroll to the top twice: 25 + 25 + 10 messages.
	for _, total := range []int{50, 60} {
		// Where the oldest shown message sits before the older ones load...
		before := eval[float64](b, `(() => {
			const m = document.getElementById('messages');
			m.scrollTop = 0;
			window.anchor = m.querySelector('.message[data-id]');
			return window.anchor.getBoundingClientRect().top;
		})()`)
		b.waitUntil(fmt.Sprintf("%d messages are shown", total), fmt.Sprintf(`document.querySelectorAll('#messages .message[data-id]').length === %d && !/Loading/.test(document.querySelector('.older-status').textContent)`, total))
		// ...is where it sits after: the view did not jump.
		after := eval[float64](b, `window.anchor.getBoundingClientRect().top`)
		if d := after - before; d < -30 || d > 30 {
			t.Errorf("loading older messages moved the view by %.0fpx, want it kept in place", d)
		}
	}
	b.do("scroll to the very top", chromedp.Evaluate[chromedp.Void](`document.getElementById('messages').scrollTop = 0`))
	b.waitUntil("the beginning is announced", `/beginning/.test(document.querySelector('.older-status').textContent)`)

	shown := b.messages()
	checkEachOnce(t, shown, want...)
	var got []string
	for _, m := range shown {
		got = append(got, m.Content)
	}
	if !slices.Equal(got, want) {
		t.Errorf("messages top to bottom:\ngot  %q\nwant %q", got, want)
	}
	b.screenshot("e2e-history-top")
}

// TestE2EReconnect: the server restarts while the other person writes; once the
// stream is back, the messages missed meanwhile are on screen, each once.
func TestE2EReconnect(t *testing.T) {
	ts := newTestServer(t)
	// A second instance on the same database takes bob's messages while the
	// first one is down, as another replica behind a load balancer would.
	replica := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := bob.startConversation(alice)
	bob.send(conv.ID, "Before the restart")

	b := newBrowser(t, ts, "alice", desktop)
	b.signIn(alice.User.Username)
	b.openConversation(conv.ID)
	b.waitUntil("the first message is shown", messageShownOnce("Before the restart"))
	// A live message proves the stream is open (and gives it a last event id).
	bob.send(conv.ID, "Live before the cut")
	b.waitUntil("the live message arrives", messageShownOnce("Live before the cut"))

	if err := ts.stop(t); err != nil {
		t.Fatalf("stop the server: %v", err)
	}
	b.do("the page says it is reconnecting", chromedp.WaitVisible(chromedp.CSS("#reconnecting")))
	missed := []string{"Missed one", "Missed two", "Missed three"}
	for _, content := range missed {
		bob.as(replica).send(conv.ID, content)
	}
	b.screenshot("e2e-reconnecting")

	ts.start(t)
	b.do("the reconnecting notice goes away", chromedp.WaitNotVisible(chromedp.CSS("#reconnecting")))
	for _, content := range missed {
		b.waitUntil("missed message "+content, messageShownOnce(content))
	}
	bob.send(conv.ID, "After the reconnect")
	b.waitUntil("a live message after the reconnect", messageShownOnce("After the reconnect"))

	all := append([]string{"Before the restart", "Live before the cut"}, missed...)
	all = append(all, "After the reconnect")
	shown := b.messages()
	checkEachOnce(t, shown, all...)
	if len(shown) != len(all) {
		t.Errorf("%d messages shown, want %d: %+v", len(shown), len(all), shown)
	}
	b.screenshot("e2e-reconnected")
}

// TestE2EMessageIsText: markup in a message is shown as text, never run.
func TestE2EMessageIsText(t *testing.T) {
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := bob.startConversation(alice)
	payload := `<img src=x onerror=alert(1)>`
	bob.send(conv.ID, payload)
	bob.send(conv.ID, `javascript:alert(2) is no link, but https://example.com/a?b=1 is.`)

	b := newBrowser(t, ts, "alice", desktop)
	b.signIn(alice.User.Username)
	b.openConversation(conv.ID)
	b.waitUntil("bob's messages are shown", `document.querySelectorAll('#messages .message[data-id]').length === 2`)
	b.send(payload + ` <script>alert(3)</script>`)
	b.waitUntil("alice's message is confirmed", messageShownOnce(payload+` <script>alert(3)</script>`))

	type check struct {
		Contents []string `json:"contents"`
		Elements int      `json:"elements"` // elements inside message contents other than links
		Links    []struct {
			Href   string `json:"href"`
			Target string `json:"target"`
			Rel    string `json:"rel"`
			Text   string `json:"text"`
		} `json:"links"`
	}
	got := eval[check](b, `(() => {
		const contents = [...document.querySelectorAll('#messages .message .content')];
		return {
			contents: contents.map(c => c.textContent),
			elements: contents.flatMap(c => [...c.querySelectorAll('*')]).filter(e => e.tagName !== 'A').length,
			links: contents.flatMap(c => [...c.querySelectorAll('a')]).map(a => ({href: a.href, target: a.target, rel: a.rel, text: a.textContent})),
		};
	})()`)
	want := []string{payload, `javascript:alert(2) is no link, but https://example.com/a?b=1 is.`, payload + ` <script>alert(3)</script>`}
	if !slices.Equal(got.Contents, want) {
		t.Errorf("message texts:\ngot  %q\nwant %q", got.Contents, want)
	}
	if got.Elements != 0 {
		t.Errorf("%d elements inside messages besides links, want 0", got.Elements)
	}
	if n := eval[int](b, `document.querySelectorAll('#messages img, #messages script').length`); n != 0 {
		t.Errorf("%d img or script elements in the messages, want 0", n)
	}
	if len(got.Links) != 1 || got.Links[0].Href != "https://example.com/a?b=1" || got.Links[0].Target != "_blank" ||
		got.Links[0].Rel != "noopener noreferrer" || got.Links[0].Text != "https://example.com/a?b=1" {
		t.Errorf("links: got %+v, want one to https://example.com/a?b=1 with target _blank and rel noopener noreferrer", got.Links)
	}
	// A dialog opens at once if markup ran; the page is settled by now.
	if d := b.dialogsOpened(); len(d) != 0 {
		t.Errorf("dialogs opened: %q, want none", d)
	}
	b.screenshot("e2e-markup-as-text")
}

// TestE2ESendRetry: a send whose answer is lost shows as failed; Retry sends it
// again with the same Idempotency-Key, so it is stored and shown once. The box
// counts characters as the server does, in code points.
func TestE2ESendRetry(t *testing.T) {
	ts := newTestServer(t)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := bob.startConversation(alice)

	b := newBrowser(t, ts, "alice", desktop)
	sends := b.interceptSends()
	b.signIn(alice.User.Username)
	b.openConversation(conv.ID)

	// The limit: 480 characters, however many UTF-16 units they take.
	type counter struct {
		Text     string `json:"text"`
		Disabled bool   `json:"disabled"`
	}
	fill := func(js string) counter {
		return eval[counter](b, `(() => {
			const box = document.getElementById('message-input');
			box.value = `+js+`;
			box.dispatchEvent(new Event('input', {bubbles: true}));
			return {text: document.getElementById('char-count').textContent, disabled: document.querySelector('#message-form button[type=submit]').disabled};
		})()`)
	}
	for _, tc := range []struct {
		name, value string
		want        counter
	}{
		{"short", `'hello'`, counter{"", false}},
		{"near the limit", `'a'.repeat(400)`, counter{"80 characters left", false}},
		{"emoji at the limit", `'\u{1F600}'.repeat(480)`, counter{"0 characters left", false}},
		{"over the limit", `'a'.repeat(481)`, counter{"-1 characters left", true}},
	} {
		if got := fill(tc.value); got != tc.want {
			t.Errorf("%s: counter %+v, want %+v", tc.name, got, tc.want)
		}
	}
	fill(`''`)

	// 1. A send never reaches the server: it shows as failed, and Retry (same
	// Idempotency-Key) stores it once.
	retried := "This one comes through on the second try"
	sends.failNext(false)
	b.send(retried)
	b.do("the message shows as failed", chromedp.WaitVisible(chromedp.CSS(".message.failed .retry")))
	b.screenshot("e2e-send-failed")
	b.do("retry", chromedp.Click(chromedp.CSS(".message.failed .retry")))
	b.waitUntil("the message is confirmed", messageShownOnce(retried)+` && !document.querySelector('.message.pending, .message.failed')`)

	// 2. The answer to a send is lost: the server stored the message, the page
	// saw a network error. The stream's copy confirms it; it is shown once.
	lost := "The answer to this one gets lost"
	sends.failNext(true)
	b.send(lost)
	b.waitUntil("the message is confirmed", messageShownOnce(lost)+` && !document.querySelector('.message.pending, .message.failed')`)

	var stored []apiMessage
	bob.mustDo("GET", "/api/conversations/"+conv.ID+"/messages", nil, http.StatusOK, &stored)
	shown := b.messages()
	checkEachOnce(t, shown, lost, retried)
	if len(stored) != 2 || len(shown) != 2 || shown[0].ID != stored[1].ID || shown[1].ID != stored[0].ID {
		t.Errorf("shown %+v, stored %+v: want the same two messages", shown, stored)
	}
	if n := sends.failed(); n != 2 {
		t.Errorf("%d sends were made to fail, want 2", n)
	}
	b.screenshot("e2e-send-retried")
}

// sendInterceptor holds the page's requests to .../messages and can make the
// next POST fail with a network error.
type sendInterceptor struct {
	b *browser

	mu       sync.Mutex // guards the fields below
	armed    bool       // fail the next POST
	deliver  bool       // ...after sending it to the server ourselves (its answer is lost)
	failures int
}

// interceptSends starts holding the page's requests to .../messages. It must run
// before the page loads: interception starts late for a page already loaded.
func (b *browser) interceptSends() *sendInterceptor {
	b.t.Helper()
	si := &sendInterceptor{b: b}
	paused := chromedp.Events(b.ctx, fetch.RequestPaused)
	if _, err := chromedp.Call(b.ctx, fetch.Enable, fetch.EnableParams{Patterns: []*fetch.RequestPattern{
		{URLPattern: "*/api/conversations/*/messages*"},
	}}); err != nil {
		b.t.Fatalf("intercept sends: %v", err)
	}
	go func() {
		for ev, err := range paused {
			if err != nil {
				return // the browser is closing
			}
			if err := si.handle(ev); err != nil && b.ctx.Err() == nil {
				b.note(&b.problems, "intercepting "+ev.Request.URL+": "+err.Error())
			}
		}
	}()
	return si
}

// failNext makes the next POST of a message fail. With deliver, the server gets
// it first (from the test, with the page's headers and body) and only the answer
// is lost; without, it never reaches the server.
func (si *sendInterceptor) failNext(deliver bool) {
	si.mu.Lock()
	defer si.mu.Unlock()
	si.armed, si.deliver = true, deliver
}

func (si *sendInterceptor) failed() int {
	si.mu.Lock()
	defer si.mu.Unlock()
	return si.failures
}

func (si *sendInterceptor) handle(ev fetch.EventRequestPaused) error {
	si.mu.Lock()
	fail := si.armed && ev.Request.Method == "POST"
	deliver := si.deliver
	if fail {
		si.armed = false
		si.failures++
	}
	si.mu.Unlock()
	if !fail {
		_, err := chromedp.Call(si.b.ctx, fetch.ContinueRequest, fetch.ContinueRequestParams{RequestID: ev.RequestID})
		return err
	}
	if deliver {
		var body []byte
		for _, entry := range ev.Request.PostDataEntries {
			body = append(body, entry.Bytes...)
		}
		req, err := http.NewRequest("POST", ev.Request.URL, bytes.NewReader(body))
		if err != nil {
			return err
		}
		for k, v := range ev.Request.Headers {
			if s, ok := v.(string); ok {
				req.Header.Set(k, s)
			}
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			return fmt.Errorf("sending it ourselves: status %d", resp.StatusCode)
		}
	}
	_, err := chromedp.Call(si.b.ctx, fetch.FailRequest, fetch.FailRequestParams{RequestID: ev.RequestID, ErrorReason: network.ErrorReasonConnectionReset})
	return err
}

// TestE2EKeyboard: signing in, opening a conversation and writing a message of
// two lines, with the keyboard alone; focus is visible on the way.
func TestE2EKeyboard(t *testing.T) {
	ts := newTestServer(t)
	erin, frank := ts.newUser(t, "erin"), ts.newUser(t, "frank")
	conv := frank.startConversation(erin)
	frank.send(conv.ID, "Can you answer without a mouse?")

	b := newBrowser(t, ts, "erin", desktop)
	b.do("open the sign-in page", chromedp.Navigate(ts.URL+"/login"), chromedp.WaitVisible(chromedp.CSS("#login-form")))
	b.tabTo("#username")
	b.do("type the username", chromedp.KeyEvent(erin.User.Username))
	b.pressEnter()
	b.do("the home page shows", chromedp.WaitVisible(chromedp.CSS(".conversation-item")))

	b.tabTo(".conversation-link")
	b.screenshot("e2e-keyboard-focus")
	b.pressEnter()
	b.waitUntil("the conversation is open", messageShownOnce("Can you answer without a mouse?"))
	b.tabTo("#message-input")
	b.do("type the first line", chromedp.KeyEvent("Yes, I can."))
	b.pressKey("Enter", 13, "\r", 8) // Shift+Enter: a new line, not a send
	if n := eval[int](b, `document.querySelectorAll('#messages .message.mine').length`); n != 0 {
		t.Fatalf("Shift+Enter sent the message")
	}
	b.do("type the second line", chromedp.KeyEvent("Two lines, even."))
	b.pressEnter()
	b.waitUntil("the two-line message is confirmed", messageShownOnce("Yes, I can.\nTwo lines, even."))

	b.tabTo(".back-link")
	b.pressEnter()
	b.waitUntil("back home, the conversation shows my message", fmt.Sprintf(
		`document.querySelector('.conversation-item[data-id="%s"] .preview')?.textContent.includes('Two lines, even.')`, conv.ID))
}

// TestE2EConversationList: the home page pages through the conversations as it
// is scrolled, keeps them in order of activity as messages arrive, and signs
// out when the token stops working.
func TestE2EConversationList(t *testing.T) {
	ts := newTestServer(t)
	carol := ts.newUser(t, "carol")
	var convs []apiConversation
	var names []string
	for i := range 30 {
		other := ts.newUser(t, fmt.Sprintf("pal%02d", i))
		conv := other.startConversation(carol)
		other.send(conv.ID, "Hello from "+other.User.Username)
		convs = append(convs, conv)
		names = append(names, other.User.Username)
	}

	b := newBrowser(t, ts, "carol", desktop)
	b.signIn(carol.User.Username)
	b.waitUntil("the first page is shown", `document.querySelectorAll('.conversation-item').length === 25`)
	b.do("scroll to the end", chromedp.Evaluate[chromedp.Void](`window.scrollTo(0, document.body.scrollHeight)`))
	b.waitUntil("the second page is shown", `document.querySelectorAll('.conversation-item').length === 30`)

	order := func() []string {
		return eval[[]string](b, `[...document.querySelectorAll('.conversation-item .username')].map(e => e.textContent)`)
	}
	want := slices.Clone(names)
	slices.Reverse(want)
	if got := order(); !slices.Equal(got, want) {
		t.Errorf("conversations top to bottom:\ngot  %q\nwant %q (newest activity first)", got, want)
	}

	// The oldest conversation gets a message: it moves to the top, with 2 unread.
	ts.login(t, names[0]).send(convs[0].ID, "Back to the top")
	b.waitUntil("the conversation moves to the top", fmt.Sprintf(`(() => {
		const first = document.querySelector('.conversation-item');
		return first.dataset.id === %s && first.querySelector('.preview').textContent === 'Back to the top' && first.querySelector('.badge')?.textContent === '2';
	})()`, jsString(convs[0].ID)))

	// A conversation the page has never seen arrives with its first message.
	newcomer := ts.newUser(t, "newcomer")
	conv := newcomer.startConversation(carol)
	newcomer.send(conv.ID, "I am new here")
	b.waitUntil("the new conversation shows at the top", fmt.Sprintf(`(() => {
		const first = document.querySelector('.conversation-item');
		return first.dataset.id === %s && first.querySelector('.preview').textContent === 'I am new here' && first.querySelector('.badge')?.textContent === '1';
	})()`, jsString(conv.ID)))
	if n := eval[int](b, `new Set([...document.querySelectorAll('.conversation-item')].map(e => e.dataset.id)).size`); n != 31 {
		t.Errorf("%d different conversations shown, want 31", n)
	}
	if n := eval[int](b, `document.querySelectorAll('.conversation-item').length`); n != 31 {
		t.Errorf("%d conversation items shown, want 31, each once", n)
	}
	b.do("scroll to the top", chromedp.Evaluate[chromedp.Void](`window.scrollTo(0, 0)`))
	b.screenshot("e2e-conversation-list")

	// A conversation that is not hers is not found.
	b.do("open a conversation of others", chromedp.Navigate(ts.URL+"/conversations/999999999"))
	b.waitUntil("it is not found", `document.querySelector('h1')?.textContent === 'Conversation not found' && document.getElementById('message-form').hidden`)

	// A token the server no longer accepts signs the page out.
	b.do("spoil the token", chromedp.Evaluate[chromedp.Void](`(() => {
		const auth = JSON.parse(localStorage.getItem('messenger.auth'));
		auth.token = 'not-a-token';
		localStorage.setItem('messenger.auth', JSON.stringify(auth));
	})()`), chromedp.Reload())
	b.waitUntil("the sign-in page shows", `location.pathname === '/login' && document.querySelector('#login-form') !== null && localStorage.getItem('messenger.auth') === null`)
	if b := eval[bool](b, `document.getElementById('sign-out').hidden`); !b {
		t.Error("the sign-out button shows on the sign-in page")
	}
}

// TestE2ESignIn: GitHub's redirect signs in through /callback, claiming the
// session with the code and nonce of its fragment; a server without development
// sign-in hides the username form; Sign out forgets the token.
func TestE2ESignIn(t *testing.T) {
	key := strings.Repeat("e", 40)
	ts := newTestServer(t, "TOKEN_KEY="+key)
	gina := ts.newUser(t, "gina")
	const nonce = "n0nce-of-this-tab"
	code := newOAuthClaims([]byte(key)).issue(gina.User.ID, nonce, time.Now().Add(oauthClaimTTL))

	b := newBrowser(t, ts, "gina", phone)
	// The tab stored the nonce it left for GitHub with (see TestE2EGitHubSignIn).
	b.do("leave for GitHub", chromedp.Navigate(ts.URL+"/login"),
		chromedp.Evaluate[chromedp.Void](`sessionStorage.setItem('messenger.githubNonce', '`+nonce+`')`))
	b.do("land on the OAuth callback", chromedp.Navigate(ts.URL+"/callback#code="+url.QueryEscape(code)+"&nonce="+nonce))
	b.waitUntil("the home page shows, the code gone from the address", `location.pathname === '/' && location.hash === '' &&
		document.querySelector('#new-conversation-form') !== null && JSON.parse(localStorage.getItem('messenger.auth')).token.length > 0`)
	b.do("sign out", chromedp.Click(chromedp.CSS("#sign-out")))
	b.waitUntil("the sign-in page shows, the token forgotten", `location.pathname === '/login' && localStorage.getItem('messenger.auth') === null`)
	b.do("go home", chromedp.Navigate(ts.URL+"/"))
	b.waitUntil("home sends a signed-out visitor to sign in", `location.pathname === '/login' && document.querySelector('#login-form') !== null`)

	prod := newTestServer(t, "DEV_LOGIN=false", "TOKEN_KEY="+strings.Repeat("k", 40))
	p := newBrowser(t, prod, "visitor", phone)
	p.do("try to sign in by username",
		chromedp.Navigate(prod.URL+"/login"),
		chromedp.WaitVisible(chromedp.CSS("#github-sign-in")),
		chromedp.SendKeys(chromedp.CSS("#username"), "someone"),
		chromedp.Click(chromedp.CSS(`#login-form button[type="submit"]`)),
		chromedp.WaitNotVisible(chromedp.CSS("#login-form")),
		chromedp.WaitVisible(chromedp.CSS("#github-sign-in")),
	)
	if got := eval[string](p, `document.getElementById('github-sign-in').getAttribute('href')`); got != "/api/oauth/github" {
		t.Errorf("GitHub link goes to %q, want /api/oauth/github", got)
	}
	p.screenshot("e2e-sign-in-github-only")
}

// TestE2ESignOut: every page shows who is signed in; Sign out ends the session on
// the server (its token then gets 401) and leaves the person's other sessions be;
// and a session ended elsewhere signs the page out through the stream's
// session_ended event.
func TestE2ESignOut(t *testing.T) {
	ts := newTestServer(t)
	name := uniqueName("hana")
	bob := ts.newUser(t, "bob")
	other := ts.login(t, name) // the same person on another device

	b := newBrowser(t, ts, name, phone)
	b.signIn(name)
	shown := `!document.getElementById('signed-in-as').hidden && document.getElementById('account-name').textContent === ` + jsString(name)
	b.waitUntil("the home page shows the account", shown)
	conv := bob.startConversation(other)
	b.do("open the conversation", chromedp.Navigate(ts.URL+"/conversations/"+conv.ID), chromedp.WaitVisible(chromedp.CSS("#message-form")))
	b.waitUntil("the conversation page shows the account", shown)
	b.waitUntil("the history has loaded", `/beginning/.test(document.querySelector('.older-status')?.textContent)`)
	b.screenshot("e2e-signed-in-account")
	b.do("open a page that does not exist", chromedp.Navigate(ts.URL+"/no/such/page"))
	b.waitUntil("the not-found page shows the account", `document.querySelector('h1')?.textContent === 'Page not found' && `+shown)

	token := eval[string](b, `JSON.parse(localStorage.getItem('messenger.auth')).token`)
	b.do("sign out", chromedp.Click(chromedp.CSS("#sign-out")))
	b.waitUntil("the sign-in page shows, the account gone", `location.pathname === '/login' && localStorage.getItem('messenger.auth') === null &&
		document.getElementById('signed-in-as').hidden && document.getElementById('sign-out').hidden`)
	ended := &client{t: t, base: ts.URL, Token: token}
	ended.mustDo("GET", "/api/auth_user", nil, http.StatusUnauthorized, nil)
	other.mustDo("GET", "/api/auth_user", nil, http.StatusOK, nil)

	// Signed out from elsewhere: the stream's session_ended signs this page out.
	b.signIn(name)
	b.waitUntil("the home page shows the account", shown)
	waitFor(t, e2eWait, "the page's stream to open", func() bool { return metricValue(t, ts, "messenger_streams_open") >= 1 })
	token = eval[string](b, `JSON.parse(localStorage.getItem('messenger.auth')).token`)
	(&client{t: t, base: ts.URL, Token: token}).mustDo("POST", "/api/logout", nil, http.StatusNoContent, nil)
	b.waitUntil("the sign-in page says why", `location.pathname === '/login' && localStorage.getItem('messenger.auth') === null &&
		document.getElementById('login-message').textContent === 'You signed out in another window.'`)
	other.mustDo("GET", "/api/conversations", nil, http.StatusOK, nil)
}

// faultProxy is a reverse proxy in front of a test server that can fail the
// event stream the way a proxy does during a deploy: it answers 502 to the next
// stream requests, and cuts the streams open through it. It can also make the
// next stream answer as a server does to a position it cannot resume from: a
// "reset" event with the current position, no replay, then live events.
type faultProxy struct {
	*httptest.Server

	mu        sync.Mutex                 // guards the fields below
	failing   int                        // stream requests still to answer with 502
	resetting int                        // stream requests still to answer with a reset
	refused   int                        // stream requests answered with 502
	open      map[int]context.CancelFunc // streams open through the proxy
	nextOpen  int
	resumes   []string // position each stream request resumed from ("" for none), in order
}

// newFaultProxy starts a proxy to the test server ts; a browser that loads the
// app through its URL gets its stream through it too.
func newFaultProxy(t *testing.T, ts *testServer) *faultProxy {
	t.Helper()
	target, err := url.Parse(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1 // pass each event on at once
	rp.ModifyResponse = func(resp *http.Response) error {
		if resp.Request.Header.Get(resetHeader) == "" || resp.StatusCode != http.StatusOK {
			return nil
		}
		// The server was asked for no position: its "ready" frame gives the
		// current one. Make it the "reset" frame instead.
		br := bufio.NewReader(resp.Body)
		var head bytes.Buffer
		for inReady := false; ; {
			line, err := br.ReadString('\n')
			if err != nil {
				return err
			}
			switch {
			case line == "event: ready\n":
				inReady = true
				line = "event: reset\n"
			case inReady && strings.HasPrefix(line, "data: "):
				line = `data: {"reason":"position too old (test proxy)"}` + "\n"
			}
			head.WriteString(line)
			if inReady && line == "\n" {
				break
			}
		}
		resp.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(&head, br), resp.Body}
		return nil
	}
	fp := &faultProxy{open: map[int]context.CancelFunc{}}
	fp.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/messages" {
			rp.ServeHTTP(w, r)
			return
		}
		resume := r.Header.Get("Last-Event-ID")
		if resume == "" {
			resume = r.URL.Query().Get("last_event_id")
		}
		ctx, cancel := context.WithCancel(r.Context())
		defer cancel()
		fp.mu.Lock()
		fp.resumes = append(fp.resumes, resume)
		refuse := fp.failing > 0
		if refuse {
			fp.failing--
			fp.refused++
		} else if fp.resetting > 0 {
			fp.resetting--
			r.Header.Del("Last-Event-ID")
			q := r.URL.Query()
			q.Del("last_event_id")
			r.URL.RawQuery = q.Encode()
			r.Header.Set(resetHeader, "1")
		}
		n := fp.nextOpen
		fp.nextOpen++
		if !refuse {
			fp.open[n] = cancel
		}
		fp.mu.Unlock()
		if refuse {
			http.Error(w, "bad gateway", http.StatusBadGateway)
			return
		}
		defer func() {
			fp.mu.Lock()
			delete(fp.open, n)
			fp.mu.Unlock()
		}()
		// A cut stream ends the upstream request; the proxy then drops the
		// browser's connection mid-response (http.ErrAbortHandler).
		rp.ServeHTTP(w, r.WithContext(ctx))
	}))
	t.Cleanup(func() {
		fp.cut()
		fp.CloseClientConnections()
		fp.Close()
	})
	return fp
}

// resetHeader marks a stream request whose answer the proxy turns into a reset.
const resetHeader = "X-Test-Reset"

// resetNext makes the next n stream requests that are not refused get a reset.
func (fp *faultProxy) resetNext(n int) {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	fp.resetting = n
}

// failNext makes the proxy answer 502 to the next n stream requests.
func (fp *faultProxy) failNext(n int) {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	fp.failing = n
}

// cut drops every stream open through the proxy.
func (fp *faultProxy) cut() {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	for _, cancel := range fp.open {
		cancel()
	}
}

// refusedCount is how many stream requests were answered with 502.
func (fp *faultProxy) refusedCount() int {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	return fp.refused
}

// openStreams is how many streams are open through the proxy.
func (fp *faultProxy) openStreams() int {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	return len(fp.open)
}

// streamRequests returns the position each stream request resumed from.
func (fp *faultProxy) streamRequests() []string {
	fp.mu.Lock()
	defer fp.mu.Unlock()
	return slices.Clone(fp.resumes)
}

// outage cuts the streams and refuses new ones with 502 while during runs,
// until at least refusals more were refused (so that EventSource has closed and
// the client's own reconnect failed too); then the proxy heals.
func (fp *faultProxy) outage(t *testing.T, refusals int, during func()) {
	t.Helper()
	before := fp.refusedCount()
	fp.failNext(1 << 30)
	fp.cut()
	during()
	waitFor(t, e2eWait, fmt.Sprintf("%d stream requests refused", refusals), func() bool {
		return fp.refusedCount() >= before+refusals && fp.openStreams() == 0
	})
	fp.failNext(0)
}

// TestE2ENothingLostAcrossReconnects: the stream fails behind a proxy (cut, then
// 502 to the browser's retry and to the client's own reconnects) while messages
// are sent; once it heals, every message is on the page, once, in order, without
// a reload: on an open conversation that had received no event since it loaded,
// on the conversation list, on pages whose stream never opened at all, and after
// the server answers "reset" instead of replaying.
func TestE2ENothingLostAcrossReconnects(t *testing.T) {
	ts := newTestServer(t)
	proxy := newFaultProxy(t, ts)
	alice, bob := ts.newUser(t, "alice"), ts.newUser(t, "bob")
	conv := alice.startConversation(bob)
	alice.send(conv.ID, "Before the page loaded")

	b := newBrowser(t, ts, "bob", desktop)
	b.base = proxy.URL
	b.signIn(bob.User.Username)
	b.openConversation(conv.ID)
	b.do("mark the page, to tell a reload", chromedp.Evaluate[chromedp.Void](`window.sameDocument = true`))
	b.waitUntil("the stream is open", `document.getElementById('reconnecting').hidden`)
	waitFor(t, e2eWait, "the stream open through the proxy", func() bool { return proxy.openStreams() == 1 })

	sendAll := func(from *client, convID string, contents ...string) {
		for _, c := range contents {
			from.send(convID, c)
		}
	}
	shownOnce := func(what string, contents ...string) {
		t.Helper()
		for _, c := range contents {
			b.waitUntil(what+": "+c, messageShownOnce(c))
		}
	}
	all := []string{"Before the page loaded"}

	// 1. The open conversation, no event received since it loaded.
	gap1 := []string{"Sent during the outage 1", "Sent during the outage 2", "Sent during the outage 3"}
	proxy.outage(t, 2, func() {
		b.do("the page says it is reconnecting", chromedp.WaitVisible(chromedp.CSS("#reconnecting")))
		sendAll(alice, conv.ID, gap1...)
	})
	shownOnce("missed message", gap1...)
	all = append(all, gap1...)
	alice.send(conv.ID, "Live after the outage")
	all = append(all, "Live after the outage")
	shownOnce("live message", "Live after the outage")
	b.do("the reconnecting notice goes away", chromedp.WaitNotVisible(chromedp.CSS("#reconnecting")))

	// 2. The conversation list: a known conversation and a new one get messages.
	b.do("go back to the list", chromedp.Click(chromedp.CSS(".back-link")), chromedp.WaitVisible(chromedp.CSS("#new-conversation-form")))
	b.waitUntil("the list has loaded", fmt.Sprintf(`document.querySelector('.conversation-item[data-id="%s"] .preview')?.textContent === 'Live after the outage'`, conv.ID))
	carol := ts.newUser(t, "carol")
	var carolConv apiConversation
	proxy.outage(t, 2, func() {
		sendAll(alice, conv.ID, "Sent while bob is on the list")
		carolConv = carol.startConversation(bob)
		sendAll(carol, carolConv.ID, "Carol writes during the outage")
	})
	all = append(all, "Sent while bob is on the list")
	listShows := func(carolsLast, alicesLast string) {
		t.Helper()
		b.waitUntil("both conversations show their last message, once each", fmt.Sprintf(`(() => {
			const items = [...document.querySelectorAll('.conversation-item')];
			const preview = (id) => items.filter(i => i.dataset.id === id).map(i => i.querySelector('.preview').textContent).join('|');
			return items.length === 2 && preview(%s) === %s && preview(%s) === %s;
		})()`, jsString(carolConv.ID), jsString(carolsLast), jsString(conv.ID), jsString(alicesLast)))
	}
	listShows("Carol writes during the outage", "Sent while bob is on the list")
	if !eval[bool](b, `window.sameDocument === true`) {
		t.Fatal("bob's page was reloaded, want the messages to arrive without a reload")
	}
	// Every stream request after the first resumed from where the page stood.
	if reqs := proxy.streamRequests(); len(reqs) < 5 || reqs[0] != "" || slices.Contains(reqs[1:], "") {
		t.Errorf("stream requests resumed from %q, want the first from nowhere and every later one from a position", reqs)
	}

	// 3. Pages whose stream never opened: what it loads, and what comes while
	// the stream is refused, shows once it opens.
	proxy.failNext(1 << 30)
	b.do("load the conversation afresh", chromedp.Navigate(proxy.URL+"/conversations/"+conv.ID))
	b.waitUntil("the history has loaded", messageShownOnce("Sent while bob is on the list"))
	gap3 := []string{"Sent before the stream ever opened 1", "Sent before the stream ever opened 2"}
	proxy.outage(t, 2, func() { sendAll(alice, conv.ID, gap3...) })
	shownOnce("message sent before the stream opened", gap3...)
	all = append(all, gap3...)
	checkShown := func() {
		t.Helper()
		shown := b.messages()
		checkEachOnce(t, shown, all...)
		if len(shown) != len(all) {
			t.Errorf("%d messages shown, want %d: %+v", len(shown), len(all), shown)
		}
		if !slices.IsSortedFunc(shown, func(a, b shownMessage) int {
			return cmp.Or(cmp.Compare(len(a.ID), len(b.ID)), cmp.Compare(a.ID, b.ID)) // decimal ids
		}) {
			t.Errorf("messages shown out of order of id: %+v", shown)
		}
	}
	checkShown()
	b.screenshot("e2e-nothing-lost")

	proxy.failNext(1 << 30)
	b.do("load the list afresh", chromedp.Navigate(proxy.URL+"/"))
	b.waitUntil("the list has loaded", `document.querySelectorAll('.conversation-item').length === 2`)
	proxy.outage(t, 2, func() {
		sendAll(alice, conv.ID, "To the list before its stream opened")
		sendAll(carol, carolConv.ID, "Carol again, before the stream opened")
	})
	listShows("Carol again, before the stream opened", "To the list before its stream opened")
	all = append(all, "To the list before its stream opened")

	// 4. The server cannot resume from the page's position and answers "reset":
	// the page fetches the conversation again, then goes on live.
	b.openConversation(conv.ID)
	b.waitUntil("the history has loaded", messageShownOnce("To the list before its stream opened"))
	gap4 := []string{"Sent before a reset 1", "Sent before a reset 2"}
	proxy.resetNext(1)
	proxy.outage(t, 2, func() { sendAll(alice, conv.ID, gap4...) })
	shownOnce("message sent before the reset", gap4...)
	alice.send(conv.ID, "Live after the reset")
	shownOnce("live message after the reset", "Live after the reset")
	all = append(all, gap4...)
	all = append(all, "Live after the reset")
	checkShown()
	b.screenshot("e2e-nothing-lost-reset")
}

// TestE2EStaleListKeepsLiveMessage: the home page's refresh fetches the list of
// conversations; a message that the stream brings after the server answered that
// fetch, but before the answer reached the page, must stay shown. The answer is
// held in the browser (Fetch at the response stage) until the message is shown.
func TestE2EStaleListKeepsLiveMessage(t *testing.T) {
	ts := newTestServer(t)
	me, friend := ts.newUser(t, "me"), ts.newUser(t, "friend")
	conv := friend.startConversation(me)
	b := newBrowser(t, ts, "me", desktop)

	var mu sync.Mutex
	answered, holdAt := 0, 0 // list answers seen; the one to hold (0: none)
	var held fetch.RequestID
	paused := chromedp.Events(b.ctx, fetch.RequestPaused)
	if _, err := chromedp.Call(b.ctx, fetch.Enable, fetch.EnableParams{Patterns: []*fetch.RequestPattern{
		{URLPattern: "*/api/conversations", RequestStage: fetch.RequestStageResponse},
	}}); err != nil {
		t.Fatalf("intercept the list: %v", err)
	}
	go func() {
		for ev, err := range paused {
			if err != nil {
				return
			}
			mu.Lock()
			answered++
			hold := answered == holdAt
			if hold {
				held = ev.RequestID
			}
			mu.Unlock()
			if !hold {
				chromedp.Call(b.ctx, fetch.ContinueResponse, fetch.ContinueResponseParams{RequestID: ev.RequestID})
			}
		}
	}()
	count := func() int { mu.Lock(); defer mu.Unlock(); return answered }

	b.signIn(me.User.Username)
	item := fmt.Sprintf(`document.querySelector('.conversation-item[data-id="%s"] .preview')`, conv.ID)
	b.waitUntil("the conversation is listed", item+`?.textContent === 'No messages yet'`)
	// The first load: the list, then the refresh the stream's start asks for.
	waitFor(t, e2eWait, "the first load's list and refresh", func() bool { return count() >= 2 })

	// Reload: the list comes through, the refresh's answer is held.
	mu.Lock()
	holdAt = answered + 2
	mu.Unlock()
	b.do("reload", chromedp.Reload())
	waitFor(t, e2eWait, "the refresh's answer to be held", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return held != ""
	})
	text := "after the list was answered " + randomHex(3)
	friend.send(conv.ID, text)
	b.waitUntil("the message arrives live", item+`?.textContent.includes(`+jsString(text)+`)`)

	b.do("mark the item", chromedp.Evaluate[chromedp.Void](item+`.closest('li').dataset.before = 'refresh'`))
	mu.Lock()
	id := held
	mu.Unlock()
	if _, err := chromedp.Call(b.ctx, fetch.ContinueResponse, fetch.ContinueResponseParams{RequestID: id}); err != nil {
		t.Fatalf("release the held answer: %v", err)
	}
	b.waitUntil("the refresh has redrawn the item", item+` && !`+item+`.closest('li').dataset.before`)
	if got := eval[string](b, item+`.textContent`); !strings.Contains(got, text) {
		t.Errorf("after the older list arrived, the item shows %q, want the message %q", got, text)
	}
}
