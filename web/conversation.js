// The conversation page: history, live messages, sending, read receipts and typing.

import { uuid } from './client.js';
import { announce, avatar, h, isAbort, linkify, timeElement } from './dom.js';
import { normalize } from './normalize.js';

const PAGE_SIZE = 25;
const MAX_LENGTH = 480; // characters (code points), as the server counts them
const COUNTER_FROM = 100; // show the counter once this few characters remain
const TYPING_EVERY = 3000; // ms between typing notices sent
const TYPING_SHOWN = 4000; // ms a typing notice from the other stays up
const GROUP_GAP = 5 * 60 * 1000; // messages of one sender closer than this share one time
const REFRESH_PAGES = 8; // pages a refresh reads back at most to fill a gap in what is shown
const REFRESH_RETRY = 3000; // ms before a failed refresh tries again

// idBefore reports whether message id a comes before b. Ids are decimal numbers
// that grow with each message, perhaps beyond what a double holds exactly.
function idBefore(a, b) {
  return a.length !== b.length ? a.length < b.length : a < b;
}

export function mountConversation(root, ctx, id) {
  const controller = new AbortController();
  const signal = controller.signal;
  const path = `/api/conversations/${encodeURIComponent(id)}`;
  const byId = new Map(); // message id -> its element
  const drafts = new WeakMap(); // element of a message being sent -> its content
  let other = null;
  let loaded = false;
  let early = []; // stream messages that came before the history
  let held = []; // my own stream messages held back while a send is answered
  let sending = 0; // sends waiting for an answer
  let oldestId = '';
  let loadingOlder = false;
  let done = false;
  let typingTimer = 0;
  let lastTypingSent = 0;
  let refreshing = false;
  let refreshDue = false; // refresh once loaded, or once the refresh in progress ends
  let refreshTimer = 0; // a failed refresh tries again

  document.body.classList.add('conversation-page');

  const title = h('h1', { tabindex: '-1' }, 'Loading…');
  const face = h('span', { class: 'face' });
  const typingStatus = h('p', { class: 'typing-status', 'aria-live': 'polite' });
  const olderStatus = h('p', { class: 'older-status', role: 'status' });
  const list = h('ol', { class: 'message-list' });
  const messages = h('div', { id: 'messages', class: 'messages', tabindex: '0', 'aria-label': 'Messages' }, olderStatus, list);
  const input = h('textarea', { id: 'message-input', name: 'content', rows: 1, placeholder: 'Write a message', 'aria-describedby': 'char-count', enterkeyhint: 'send' });
  const counter = h('span', { id: 'char-count', class: 'char-count' });
  const sendButton = h('button', { type: 'submit', class: 'send' }, 'Send');
  const form = h('form', { id: 'message-form', class: 'message-form' }, h('label', { for: 'message-input', class: 'visually-hidden' }, 'Message'), input, counter, sendButton);

  root.append(
    h(
      'section',
      { class: 'conversation' },
      h(
        'header',
        { class: 'conversation-header' },
        h('a', { class: 'back-link', href: '/' }, h('span', { 'aria-hidden': 'true' }, '← '), 'Back'),
        face,
        h('div', { class: 'who' }, title, typingStatus),
      ),
      messages,
      form,
    ),
  );

  // Rendering messages.

  function messageElement(m) {
    const li = h('li', { class: `message ${m.mine ? 'mine' : 'theirs'}` }, h('p', { class: 'content' }), h('p', { class: 'meta' }));
    fill(li, m);
    return li;
  }

  // fill makes li show the server's message m.
  function fill(li, m) {
    li.classList.remove('pending', 'failed');
    li.dataset.id = m.id;
    li.dataset.createdAt = m.createdAt;
    delete li.dataset.key;
    li.querySelector('.content').replaceChildren(...linkify(m.content));
    li.querySelector('.meta').replaceChildren(h('span', { class: 'visually-hidden' }, m.mine ? 'You, ' : `${other?.username ?? 'They'}, `), timeElement(m.createdAt, { relative: false }));
    byId.set(m.id, li);
  }

  function nearBottom() {
    return messages.scrollHeight - messages.scrollTop - messages.clientHeight < 80;
  }

  function scrollToBottom() {
    messages.scrollTop = messages.scrollHeight;
  }

  // place moves li, a confirmed message, to where its id belongs: confirmed
  // messages in order of id, then the ones being sent or not sent.
  function place(li) {
    let prev = list.lastElementChild;
    while (prev && (prev === li || prev.dataset.id === undefined || idBefore(li.dataset.id, prev.dataset.id))) prev = prev.previousElementSibling;
    if (!prev) {
      if (list.firstElementChild !== li) list.prepend(li);
    } else if (prev.nextElementSibling !== li) {
      prev.after(li);
    }
  }

  // receive shows a message from the stream or a refresh, once.
  function receive(m) {
    if (!loaded) early.push(m);
    else if (m.mine && sending > 0) held.push(m); // may be the answer to a send on its way
    else add(m);
  }

  function add(m) {
    if (byId.has(m.id)) return;
    // A send whose answer was lost may still have been stored: the stream's copy
    // confirms it, instead of showing the message twice.
    const failed = m.mine && [...list.querySelectorAll('.message.failed')].find((li) => normalize(drafts.get(li)) === m.content);
    if (failed) {
      fill(failed, m);
      place(failed);
      arrange();
      return;
    }
    const stick = nearBottom();
    place(messageElement(m));
    if (stick || m.mine) scrollToBottom();
    if (!m.mine) {
      hideTyping();
      markRead();
      announce(`${other?.username ?? 'New message'}: ${m.content}`);
    }
    arrange();
  }

  // arrange shows one time for a run of messages from one sender, and "Seen".
  function arrange() {
    const items = list.children;
    for (let i = 0; i < items.length; i++) {
      const li = items[i];
      const next = items[i + 1];
      const followed =
        next?.dataset.id !== undefined &&
        li.dataset.id !== undefined &&
        li.classList.contains('mine') === next.classList.contains('mine') &&
        Date.parse(next.dataset.createdAt) - Date.parse(li.dataset.createdAt) < GROUP_GAP;
      li.classList.toggle('followed', followed);
    }
    updateSeen();
  }

  // "Seen" goes under my last message once the other has read up to it.
  function updateSeen() {
    list.querySelector('.seen')?.remove();
    const readAt = ctx.readByOther(id);
    const mine = list.querySelectorAll('.message.mine[data-id]');
    const last = mine[mine.length - 1];
    if (readAt && last && readAt >= Date.parse(last.dataset.createdAt)) last.append(h('p', { class: 'seen' }, 'Seen'));
  }

  // Loading history.

  async function load() {
    try {
      const [conversation, page] = await Promise.all([ctx.api('GET', path, { signal }), ctx.api('GET', `${path}/messages`, { signal })]);
      other = conversation.otherParticipant;
      title.textContent = other.username;
      face.replaceChildren(avatar(other));
      for (const m of [...page].reverse()) list.append(messageElement(m));
      oldestId = page.length ? page[page.length - 1].id : '';
      done = page.length < PAGE_SIZE;
      olderStatus.textContent = done ? 'This is the beginning of your conversation.' : '';
      loaded = true;
      for (const m of early) add(m);
      early = [];
      arrange();
      scrollToBottom();
      olderObserver.observe(olderStatus);
      markRead();
      if (refreshDue) refresh();
    } catch (err) {
      if (isAbort(err)) return;
      title.textContent = err.status === 404 ? 'Conversation not found' : "Couldn't load this conversation";
      messages.replaceChildren(h('p', { class: 'notice' }, err.status === 404 ? 'It may not exist, or it is not yours. ' : 'Check your connection and try again. ', h('a', { href: '/' }, 'Back to your conversations')));
      form.hidden = true;
    }
  }

  async function loadOlder() {
    if (!loaded || loadingOlder || done || !oldestId) return;
    loadingOlder = true;
    olderStatus.textContent = 'Loading older messages…';
    try {
      const page = await ctx.api('GET', `${path}/messages?before=${encodeURIComponent(oldestId)}`, { signal });
      const height = messages.scrollHeight;
      const top = messages.scrollTop;
      const older = [...page].reverse().filter((m) => !byId.has(m.id)).map(messageElement);
      list.prepend(...older);
      if (page.length) oldestId = page[page.length - 1].id;
      done = page.length < PAGE_SIZE;
      olderStatus.textContent = done ? 'This is the beginning of your conversation.' : '';
      arrange();
      // Keep what was on screen where it was.
      messages.scrollTop = top + (messages.scrollHeight - height);
    } catch (err) {
      if (isAbort(err)) return;
      olderStatus.textContent = "Couldn't load older messages. Scroll up to try again.";
      return;
    } finally {
      loadingOlder = false;
    }
    if (!done && messages.scrollTop < olderStatus.offsetHeight + 200) loadOlder();
  }

  // refresh fetches the newest messages again, for when events may have been
  // missed, back to the newest one shown (REFRESH_PAGES pages at most), and
  // merges them by id. When more is missing, the history restarts from what it
  // fetched, and scrolling up loads the rest.
  async function refresh() {
    if (!loaded || refreshing) return void (refreshDue = true);
    refreshDue = false;
    refreshing = true;
    try {
      let newest = '';
      for (const shown of byId.keys()) if (!newest || idBefore(newest, shown)) newest = shown;
      const fetched = [];
      let before = '';
      let full = false; // the last page was full: older messages may follow
      let reached = false; // fetched back to the newest message shown, or to the beginning
      for (let i = 0; i < REFRESH_PAGES && !reached; i++) {
        const page = await ctx.api('GET', `${path}/messages${before ? `?before=${encodeURIComponent(before)}` : ''}`, { signal });
        fetched.push(...page);
        if (page.length) before = page[page.length - 1].id;
        full = page.length === PAGE_SIZE;
        reached = !full || !newest || page.some((m) => !idBefore(newest, m.id));
      }
      if (!reached) {
        for (const li of list.querySelectorAll('.message[data-id]')) li.remove();
        byId.clear();
      }
      if (!reached || !newest) {
        oldestId = before;
        done = !full;
        olderStatus.textContent = done ? 'This is the beginning of your conversation.' : '';
      }
      for (const m of fetched.reverse()) receive(m);
      arrange();
    } catch (err) {
      if (isAbort(err)) return;
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(refresh, REFRESH_RETRY);
    } finally {
      refreshing = false;
    }
    if (refreshDue) refresh();
  }

  const olderObserver = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadOlder();
  }, { root: messages, rootMargin: '200px 0px 0px 0px' });

  // Reading.

  let reading = false;
  let readAgain = false;
  async function markRead() {
    if (!loaded || document.visibilityState !== 'visible') return;
    if (reading) return void (readAgain = true);
    reading = true;
    ctx.unread.set(id, 0);
    try {
      await ctx.api('POST', `${path}/read_messages`, { signal });
    } catch {
      // The next message or visit marks them read.
    } finally {
      reading = false;
      if (readAgain) {
        readAgain = false;
        markRead();
      }
    }
  }

  function onVisibility() {
    if (document.visibilityState === 'visible') markRead();
  }
  document.addEventListener('visibilitychange', onVisibility);

  // Typing.

  function showTyping() {
    if (!typingStatus.firstChild) typingStatus.append(h('span', { class: 'typing' }, 'typing…'));
    clearTimeout(typingTimer);
    typingTimer = setTimeout(hideTyping, TYPING_SHOWN);
  }

  function hideTyping() {
    clearTimeout(typingTimer);
    typingStatus.replaceChildren();
  }

  // Sending.

  function updateCounter() {
    const remaining = MAX_LENGTH - [...input.value].length;
    counter.textContent = remaining <= COUNTER_FROM ? `${remaining} characters left` : '';
    counter.classList.toggle('over', remaining < 0);
    sendButton.disabled = remaining < 0;
  }

  input.addEventListener('input', () => {
    updateCounter();
    if (loaded && input.value.trim() && Date.now() - lastTypingSent >= TYPING_EVERY) {
      lastTypingSent = Date.now();
      ctx.api('POST', `${path}/typing`).catch(() => {});
    }
  });

  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const content = input.value.trim();
    if (!loaded || !content || [...input.value].length > MAX_LENGTH) return;
    input.value = '';
    updateCounter();
    const li = h('li', { class: 'message mine pending', dataset: { key: uuid() } }, h('p', { class: 'content' }, linkify(content)), h('p', { class: 'meta' }));
    drafts.set(li, content);
    list.append(li);
    scrollToBottom();
    send(li, content);
  });

  async function send(li, content) {
    li.classList.remove('failed');
    li.classList.add('pending');
    li.querySelector('.meta').replaceChildren('Sending…');
    sending++;
    try {
      // No abort signal: a message on its way is delivered even if the page is left.
      const m = await ctx.api('POST', `${path}/messages`, { body: { content }, headers: { 'Idempotency-Key': li.dataset.key } });
      const shown = byId.get(m.id);
      if (shown && shown !== li) li.remove();
      else {
        fill(li, m);
        place(li);
      }
    } catch (err) {
      if (err.status === 401) return;
      li.classList.remove('pending');
      li.classList.add('failed');
      const reason = err.body?.errors?.content || (err.status >= 400 && err.status < 500 ? err.message : '');
      li.querySelector('.meta').replaceChildren(
        h('span', { class: 'error' }, reason ? `Not sent: ${reason} ` : 'Not sent. '),
        h('button', { type: 'button', class: 'retry', onclick: () => send(li, content) }, 'Retry'),
      );
    } finally {
      sending--;
      if (sending === 0) {
        const mine = held;
        held = [];
        for (const m of mine) add(m);
      }
      arrange();
    }
  }

  updateCounter();
  load();
  if (matchMedia('(pointer: fine)').matches) input.focus({ preventScroll: true });

  return {
    conversationId: id,
    unmount() {
      controller.abort();
      olderObserver.disconnect();
      clearTimeout(typingTimer);
      clearTimeout(refreshTimer);
      document.removeEventListener('visibilitychange', onVisibility);
    },
    refresh,
    onMessage(m) {
      if (m.conversationId === id) receive(m);
    },
    onRead(event) {
      if (event.conversationId === id) updateSeen();
    },
    onTyping(event) {
      if (event.conversationId === id && other && event.userId === other.id) showTyping();
    },
  };
}
