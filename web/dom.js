// Small DOM helpers. User data only ever reaches the page as text nodes or
// attribute values set through the DOM, never as HTML.

// h builds an element: h('a', {href: '/', class: 'x', dataset: {id: '1'}, onclick: fn}, 'text', child).
// Strings among the children become text nodes.
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value == null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  el.append(...children.flat().filter((c) => c != null && c !== false));
  return el;
}

const URL_PATTERN = /\bhttps?:\/\/[^\s<>"]+/gi;
const TRAILING_PUNCTUATION = /[.,;:!?'"*_]+$/;

// linkify turns text into text nodes and links for the http(s) URLs in it.
export function linkify(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(URL_PATTERN)) {
    let url = match[0];
    // Leave punctuation that ends a sentence, and an unbalanced ")", outside the link.
    for (;;) {
      const trimmed = url.replace(TRAILING_PUNCTUATION, '');
      const unbalanced = trimmed.endsWith(')') && count(trimmed, '(') < count(trimmed, ')');
      const next = unbalanced ? trimmed.slice(0, -1) : trimmed;
      if (next === url) break;
      url = next;
    }
    let href;
    try {
      href = new URL(url);
    } catch {
      continue;
    }
    if (href.protocol !== 'http:' && href.protocol !== 'https:') continue;
    if (match.index > last) nodes.push(document.createTextNode(text.slice(last, match.index)));
    nodes.push(h('a', { href: href.href, target: '_blank', rel: 'noopener noreferrer' }, url));
    last = match.index + url.length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function count(s, ch) {
  return s.split(ch).length - 1;
}

// avatar shows a user's picture, or their initials in a circle.
export function avatar(user) {
  if (user?.avatarURL) {
    return h('img', { class: 'avatar', src: user.avatarURL, alt: '', width: 40, height: 40, loading: 'lazy', referrerpolicy: 'no-referrer' });
  }
  const name = user?.username ?? '?';
  const initials = [...name.replace(/[^\p{L}\p{N}]/gu, '') || name].slice(0, 2).join('').toUpperCase();
  let hash = 0;
  for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return h('span', { class: `avatar initials avatar-c${hash % 6}`, 'aria-hidden': 'true' }, initials);
}

// relativeTime says how long ago a moment was: "just now", "5m", "3h", "2d", or a date.
export function relativeTime(iso, now = Date.now()) {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return '';
  const seconds = Math.max(0, (now - then) / 1000);
  if (seconds < 60) return 'just now';
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
  if (seconds < 7 * 86400) return `${Math.floor(seconds / 86400)}d`;
  return new Date(then).toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
}

// timeElement is a <time> for a moment; relative ones are refreshed by refreshTimes.
export function timeElement(iso, { relative = true } = {}) {
  const date = new Date(iso);
  const valid = !Number.isNaN(date.getTime());
  const text = !valid ? '' : relative ? relativeTime(iso) : clockTime(date);
  return h('time', { datetime: valid ? date.toISOString() : null, title: valid ? date.toLocaleString() : null, dataset: relative ? { relative: '' } : undefined }, text);
}

// clockTime is "14:05" for today, "Nov 20, 14:05" for other days.
function clockTime(date) {
  const time = date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
  if (date.toDateString() === new Date().toDateString()) return time;
  const sameYear = date.getFullYear() === new Date().getFullYear();
  return `${date.toLocaleDateString(undefined, { month: 'short', day: 'numeric', year: sameYear ? undefined : 'numeric' })}, ${time}`;
}

export function refreshTimes(root) {
  for (const el of root.querySelectorAll('time[data-relative]')) el.textContent = relativeTime(el.dateTime);
}

export function debounce(fn, ms) {
  let timer = 0;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// announce reads a short text to screen-reader users.
export function announce(text) {
  const region = document.getElementById('announcer');
  if (!region) return;
  region.textContent = '';
  setTimeout(() => (region.textContent = text), 50);
}

export function isAbort(err) {
  return err?.name === 'AbortError';
}
