// The signed-in session (kept in localStorage) and requests to the JSON API.

const STORAGE_KEY = 'messenger.auth';

let unauthorized = () => {};

// onUnauthorized sets what happens when the server answers 401.
export function onUnauthorized(fn) {
  unauthorized = fn;
}

// getAuth returns {token, expiresAt, savedAt}, or null when signed out or expired.
export function getAuth() {
  let auth = null;
  try {
    auth = JSON.parse(localStorage.getItem(STORAGE_KEY));
  } catch {
    auth = null;
  }
  if (!auth || typeof auth.token !== 'string' || !auth.token) return null;
  const expires = Date.parse(auth.expiresAt);
  if (!Number.isNaN(expires) && expires <= Date.now()) {
    clearAuth();
    return null;
  }
  return auth;
}

export function saveAuth(token, expiresAt) {
  localStorage.setItem(STORAGE_KEY, JSON.stringify({ token, expiresAt, savedAt: Date.now() }));
}

export function clearAuth() {
  localStorage.removeItem(STORAGE_KEY);
}

export function isAuthKey(key) {
  return key === STORAGE_KEY || key === null;
}

export class APIError extends Error {
  constructor(status, body) {
    super(body?.error || `Request failed (${status})`);
    this.name = 'APIError';
    this.status = status;
    this.body = body;
  }
}

// api sends a request and returns the decoded JSON answer (null for 204).
// It throws an APIError for answers that are not 2xx; a 401 also signs out.
export async function api(method, path, { body, headers = {}, signal, auth = true } = {}) {
  const init = { method, headers: { Accept: 'application/json', ...headers }, signal };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const session = auth ? getAuth() : null;
  if (session) init.headers.Authorization = `Bearer ${session.token}`;
  const res = await fetch(path, init);
  let data = null;
  if (res.status !== 204) {
    const text = await res.text();
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    if (res.status === 401 && auth) {
      clearAuth();
      unauthorized();
    }
    throw new APIError(res.status, data);
  }
  return data;
}

// uuid returns a random UUID, also where crypto.randomUUID is missing (plain http).
export function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
