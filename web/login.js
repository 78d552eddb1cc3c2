// The sign-in page: by username (development servers) or with GitHub.

import { h, isAbort } from './dom.js';

export function mountLogin(root, ctx) {
  const controller = new AbortController();
  const input = h('input', { id: 'username', name: 'username', required: true, autocomplete: 'username', autocapitalize: 'none', spellcheck: 'false', maxlength: 64 });
  const button = h('button', { type: 'submit' }, 'Sign in');
  const form = h('form', { id: 'login-form', class: 'stack', novalidate: true }, h('label', { for: 'username' }, 'Username'), input, button);
  const message = h('p', { id: 'login-message', class: 'form-error', role: 'alert' }, ctx.takeFlash());
  const divider = h('p', { class: 'divider' }, h('span', {}, 'or'));
  const github = h('a', { id: 'github-sign-in', class: 'button secondary', href: '/api/oauth/github', onclick: startGitHubSignIn }, 'Sign in with GitHub');

  root.append(
    h(
      'section',
      { class: 'card login' },
      h('h1', { tabindex: '-1' }, 'Sign in to Messenger'),
      form,
      message,
      divider,
      github,
    ),
  );

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const username = input.value.trim();
    if (!username) {
      message.textContent = 'Enter a username.';
      input.focus();
      return;
    }
    button.disabled = true;
    message.textContent = '';
    try {
      const res = await ctx.api('POST', '/api/login', { body: { username }, signal: controller.signal, auth: false });
      ctx.signedIn(res.authUser, res.token, res.expiresAt);
    } catch (err) {
      if (isAbort(err)) return;
      if (err.status === 404) {
        // Development sign-in is off: GitHub is the way in.
        form.hidden = true;
        divider.hidden = true;
        github.classList.remove('secondary');
        message.className = 'form-note';
        message.textContent = 'This server signs you in with your GitHub account.';
        github.focus();
      } else {
        message.textContent = err.body?.errors?.username || err.message || 'Could not sign in.';
        input.focus();
      }
    } finally {
      button.disabled = false;
    }
  });

  return { unmount: () => controller.abort() };
}

const NONCE_KEY = 'messenger.githubNonce';

// startGitHubSignIn leaves for GitHub with a fresh nonce, kept in this tab's
// sessionStorage; the server carries it through the OAuth state and hands it back
// with the claim code, which is worth a session only together with it. A callback
// without it was not started here (see takeGitHubNonce).
// It signs in in this tab whatever the modifier keys: a sign-in opened in a new
// tab would have no nonce, and the server refuses a start without one.
function startGitHubSignIn(e) {
  if (e.button !== 0) return;
  e.preventDefault();
  const nonce = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
  sessionStorage.setItem(NONCE_KEY, nonce);
  location.assign('/api/oauth/github?nonce=' + nonce);
}

// takeGitHubNonce returns the nonce of the sign-in this tab started, if any, and
// forgets it: each nonce answers one callback.
export function takeGitHubNonce() {
  const nonce = sessionStorage.getItem(NONCE_KEY);
  sessionStorage.removeItem(NONCE_KEY);
  return nonce;
}
