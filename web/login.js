// The sign-in page: by username (development servers) or with GitHub.

import { h, isAbort } from './dom.js';

export function mountLogin(root, ctx) {
  const controller = new AbortController();
  const input = h('input', { id: 'username', name: 'username', required: true, autocomplete: 'username', autocapitalize: 'none', spellcheck: 'false', maxlength: 64 });
  const button = h('button', { type: 'submit' }, 'Sign in');
  const form = h('form', { id: 'login-form', class: 'stack', novalidate: true }, h('label', { for: 'username' }, 'Username'), input, button);
  const message = h('p', { id: 'login-message', class: 'form-error', role: 'alert' }, ctx.takeFlash());
  const divider = h('p', { class: 'divider' }, h('span', {}, 'or'));
  const github = h('a', { id: 'github-sign-in', class: 'button secondary', href: '/api/oauth/github' }, 'Sign in with GitHub');

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
