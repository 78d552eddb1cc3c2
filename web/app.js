// Messenger's browser client: routing, the session and the event stream.

import { api, clearAuth, getAuth, isAuthKey, onUnauthorized, saveAuth } from './client.js';
import { createStream } from './events.js';
import { h } from './dom.js';
import { mountLogin, takeGitHubNonce } from './login.js';
import { mountHome } from './home.js';
import { mountConversation } from './conversation.js';

const root = document.getElementById('app');
const reconnecting = document.getElementById('reconnecting');
const signOutButton = document.getElementById('sign-out');
const signedInAs = document.getElementById('signed-in-as');
const accountName = document.getElementById('account-name');

let view = null; // the mounted page: {unmount, onMessage, onRead, onTyping, refresh, conversationId}
let me = null; // the signed-in User, once known
let sessionStarted = false;
let flash = ''; // a message for the sign-in page
const unread = new Map(); // conversation id -> unread count
const readByOther = new Map(); // conversation id -> latest readAt (ms) of the other participant
const seenMessages = new Set(); // ids of stream messages already handled

const stream = createStream({
  onMessage(message) {
    if (seenMessages.has(message.id)) return;
    seenMessages.add(message.id);
    if (seenMessages.size > 2000) seenMessages.delete(seenMessages.values().next().value);
    const watching = view?.conversationId === message.conversationId && document.visibilityState === 'visible';
    if (!message.mine && !watching) setUnread(message.conversationId, (unread.get(message.conversationId) ?? 0) + 1);
    view?.onMessage?.(message);
  },
  onRead(event) {
    if (me && event.userId === me.id) {
      setUnread(event.conversationId, 0);
    } else {
      const at = Date.parse(event.readAt);
      if (at > (readByOther.get(event.conversationId) ?? 0)) readByOther.set(event.conversationId, at);
    }
    view?.onRead?.(event);
  },
  onTyping(event) {
    view?.onTyping?.(event);
  },
  onStatus(status) {
    reconnecting.hidden = status === 'open';
  },
  onSessionEnded(event) {
    signOut(SESSION_ENDED[event?.reason] ?? SESSION_ENDED.ended);
  },
  // Events may have been missed: fetch again what the page shows, and the unread
  // counts if the page is not the list (which brings its own).
  onResync() {
    view?.refresh?.();
    if (!view?.hasUnreadCounts) refreshUnread();
  },
});

// What the sign-in page says when the server ended the session, by the reason the
// stream's session_ended event gives; never text from the server.
const SESSION_ENDED = {
  signed_out: 'You signed out in another window.',
  signed_out_everywhere: 'You signed out everywhere.',
  ended: 'Your session has ended. Please sign in again.',
};

// showAccount shows who is signed in, in the header of every page.
function showAccount() {
  accountName.textContent = me?.username ?? '';
  signedInAs.title = me ? `Signed in as ${me.username}` : '';
  signedInAs.hidden = !me;
}

// refreshUnread takes the unread counts of the newest conversations from the server.
async function refreshUnread() {
  try {
    const page = await api('GET', '/api/conversations');
    for (const c of page) if (c.id !== view?.conversationId) setUnread(c.id, c.unreadCount ?? 0);
  } catch {
    // The counts catch up at the next visit to the list.
  }
}

function setUnread(id, count) {
  if (count > 0) unread.set(id, count);
  else unread.delete(id);
  updateTitle();
}

function updateTitle() {
  let total = 0;
  for (const n of unread.values()) total += n;
  document.title = document.visibilityState === 'hidden' && total > 0 ? `(${total}) Messenger` : 'Messenger';
}

// ctx is what every page gets to work with.
const ctx = {
  api,
  navigate,
  me: () => me,
  unread: {
    get: (id) => unread.get(id) ?? 0,
    set: setUnread,
  },
  readByOther: (id) => readByOther.get(id) ?? 0,
  signedIn(user, token, expiresAt) {
    saveAuth(token, expiresAt);
    me = user;
    showAccount();
    navigate('/', { replace: true });
  },
  takeFlash() {
    const text = flash;
    flash = '';
    return text;
  },
};

function startSession() {
  if (sessionStarted) return;
  sessionStarted = true;
  signOutButton.hidden = false;
  stream.start();
  if (!me) {
    api('GET', '/api/auth_user').then((user) => {
      me = user;
      showAccount();
    }, () => {});
  }
  showAccount();
  refreshTokenIfOld();
}

// refreshTokenIfOld swaps a token that has lived half its life for a new one.
async function refreshTokenIfOld() {
  const auth = getAuth();
  if (!auth?.savedAt) return;
  const expires = Date.parse(auth.expiresAt);
  if (Number.isNaN(expires) || Date.now() < auth.savedAt + (expires - auth.savedAt) / 2) return;
  try {
    const fresh = await api('POST', '/api/refresh_token');
    if (fresh?.token) saveAuth(fresh.token, fresh.expiresAt);
  } catch {
    // The old token still works until it expires.
  }
}

function signOut(message = '') {
  clearAuth();
  stream.stop();
  sessionStarted = false;
  me = null;
  showAccount();
  unread.clear();
  readByOther.clear();
  seenMessages.clear();
  reconnecting.hidden = true;
  signOutButton.hidden = true;
  updateTitle();
  flash = message;
  navigate('/login', { replace: true });
}

export function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', path);
  else if (path !== location.pathname + location.search + location.hash) history.pushState(null, '', path);
  render({ focus: true });
}

const routes = [
  [/^\/$/, (params) => mountHome(root, ctx)],
  [/^\/conversations\/([^/]+)\/?$/, (params) => mountConversation(root, ctx, decodeURIComponent(params[1]))],
];

function render({ focus = false } = {}) {
  view?.unmount?.();
  view = null;
  root.replaceChildren();
  document.body.classList.remove('conversation-page');
  const path = location.pathname;

  if (path === '/callback') return finishGitHubSignIn();
  const auth = getAuth();
  if (path === '/login') {
    if (auth) return navigate('/', { replace: true });
    view = mountLogin(root, ctx);
  } else if (!auth) {
    if (sessionStarted) return signOut('Your session has ended. Please sign in again.');
    return navigate('/login', { replace: true });
  } else {
    startSession();
    const route = routes.find(([pattern]) => pattern.test(path));
    view = route ? route[1](path.match(route[0])) : notFound();
  }
  // Move focus to the new page, unless the page already chose where it goes.
  if (focus && !root.contains(document.activeElement)) root.querySelector('h1')?.focus({ preventScroll: true });
}

function notFound() {
  root.append(h('section', { class: 'card' }, h('h1', { tabindex: '-1' }, 'Page not found'), h('p', {}, h('a', { href: '/' }, 'Go to your conversations'))));
  return null;
}

// signInErrors are the texts shown for the error codes /callback#error= may carry;
// the page never shows text taken from the address.
const signInErrors = {
  access_denied: 'You did not allow Messenger to use your GitHub account.',
};
const signInFailed = 'Sign-in with GitHub did not finish. Please try again.';

// finishGitHubSignIn handles /callback#code=…&nonce=… (or #error=…). It claims
// the session only when nonce is the one this tab stored when it left for GitHub,
// so a link carrying somebody else's code cannot sign the browser into their
// account, and a sign-in forced on this browser by another site starts no session.
function finishGitHubSignIn() {
  const params = new URLSearchParams(location.hash.slice(1));
  const nonce = takeGitHubNonce();
  const code = params.get('code');
  history.replaceState(null, '', '/callback'); // the code leaves the address at once
  if (code && nonce && params.get('nonce') === nonce) {
    root.append(h('p', { class: 'card' }, 'Signing you in…'));
    api('POST', '/api/oauth/github/claim', { body: { code, nonce }, auth: false }).then(
      (res) => {
        saveAuth(res.token, res.expiresAt);
        navigate('/', { replace: true });
      },
      () => {
        flash = signInFailed;
        navigate('/login', { replace: true });
      },
    );
    return;
  }
  if (code) flash = 'That sign-in was not started in this browser, so it was ignored. Sign in again if you meant to.';
  else flash = Object.hasOwn(signInErrors, params.get('error')) ? signInErrors[params.get('error')] : signInFailed;
  navigate('/login', { replace: true });
}

onUnauthorized(() => {
  if (sessionStarted || location.pathname !== '/login') signOut('Your session has ended. Please sign in again.');
});

// Sign out ends the session on the server (its token then works nowhere), then here.
signOutButton.addEventListener('click', async () => {
  signOutButton.disabled = true;
  stream.stop(); // this tab needs no session_ended of its own
  try {
    await api('POST', '/api/logout');
  } catch {
    // Offline, or already ended: forgetting the token here is all that is left.
  } finally {
    signOutButton.disabled = false;
  }
  if (sessionStarted) signOut();
});

// Same-origin links move between pages without reloading; /api/ links are real requests.
document.addEventListener('click', (e) => {
  if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const link = e.target.closest('a[href]');
  if (!link || link.target || link.hasAttribute('download') || link.origin !== location.origin) return;
  if (link.pathname.startsWith('/api/')) return;
  if (link.hash && link.pathname === location.pathname) return; // an in-page jump
  e.preventDefault();
  navigate(link.pathname + link.search + link.hash);
});

window.addEventListener('popstate', () => render({ focus: true }));
document.addEventListener('visibilitychange', updateTitle);

// Signing out (or in) in another tab does the same here.
window.addEventListener('storage', (e) => {
  if (!isAuthKey(e.key)) return;
  if (!getAuth() && sessionStarted) signOut();
  else if (getAuth() && location.pathname === '/login') navigate('/', { replace: true });
});

render();
