// What no real gateway does on purpose, with a scripted WebSocket passed as WebSocketImpl:
// replies out of order, duplicate seqs, the greeting's status, pings.

import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { loadClient } from './helpers/gateway.mjs';

const URL_OF_NOWHERE = 'ws://127.0.0.1:9/api/ws';

/** A WebSocket whose gateway is the test: `receive(message)` delivers, `sent` records. */
class ScriptedSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  static latest = null;

  CONNECTING = 0;
  OPEN = 1;
  CLOSING = 2;
  CLOSED = 3;

  constructor(url, init) {
    this.url = url;
    this.init = init;
    this.readyState = this.CONNECTING;
    this.sent = [];
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    ScriptedSocket.latest = this;
    queueMicrotask(() => {
      this.readyState = this.OPEN;
      this.onopen?.({});
      this.receive({ type: 'connected', data: {
        connection_id: 'connection-1', last_seq: 0, stream_id: 'stream-1', heartbeat_interval: 30,
      } });
      this.receive({ type: 'system_status', data: { status: 'running' } });
    });
  }

  receive(message) {
    this.onmessage?.({ data: JSON.stringify({ timestamp: '2025-12-21T10:30:00.000Z', connection_id: null, ...message }) });
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close(code = 1005, reason = '') {
    this.readyState = this.CLOSED;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }
}

const turn = () => new Promise((done) => setImmediate(done));

let SigmaxWebSocket;

before(async () => {
  ({ SigmaxWebSocket } = await loadClient());
});

test('outside a browser the API key goes in the X-API-Key header, never in the URL', async () => {
  const client = new SigmaxWebSocket({ WebSocketImpl: ScriptedSocket, apiKey: 'key with &=' });
  await client.connect(`${URL_OF_NOWHERE}?x=1`);
  const url = new URL(ScriptedSocket.latest.url);
  assert.deepEqual(ScriptedSocket.latest.init, { headers: { 'X-API-Key': 'key with &=' } });
  assert.equal(url.searchParams.get('api_key'), null);
  assert.equal(url.searchParams.get('x'), '1');
  await client.disconnect();
});

test('apiKeyIn: query puts the API key in the query string (what a browser can do)', async () => {
  const client = new SigmaxWebSocket({
    WebSocketImpl: ScriptedSocket, apiKey: 'key with &=', apiKeyIn: 'query',
  });
  await client.connect(`${URL_OF_NOWHERE}?x=1`);
  const url = new URL(ScriptedSocket.latest.url);
  assert.equal(ScriptedSocket.latest.init, undefined);
  assert.equal(url.searchParams.get('api_key'), 'key with &=');
  assert.equal(url.searchParams.get('x'), '1');
  assert.equal(client.connectionId, 'connection-1');
  assert.equal(client.streamId, 'stream-1');
  await client.disconnect();
});

test('replies settle their own request in any order; events in between reach the handlers once', async () => {
  const client = new SigmaxWebSocket({ WebSocketImpl: ScriptedSocket });
  const events = [];
  client.on('*', (event) => events.push(`${event.type} ${event.seq}`));
  await client.connect(URL_OF_NOWHERE);
  const socket = ScriptedSocket.latest;

  const status = client.getStatus();
  const held = client.getSubscriptions();
  const commanded = client.command('get_portfolio', { detail: true });
  await turn();
  const [statusRequest, heldRequest, commandRequest] = socket.sent;
  assert.deepEqual([statusRequest.type, heldRequest.type, commandRequest.type],
                   ['get_status', 'get_subscriptions', 'command']);
  assert.deepEqual(commandRequest.data, { detail: true, command: 'get_portfolio' });
  assert.equal(new Set(socket.sent.map((message) => message.request_id)).size, 3);

  socket.receive({ type: 'alert', seq: 1, data: { level: 'info', message: 'one' } });
  socket.receive({ type: 'error', request_id: commandRequest.request_id,
                   data: { error: 'Too many commands', code: 'RATE_LIMITED', details: 'retry in 1 s' } });
  socket.receive({ type: 'subscriptions', request_id: heldRequest.request_id, data: { topics: [], symbols: [], count: 0 } });
  socket.receive({ type: 'alert', seq: 1, data: { level: 'info', message: 'one again' } });
  socket.receive({ type: 'ping', data: {} });
  socket.receive({ type: 'system_status', request_id: statusRequest.request_id, data: { status: 'paused' } });
  socket.receive({ type: 'alert', seq: 2, data: { level: 'info', message: 'two' } });
  socket.receive({ type: 'system_status', seq: 3, data: { status: 'running' } });

  assert.deepEqual(await held, { topics: [], symbols: [], count: 0 });
  assert.deepEqual(await status, { status: 'paused' });
  await assert.rejects(commanded, { name: 'SigmaxError', code: 'RATE_LIMITED', details: 'retry in 1 s' });
  // The greeting's status and the replies are not events; the second seq 1 is a duplicate.
  assert.deepEqual(events, ['alert 1', 'alert 2', 'system_status 3']);
  assert.equal(client.duplicatesDropped, 1);
  assert.equal(client.lastSeq, 3);
  assert.ok(socket.sent.some((message) => message.type === 'pong'), 'the ping was answered');
  await client.disconnect();
});

test('a request without a reply times out', async () => {
  const client = new SigmaxWebSocket({ WebSocketImpl: ScriptedSocket, requestTimeoutMs: 50 });
  await client.connect(URL_OF_NOWHERE);
  await assert.rejects(client.getStatus(), { code: 'REQUEST_TIMEOUT' });
  await client.disconnect();
});

test('a greeting that is not one fails connect()', async () => {
  class Stranger extends ScriptedSocket {
    receive(message) {
      super.receive(message.type === 'connected' ? { type: 'hello', data: {} } : message);
    }
  }
  const client = new SigmaxWebSocket({ WebSocketImpl: Stranger });
  await assert.rejects(client.connect(URL_OF_NOWHERE), { code: 'CONNECTION_FAILED', message: /not a SIGMAX gateway/ });
  assert.equal(client.state, 'closed');
});
