// The one EventSource of the app, kept open while signed in.

import { api, getAuth } from './client.js';

// createStream returns {start, stop}. Handlers get the decoded event data;
// onStatus gets 'open' or 'reconnecting'. onSessionEnded gets {reason} when the
// server ends the stream because the session was signed out or ended.
export function createStream({ onMessage, onRead, onTyping, onStatus, onSessionEnded }) {
  let source = null;
  let lastEventId = '';
  let timer = 0;
  let attempts = 0;
  let running = false;

  function open() {
    const auth = getAuth();
    if (!running || !auth) return;
    let url = `/api/messages?token=${encodeURIComponent(auth.token)}`;
    if (lastEventId) url += `&last_event_id=${encodeURIComponent(lastEventId)}`;
    const es = new EventSource(url);
    source = es;
    es.onopen = () => {
      attempts = 0;
      onStatus('open');
    };
    es.onerror = () => {
      if (source !== es) return;
      onStatus('reconnecting');
      // CONNECTING: the browser retries by itself, with Last-Event-ID.
      // CLOSED: it gave up (e.g. a 401 or a 5xx); find out why and start over.
      if (es.readyState === EventSource.CLOSED) {
        source = null;
        recover();
      }
    };
    es.onmessage = (e) => deliver(e, onMessage);
    es.addEventListener('read', (e) => deliver(e, onRead));
    es.addEventListener('typing', (e) => deliver(e, onTyping));
    es.addEventListener('session_ended', (e) => deliver(e, onSessionEnded));
  }

  function deliver(e, handler) {
    if (e.target !== source) return;
    if (e.lastEventId) lastEventId = e.lastEventId;
    let data;
    try {
      data = JSON.parse(e.data);
    } catch {
      return;
    }
    handler(data);
  }

  async function recover() {
    clearTimeout(timer);
    try {
      await api('GET', '/api/auth_user');
    } catch (err) {
      if (err.status === 401) return; // api() has signed out
    }
    if (!running) return;
    const delay = Math.min(1000 * 2 ** attempts, 15000);
    attempts++;
    timer = setTimeout(open, delay);
  }

  return {
    start() {
      if (running) return;
      running = true;
      open();
    },
    stop() {
      running = false;
      clearTimeout(timer);
      source?.close();
      source = null;
      lastEventId = '';
      attempts = 0;
    },
  };
}
