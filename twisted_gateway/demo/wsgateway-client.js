// wsgateway-client.js: a WebSocket for chat pages behind twisted_gateway.
//
// It reconnects the way the gateway's close codes ask: at once (jittered) after
// 1001 (the gateway drains) and 1012 (it restarts), with exponential backoff and
// full jitter after 1011, 1013, 1014 and lost connections, after asking the page
// for a fresh token on 1008 "token expired", and never after a close the page
// asked for or a 4xxx code of the application. Messages sent while it reconnects
// are queued (up to a bound) and sent, in order, once it is open again.
// No dependencies: an ES module for browsers and Node.

export const DEFAULTS = Object.freeze({
  baseDelay: 500, // ms: the first backoff's ceiling
  maxDelay: 30000, // ms: no backoff is longer
  queueLimit: 100, // messages held while not open
  tokenParam: 'token', // the query parameter carrying the token
});

// Exponential backoff with full jitter: a random delay in [0, min(cap, base * 2^attempt)).
export function backoffDelay(attempt, { baseDelay, maxDelay } = DEFAULTS, random = Math.random) {
  const ceiling = Math.min(maxDelay, baseDelay * 2 ** Math.max(0, attempt));
  return Math.floor(random() * ceiling);
}

// What a close code asks of the client: 'stop', 'now' (a jittered reconnect
// within baseDelay), 'backoff', or 'token' (ask for a fresh token first).
export function closeAction(code, reason = '') {
  if (code >= 4000 && code <= 4999) return 'stop';
  if (code === 1001 || code === 1012) return 'now';
  if (code === 1008 && /token expired/i.test(reason)) return 'token';
  return 'backoff';
}

// The url with its token parameter set to token.
export function withToken(url, token, param = DEFAULTS.tokenParam) {
  const parsed = new URL(url);
  parsed.searchParams.set(param, token);
  return parsed.toString();
}

// Events: 'connecting', 'open', 'reconnecting' {attempt, delay, code},
// 'closed' {code, reason}, 'message' {data}; each a CustomEvent with detail.
export class GatewaySocket extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    this.url = options.token ? withToken(url, options.token, this.options.tokenParam) : url;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._random = options.random || Math.random;
    this._setTimeout = options.setTimeout || ((f, ms) => setTimeout(f, ms));
    this._clearTimeout = options.clearTimeout || ((t) => clearTimeout(t));
    this._queue = [];
    this._attempt = 0;
    this._timer = null;
    this._ws = null;
    this.state = 'idle';
    this._connect();
  }

  // Send now if open, else queue; false when the queue is full (nothing is sent).
  send(data) {
    if (this.state === 'open') {
      this._ws.send(data);
      return true;
    }
    if (this.state === 'closed' || this._queue.length >= this.options.queueLimit) return false;
    this._queue.push(data);
    return true;
  }

  get queued() {
    return this._queue.length;
  }

  // Close for good: the page asked, so there is no reconnect.
  close(code = 1000, reason = '') {
    if (this._timer !== null) this._clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      ws.close(code, reason);
    }
    this._finish(code, reason);
  }

  _emit(type, detail = {}) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _finish(code, reason) {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this._queue = [];
    this._emit('closed', { code, reason });
  }

  _connect() {
    this._timer = null;
    this.state = 'connecting';
    this._emit('connecting', { attempt: this._attempt });
    let ws;
    try {
      ws = new this._WebSocket(this.url, this.options.protocols);
    } catch (e) {
      this._closed(1006, String(e && e.message));
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      this._attempt = 0;
      this.state = 'open';
      this._emit('open');
      const waiting = this._queue;
      this._queue = [];
      for (const data of waiting) ws.send(data);
    };
    ws.onmessage = (event) => this._emit('message', { data: event.data });
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._closed(event.code, event.reason || '');
    };
  }

  async _closed(code, reason) {
    const action = closeAction(code, reason);
    if (action === 'stop') {
      this._finish(code, reason);
      return;
    }
    if (action === 'token') {
      const ask = this.options.tokenExpired;
      this.state = 'expired';
      this._emit('expired', { code, reason });
      const token = ask ? await ask() : null;
      if (this.state !== 'expired') return; // the page closed it meanwhile
      if (!token) {
        this._finish(code, reason);
        return;
      }
      this.url = withToken(this.url, token, this.options.tokenParam);
      this._attempt = 0;
    }
    const delay = action === 'backoff'
      ? backoffDelay(this._attempt, this.options, this._random)
      : Math.floor(this._random() * this.options.baseDelay);
    this._attempt += 1;
    this.state = 'reconnecting';
    this._emit('reconnecting', { attempt: this._attempt, delay, code });
    this._timer = this._setTimeout(() => this._connect(), delay);
  }
}
