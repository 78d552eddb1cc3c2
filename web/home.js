// The home page: the conversations, newest activity first, kept live.

import { avatar, debounce, h, isAbort, refreshTimes, timeElement } from './dom.js';

const PAGE_SIZE = 25;

export function mountHome(root, ctx) {
  const controller = new AbortController();
  const signal = controller.signal;
  const conversations = new Map(); // id -> Conversation shown in the list
  const fetching = new Map(); // id -> messages that arrived while the conversation was being fetched
  let cursor = '';
  let loading = false; // a page is being fetched (by loadMore or refresh)
  let refreshDue = false; // refresh once the fetch in progress ends
  let done = false;

  const list = h('ul', { id: 'conversations', class: 'conversation-list', 'aria-label': 'Conversations' });
  const status = h('p', { class: 'list-status', role: 'status' });
  const sentinel = h('div', { class: 'sentinel', 'aria-hidden': 'true' });
  root.append(h('section', { class: 'home' }, h('h1', { tabindex: '-1' }, 'Conversations'), newConversationForm(ctx, signal), list, status, sentinel));

  function loadMore() {
    if (loading || done) return;
    status.replaceChildren('Loading…');
    fetchList(loadMore, async () => {
      const page = await ctx.api('GET', `/api/conversations${cursor ? `?before=${encodeURIComponent(cursor)}` : ''}`, { signal });
      for (const c of page) {
        if (conversations.has(c.id)) continue;
        conversations.set(c.id, c);
        ctx.unread.set(c.id, c.unreadCount ?? 0);
        list.append(item(c));
      }
      if (page.length) cursor = page[page.length - 1].id;
      done = page.length < PAGE_SIZE;
    });
  }

  // refresh fetches the newest conversations again, for when events may have been
  // missed, and merges them by id: they go to the top in the server's order, with
  // its unread counts. If every one of a full page changed, older ones may have
  // too: the rest of the list is dropped, to load again as it is scrolled to.
  function refresh() {
    if (loading) return void (refreshDue = true);
    refreshDue = false;
    fetchList(refresh, async () => {
      const page = await ctx.api('GET', '/api/conversations', { signal });
      const changed = page.filter((c) => !conversations.has(c.id) || conversations.get(c.id).lastMessage?.id !== c.lastMessage?.id).length;
      const shown = [...list.children].map((li) => li.dataset.id);
      const inOrder = page.every((c, i) => shown[i] === c.id);
      const live = []; // conversations whose message from the stream is newer than the page
      for (const c of [...page].reverse()) {
        const held = conversations.get(c.id);
        // The page may have been answered before a message the stream has brought
        // since: keep that message, and the unread count that counted it.
        if (isNewer(held?.lastMessage, c.lastMessage)) {
          c.lastMessage = held.lastMessage;
          c.unreadCount = ctx.unread.get(c.id);
          live.push(c);
        }
        const same = held?.lastMessage?.id === c.lastMessage?.id && ctx.unread.get(c.id) === (c.unreadCount ?? 0);
        conversations.set(c.id, c);
        ctx.unread.set(c.id, c.unreadCount ?? 0);
        // Items already in place and up to date are left alone (and keep focus).
        if (!inOrder || !same) redraw(c, { toTop: !inOrder });
      }
      live.sort((a, b) => Date.parse(a.lastMessage.createdAt) - Date.parse(b.lastMessage.createdAt));
      for (const c of live) redraw(c, { toTop: true });
      if (!cursor || (page.length === PAGE_SIZE && changed === PAGE_SIZE)) {
        const fresh = new Set(page.map((c) => c.id));
        for (const id of conversations.keys()) {
          if (fresh.has(id)) continue;
          conversations.delete(id);
          list.querySelector(`.conversation-item[data-id="${CSS.escape(id)}"]`)?.remove();
        }
        cursor = page.length ? page[page.length - 1].id : '';
        done = page.length < PAGE_SIZE;
      }
    });
  }

  // fetchList runs fetchPage, one fetch of the list at a time; a failure shows
  // with a button that calls again.
  async function fetchList(again, fetchPage) {
    loading = true;
    try {
      await fetchPage();
      status.replaceChildren(done && conversations.size === 0 ? 'No conversations yet. Start one above.' : '');
    } catch (err) {
      if (isAbort(err)) return;
      status.replaceChildren("Couldn't load conversations. ", h('button', { type: 'button', class: 'link-button', onclick: again }, 'Try again'));
      return;
    } finally {
      loading = false;
      if (refreshDue) refresh();
    }
    // A short page may leave the sentinel on screen, which the observer won't report again.
    if (!done && isOnScreen(sentinel)) loadMore();
  }

  function item(c) {
    const count = ctx.unread.get(c.id);
    const last = c.lastMessage;
    const other = c.otherParticipant ?? {};
    return h(
      'li',
      { class: `conversation-item${count ? ' unread' : ''}`, dataset: { id: c.id } },
      h(
        'a',
        { class: 'conversation-link', href: `/conversations/${encodeURIComponent(c.id)}` },
        avatar(other),
        h(
          'span',
          { class: 'conversation-main' },
          h('span', { class: 'conversation-top' }, h('span', { class: 'username' }, other.username ?? ''), last ? timeElement(last.createdAt) : null),
          h(
            'span',
            { class: 'conversation-bottom' },
            h('span', { class: 'preview' }, last ? `${last.mine ? 'You: ' : ''}${last.content}` : 'No messages yet'),
            count ? h('span', { class: 'badge', title: `${count} unread` }, String(count)) : null,
            count ? h('span', { class: 'visually-hidden' }, ` (${count} unread)`) : null,
          ),
        ),
      ),
    );
  }

  // redraw replaces a conversation's item, optionally moving it to the top.
  function redraw(c, { toTop = false } = {}) {
    const old = list.querySelector(`.conversation-item[data-id="${CSS.escape(c.id)}"]`);
    const hadFocus = old?.contains(document.activeElement);
    const fresh = item(c);
    if (toTop || !old) list.prepend(fresh);
    else old.before(fresh);
    old?.remove();
    if (hadFocus) fresh.querySelector('a').focus({ preventScroll: true });
    if (status.textContent.startsWith('No conversations')) status.replaceChildren();
  }

  async function insertUnknown(message) {
    const id = message.conversationId;
    if (fetching.has(id)) {
      fetching.get(id).push(message);
      return;
    }
    fetching.set(id, []);
    try {
      const c = await ctx.api('GET', `/api/conversations/${encodeURIComponent(id)}`, { signal });
      const later = fetching.get(id).filter((m) => isNewer(m, c.lastMessage));
      if (later.length) c.lastMessage = later[later.length - 1];
      ctx.unread.set(id, (c.unreadCount ?? 0) + later.filter((m) => !m.mine).length);
      conversations.set(id, c);
      redraw(c, { toTop: true });
    } catch {
      // It will show on the next visit.
    } finally {
      fetching.delete(id);
    }
  }

  const observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { rootMargin: '0px 0px 200px 0px' });
  observer.observe(sentinel);
  const clock = setInterval(() => refreshTimes(list), 30_000);

  return {
    hasUnreadCounts: true, // refresh brings them
    refresh,
    unmount() {
      controller.abort();
      observer.disconnect();
      clearInterval(clock);
    },
    onMessage(message) {
      const c = conversations.get(message.conversationId);
      if (!c) return void insertUnknown(message);
      if (isNewer(c.lastMessage, message)) return redraw(c);
      c.lastMessage = message;
      redraw(c, { toTop: true });
    },
    onRead(event) {
      const c = conversations.get(event.conversationId);
      if (c) redraw(c);
    },
  };
}

// isNewer reports whether message a is newer than message b (either may be
// missing): a conversation's messages are stamped in commit order.
function isNewer(a, b) {
  return !!a && (!b || Date.parse(a.createdAt) > Date.parse(b.createdAt));
}

function newConversationForm(ctx, signal) {
  const input = h('input', { id: 'new-username', name: 'username', list: 'username-suggestions', autocomplete: 'off', autocapitalize: 'none', spellcheck: 'false', required: true, placeholder: 'Username' });
  const suggestions = h('datalist', { id: 'username-suggestions' });
  const button = h('button', { type: 'submit' }, 'Start');
  const error = h('p', { class: 'form-error', role: 'alert' });
  const form = h(
    'form',
    { id: 'new-conversation-form', class: 'new-conversation', novalidate: true },
    h('label', { for: 'new-username' }, 'New conversation with'),
    h('div', { class: 'row' }, input, button),
    suggestions,
    error,
  );

  const suggest = debounce(async () => {
    const search = input.value.trim();
    if (!search) return suggestions.replaceChildren();
    try {
      const names = await ctx.api('GET', `/api/usernames?search=${encodeURIComponent(search)}`, { signal });
      if (input.value.trim() !== search) return; // an answer to an older search
      suggestions.replaceChildren(...(names ?? []).map((name) => h('option', { value: name })));
    } catch {
      // Suggestions are a convenience.
    }
  }, 250);
  input.addEventListener('input', () => {
    error.textContent = '';
    suggest();
  });

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const username = input.value.trim();
    if (!username) {
      error.textContent = 'Enter a username.';
      return input.focus();
    }
    button.disabled = true;
    error.textContent = '';
    try {
      const c = await ctx.api('POST', '/api/conversations', { body: { username }, signal });
      ctx.navigate(`/conversations/${encodeURIComponent(c.id)}`);
    } catch (err) {
      if (isAbort(err)) return;
      error.textContent =
        err.status === 404 ? `There is no user called “${username}”.` : err.status === 403 ? 'You cannot start a conversation with yourself.' : err.body?.errors?.username || err.message;
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function isOnScreen(el) {
  const r = el.getBoundingClientRect();
  return r.top < window.innerHeight + 200 && r.bottom >= 0;
}
