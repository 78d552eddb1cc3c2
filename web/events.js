// The one EventSource of the app, kept open while signed in.
//
// Nothing is lost across reconnects. The client remembers its position in the
// user's event log from every frame that carries an id: the "ready" event that
// starts every stream, messages, reads and "reset". The browser's own retry sends
// that position as Last-Event-ID; when the browser gives up instead (EventSource
// CLOSED after a non-200 answer, such as a proxy's 502 or a 503), the new stream
// asks to resume from it with ?last_event_id=. Where the client cannot resume (it
// has no position yet, or the server answers "reset" because the position is too
// old or too far behind), it calls onResync, and the pages refetch over REST.

import { api, getAuth } from './client.js';

const RESYNC_GATHER = 50; // ms to gather the frames that each ask for a refetch

// createStream returns {start, stop}. Handlers get the decoded event data;
// onStatus gets 'open' or 'reconnecting'; onResync(reason) is called when events
// may have been missed and the state must be fetched again: 'start' (a stream
// began where the client had no position, or not where it asked to resume) or
// 'reset' (the server could not resume from it). onSessionEnded gets {reason}
// when the server ends the stream because the session was signed out or ended.
export function createStream({ onMessage, onRead, onTyping, onStatus, onResync, onSessionEnded }) {
  let source = null;
  let position = ''; // id of the last event received: where a new stream resumes
  let timer = 0;
  let attempts = 0;
  let running = false;

  function open() {
    const auth = getAuth();
    if (!running || !auth) return;
    let url = `/api/messages?token=${encodeURIComponent(auth.token)}`;
    if (position) url += `&last_event_id=${encodeURIComponent(position)}`;
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
    es.addEventListener('ready', (e) => {
      if (e.target !== source) return;
      // The stream starts where it resumed from, or elsewhere if it did not.
      const resumed = position !== '' && e.lastEventId === position;
      position = e.lastEventId;
      if (!resumed) resync('start');
    });
    es.addEventListener('reset', (e) => {
      if (e.target !== source) return;
      position = e.lastEventId;
      resync('reset');
    });
  }

  // resync calls onResync once for the frames that arrive together: a stream that
  // cannot resume sends ready and then reset, and one refetch is enough.
  let resyncTimer = 0;
  function resync(reason) {
    clearTimeout(resyncTimer);
    resyncTimer = setTimeout(() => onResync(reason), RESYNC_GATHER);
  }

  function deliver(e, handler) {
    if (e.target !== source) return;
    if (e.lastEventId) position = e.lastEventId;
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
      clearTimeout(resyncTimer);
      source?.close();
      source = null;
      position = '';
      attempts = 0;
    },
  };
}
