// The reconnect rules of wsgateway-client.js, with a fake WebSocket and fake timers.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  DEFAULTS, GatewaySocket, backoffDelay, closeAction, withToken,
} from '../../twisted_gateway/demo/wsgateway-client.js';

test('close codes: what each asks of the client', () => {
  const table = [
    [1000, '', 'backoff'],
    [1001, 'going away', 'now'],
    [1006, '', 'backoff'],
    [1008, 'token expired', 'token'],
    [1008, 'slow consumer', 'backoff'],
    [1011, '', 'backoff'],
    [1012, 'restarting', 'now'],
    [1013, '', 'backoff'],
    [1014, '', 'backoff'],
    [4000, '', 'stop'],
    [4999, 'banned', 'stop'],
  ];
  for (const [code, reason, action] of table) {
    assert.equal(closeAction(code, reason), action, `${code} ${reason}`);
  }
});

test('backoff: full jitter below min(cap, base * 2^attempt)', () => {
  const options = { baseDelay: 100, maxDelay: 1000 };
  const table = [[0, 100], [1, 200], [2, 400], [3, 800], [4, 1000], [30, 1000]];
  for (const [attempt, ceiling] of table) {
    assert.equal(backoffDelay(attempt, options, () => 0), 0);
    assert.equal(backoffDelay(attempt, options, () => 0.5), ceiling / 2);
    assert.ok(backoffDelay(attempt, options, () => 0.999999) < ceiling);
  }
  assert.equal(backoffDelay(0, DEFAULTS, () => 0.5), DEFAULTS.baseDelay / 2);
});

test('withToken replaces the token parameter and keeps the rest', () => {
  assert.equal(
    withToken('ws://gw/v1/chat/ws?room=lobby&token=old', 'new'),
    'ws://gw/v1/chat/ws?room=lobby&token=new',
  );
});

// -- a fake WebSocket and a fake clock ----------------------------------------

class FakeWebSocket {
  static made = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    FakeWebSocket.made.push(this);
  }
  send(data) { this.sent.push(data); }
  close(code, reason) { this.closedWith = [code, reason]; }
  open() { this.onopen({}); }
  serverClose(code, reason = '') { this.onclose({ code, reason }); }
}

function harness(options = {}) {
  FakeWebSocket.made = [];
  const timers = [];
  const events = [];
  const socket = new GatewaySocket('ws://gw/v1/chat/ws?room=lobby&token=t1', {
    WebSocket: FakeWebSocket,
    random: () => 0.5,
    setTimeout: (f, ms) => { timers.push({ f, ms }); return timers.length; },
    clearTimeout: (id) => { timers[id - 1].f = null; },
    baseDelay: 100,
    maxDelay: 1000,
    ...options,
  });
  for (const type of ['connecting', 'open', 'reconnecting', 'closed', 'expired', 'message']) {
    socket.addEventListener(type, (e) => events.push([type, e.detail]));
  }
  const last = () => FakeWebSocket.made.at(-1);
  const fire = () => { const t = timers.shift(); t.f && t.f(); return t.ms; };
  return { socket, timers, events, last, fire };
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

test('1001 and 1012: an immediate jittered reconnect, state events in order', async () => {
  const h = harness();
  h.last().open();
  h.last().serverClose(1012, 'restarting');
  await tick();
  assert.equal(h.socket.state, 'reconnecting');
  assert.deepEqual(h.events.find(([t]) => t === 'reconnecting')[1], { attempt: 1, delay: 50, code: 1012 });
  assert.equal(h.fire(), 50);
  assert.equal(FakeWebSocket.made.length, 2);
  h.last().open();
  assert.deepEqual(h.events.map(([t]) => t), ['open', 'reconnecting', 'connecting', 'open']);
});

test('failed reconnects back off exponentially up to the cap; an open resets the attempts', async () => {
  const h = harness();
  h.last().open();
  h.last().serverClose(1001);
  await tick();
  const delays = [h.fire()];
  for (let i = 0; i < 5; i += 1) {
    h.last().serverClose(1006);
    await tick();
    delays.push(h.fire());
  }
  assert.deepEqual(delays, [50, 100, 200, 400, 500, 500]);
  h.last().open();
  h.last().serverClose(1014);
  await tick();
  assert.equal(h.fire(), 50);
});

test('1011, 1013 and 1014 back off', async () => {
  for (const code of [1011, 1013, 1014]) {
    const h = harness();
    h.last().open();
    h.last().serverClose(code);
    await tick();
    assert.deepEqual(h.events.at(-1), ['reconnecting', { attempt: 1, delay: 50, code }]);
  }
});

test('messages sent while reconnecting are queued up to the bound and sent in order on open', async () => {
  const h = harness({ queueLimit: 3 });
  assert.equal(h.socket.send('early'), true);
  h.last().open();
  assert.deepEqual(h.last().sent, ['early']);
  h.last().serverClose(1012);
  await tick();
  assert.equal(h.socket.send('a'), true);
  assert.equal(h.socket.send('b'), true);
  assert.equal(h.socket.send('c'), true);
  assert.equal(h.socket.send('d'), false);
  assert.equal(h.socket.queued, 3);
  h.fire();
  h.last().open();
  assert.deepEqual(h.last().sent, ['a', 'b', 'c']);
  h.socket.send('e');
  assert.deepEqual(h.last().sent, ['a', 'b', 'c', 'e']);
});

test('no reconnect after a 4xxx code or a close the page asked for', async () => {
  const h = harness();
  h.last().open();
  h.last().serverClose(4001, 'kicked');
  await tick();
  assert.equal(h.socket.state, 'closed');
  assert.deepEqual(h.events.at(-1), ['closed', { code: 4001, reason: 'kicked' }]);
  assert.equal(h.timers.length, 0);
  assert.equal(h.socket.send('x'), false);

  const page = harness();
  page.last().open();
  page.socket.close();
  assert.deepEqual(page.last().closedWith, [1000, '']);
  assert.equal(page.socket.state, 'closed');
  assert.equal(page.timers.length, 0);

  const waiting = harness();
  waiting.last().serverClose(1006);
  await tick();
  waiting.socket.close();
  assert.equal(waiting.timers[0].f, null); // the pending reconnect is cancelled
});

test('1008 "token expired": tokenExpired gives a fresh token, then it reconnects with it', async () => {
  let resolveToken;
  const h = harness({ tokenExpired: () => new Promise((resolve) => { resolveToken = resolve; }) });
  h.last().open();
  h.last().serverClose(1008, 'token expired');
  await tick();
  assert.equal(h.socket.state, 'expired');
  assert.equal(h.timers.length, 0);
  h.socket.send('kept');
  resolveToken('t2');
  await tick();
  assert.equal(h.socket.state, 'reconnecting');
  h.fire();
  assert.equal(h.last().url, 'ws://gw/v1/chat/ws?room=lobby&token=t2');
  h.last().open();
  assert.deepEqual(h.last().sent, ['kept']);
});

test('1008 "token expired" without a fresh token ends it', async () => {
  const h = harness({ tokenExpired: async () => null });
  h.last().serverClose(1008, 'token expired');
  await tick();
  await tick();
  assert.equal(h.socket.state, 'closed');
  assert.deepEqual(h.events.at(-1), ['closed', { code: 1008, reason: 'token expired' }]);
});

test('messages arrive as message events', () => {
  const h = harness();
  h.last().open();
  h.last().onmessage({ data: '{"text": "hi"}' });
  assert.deepEqual(h.events.at(-1), ['message', { data: '{"text": "hi"}' }]);
});
