// The client against a real gateway: the spec's usage, request/reply under a flood of events,
// errors, heartbeats, a dead connection, and a disconnect that leaves nothing running.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import {
  alerts, clientPath, freePort, Gateway, loadClient, recordStates, seqsOf, sleep, waitFor,
} from './helpers/gateway.mjs';

const HEARTBEAT_INTERVAL_S = 1;
const CONNECTION_TIMEOUT_S = 3;

let gateway;
let SigmaxWebSocket;
let SigmaxError;
let backoffDelay;
const clients = [];

/** A client that the file's `after` disconnects even when a test fails. */
function newClient(options = {}, Class = SigmaxWebSocket) {
  const client = new Class({ reconnectDelayMs: 100, maxReconnectDelayMs: 1000, ...options });
  clients.push(client);
  return client;
}

before(async () => {
  ({ SigmaxWebSocket, SigmaxError, backoffDelay } = await loadClient());
  gateway = await Gateway.start({
    env: {
      WS_HEARTBEAT_INTERVAL: String(HEARTBEAT_INTERVAL_S),
      WS_CONNECTION_TIMEOUT: String(CONNECTION_TIMEOUT_S),
    },
  });
});

after(async () => {
  await Promise.all(clients.map((client) => client.disconnect()));
  await gateway?.stop();
});

describe('the spec\'s TypeScript usage', () => {
  test('connect, subscribe without awaiting, onProposal and onTrade', async () => {
    class Dashboard extends SigmaxWebSocket {
      proposals = [];
      trades = [];
      onProposal(data) { this.proposals.push(data); }
      onTrade(data) { this.trades.push(data); }
    }
    const client = newClient({}, Dashboard);
    await client.connect(gateway.url);
    client.subscribe(['proposals', 'executions'], ['BTC/USDT']);
    // Requests are answered in order: once this one is, the subscription is in place.
    const held = await client.getSubscriptions();
    assert.deepEqual(held, { topics: ['executions', 'proposals'], symbols: ['BTC/USDT'], count: 3 });

    const proposal = {
      proposal_id: 'prop_123', symbol: 'BTC/USDT', action: 'buy', size: 0.001,
      reason: 'Agent consensus: strong buy signal', created_at: '2025-12-21T10:30:00.000Z',
    };
    const trade = {
      proposal_id: 'prop_123', symbol: 'BTC/USDT', action: 'buy', size: 0.001, filled_price: 95000,
      order_id: 'order_456', status: 'filled', fee: 0.095, timestamp: '2025-12-21T10:31:00.000Z',
    };
    await gateway.publish([
      { type: 'proposal_created', symbol: 'BTC/USDT', data: proposal },
      { type: 'alert', symbol: 'ETH/USDT', data: { level: 'info', message: 'not subscribed' } },
      { type: 'trade_executed', symbol: 'BTC/USDT', data: trade },
    ]);
    await waitFor(() => client.trades.length === 1, { what: 'the trade' });
    assert.deepEqual(client.proposals, [proposal]);
    assert.deepEqual(client.trades, [trade]);
    assert.deepEqual(client.topics, ['proposals', 'executions']);
    assert.deepEqual(client.symbols, ['BTC/USDT']);
    await client.disconnect();
    assert.equal(client.state, 'closed');
  });
});

describe('events and state', () => {
  test('handlers by type and for every event; the returned function removes them', async (t) => {
    const client = newClient();
    const states = recordStates(client);
    assert.equal(client.state, 'idle');
    await client.connect(gateway.url);
    assert.equal(client.state, 'connected');
    assert.match(client.streamId, /\S/);
    assert.equal(client.lastSeq, null);

    const typed = [];
    const every = [];
    const removeTyped = client.on('alert', (event) => typed.push(event));
    client.on('*', (event) => every.push(event));
    client.on('alert', () => { throw new Error('a failing handler does not stop the others'); });
    const reported = [];
    const consoleError = console.error;
    console.error = (...args) => reported.push(args.join(' '));
    t.after(() => { console.error = consoleError; });
    const reply = await client.subscribe(['alerts']);
    assert.deepEqual(reply, { topics: ['alerts'], symbols: [], message: 'Subscribed to 1 topics and 0 symbols' });

    const published = await gateway.publish(alerts(3));
    await waitFor(() => typed.length === 3, { what: 'three alerts' });
    assert.deepEqual(typed.map((event) => event.seq), seqsOf([published]));
    assert.equal(typed[0].type, 'alert');
    assert.equal(typed[0].data.message, 'alert 0');
    assert.match(typed[0].timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    assert.equal(client.lastSeq, published.last_seq);

    assert.equal(reported.length, 3);
    assert.match(reported[0], /a handler of alert events failed: Error: a failing handler/);

    removeTyped();
    await gateway.publish(alerts(1, 3));
    await waitFor(() => every.filter((event) => event.type === 'alert').length === 4, { what: 'the fourth alert' });
    assert.equal(typed.length, 3);
    // Replies and the greeting's status are the client's, not events.
    assert.deepEqual([...new Set(every.map((event) => event.type))], ['alert']);

    const unsubscribed = await client.unsubscribe(['alerts']);
    assert.deepEqual(unsubscribed.topics, ['alerts']);
    assert.deepEqual(client.topics, []);
    await client.disconnect();
    assert.deepEqual(states.map(([state]) => state), ['connecting', 'connected', 'closed']);
    assert.deepEqual(states[1][1], { resumed: false });
  });

  test('the gateway\'s pings are answered: an idle connection outlives WS_CONNECTION_TIMEOUT', async () => {
    const client = newClient();
    const states = recordStates(client);
    await client.connect(gateway.url);
    const connectionId = client.connectionId;
    await sleep((CONNECTION_TIMEOUT_S + 1) * 1000);
    assert.equal(client.state, 'connected');
    assert.equal(client.connectionId, connectionId);
    assert.deepEqual(states.map(([state]) => state), ['connecting', 'connected']);
    const status = await client.getStatus();
    assert.equal(typeof status.status, 'string');
    await client.disconnect();
  });
});

describe('requests', () => {
  test('each request gets its own reply under a flood of events', async () => {
    const client = newClient({ requestTimeoutMs: 20_000 });
    await client.connect(gateway.url);
    const received = [];
    client.on('alert', (event) => received.push(event.seq));
    await client.subscribe(['all']);

    const batches = 20;
    const perBatch = 100;
    const requests = [];
    const published = [];
    for (let batch = 0; batch < batches; batch += 1) {
      const publishing = gateway.publish(alerts(perBatch, batch * perBatch));
      requests.push(client.getStatus().then((status) => assert.equal(typeof status.status, 'string')));
      requests.push(client.getSubscriptions().then((held) => assert.deepEqual(held.topics, ['all'])));
      if (batch % 2 === 0) {
        requests.push(client.command('get_portfolio').then((result) => {
          assert.equal(result.command, 'get_portfolio');
          assert.equal(result.success, true);
          assert.equal(typeof result.result.total_value, 'number');
        }));
      }
      if (batch % 5 === 0) {
        requests.push(client.command('no_such_command').then(
          () => assert.fail('an unknown command must reject'),
          (error) => assert.equal(error.code, 'MESSAGE_PROCESSING_ERROR'),
        ));
      }
      published.push(await publishing);
    }
    await Promise.all(requests);
    const expected = seqsOf(published);
    await waitFor(() => received.length >= expected.length, { timeoutMs: 20_000, what: `${expected.length} alerts` });
    await sleep(100);
    assert.deepEqual(received, expected, 'every event once, in order');
    await client.disconnect();
  });

  test('errors reject with the gateway\'s code and details; the connection stays usable', async () => {
    const client = newClient();
    await client.connect(gateway.url);

    await assert.rejects(client.command('no_such_command'), (error) => {
      assert.ok(error instanceof SigmaxError);
      assert.ok(error instanceof Error);
      assert.equal(error.code, 'MESSAGE_PROCESSING_ERROR');
      assert.match(error.details, /no_such_command/);
      return true;
    });
    await assert.rejects(client.command('approve_proposal', { proposal_id: 'missing' }),
                         { code: 'PROPOSAL_NOT_FOUND' });
    await assert.rejects(client.command('approve_proposal', { unexpected: 1 }),
                         { code: 'MESSAGE_PROCESSING_ERROR' });
    await assert.rejects(client.subscribe(['no_such_topic']), { code: 'INVALID_TOPIC' });
    await assert.rejects(client.subscribe([], ['BTCUSDT']), { code: 'INVALID_SYMBOL' });
    assert.deepEqual(client.topics, []);

    const result = await client.command('get_health');
    assert.equal(result.command, 'get_health');
    assert.equal(client.state, 'connected');
    await client.disconnect();
  });

  test('requests before connect() and after disconnect() reject at once', async () => {
    const client = newClient();
    await assert.rejects(client.getStatus(), { code: 'NOT_CONNECTED' });
    await client.connect(gateway.url);
    const pending = assert.rejects(client.command('get_portfolio'), { code: 'DISCONNECTED' });
    await client.disconnect();
    await pending;
    await assert.rejects(client.subscribe(['alerts']), { code: 'NOT_CONNECTED' });
  });

  test('connect() rejects when nothing listens, and does not retry', async () => {
    const client = newClient();
    const states = recordStates(client);
    await assert.rejects(client.connect(`ws://127.0.0.1:${await freePort()}/api/ws`),
                         { code: 'CONNECTION_FAILED' });
    await sleep(300);
    assert.deepEqual(states.map(([state]) => state), ['connecting', 'closed']);
    assert.equal(states[1][1].error.code, 'CONNECTION_FAILED');
  });
});

describe('a gateway that stops answering', () => {
  test('a request times out; the silent connection is dropped, then resumed without a gap', async () => {
    const client = newClient({ requestTimeoutMs: 700 });
    const states = recordStates(client);
    const received = [];
    client.on('alert', (event) => received.push(event.seq));
    await client.connect(gateway.url);
    await client.subscribe(['alerts']);
    const before = await gateway.publish(alerts(5));
    await waitFor(() => received.length === 5, { what: 'the first alerts' });

    gateway.pause();
    try {
      await assert.rejects(client.getStatus(), { code: 'REQUEST_TIMEOUT' });
      // Silence for twice the heartbeat interval means dead.
      await waitFor(() => client.state === 'reconnecting',
                    { timeoutMs: 4 * HEARTBEAT_INTERVAL_S * 1000 + 2000, what: 'the dead connection to be noticed' });
    } finally {
      gateway.resume();
    }
    await waitFor(() => client.state === 'connected', { timeoutMs: 15_000, what: 'the reconnect' });
    const resumed = states.find(([state, detail]) => state === 'connected' && detail.resumed);
    assert.equal(resumed[1].recovered, true);
    const reconnecting = states.find(([state]) => state === 'reconnecting');
    assert.equal(reconnecting[1].attempt, 1);
    assert.match(reconnecting[1].error.message, /no message for/);

    const afterwards = await gateway.publish(alerts(5, 5));
    await waitFor(() => received.length === 10, { what: 'the alerts after the reconnect' });
    assert.deepEqual(received, seqsOf([before, afterwards]));
    await client.disconnect();
  });
});

describe('disconnect', () => {
  // A Node process whose client disconnected exits by itself: no timer, socket or task left.
  async function runClientScript(body, timeoutMs = 10_000) {
    const script = `
      import { SigmaxWebSocket } from ${JSON.stringify(await clientPath())};
      const url = ${JSON.stringify(gateway.url)};
      const started = Date.now();
      ${body}
      process.on('exit', () => console.log('exit after', Date.now() - started, 'ms'));
    `;
    const child = spawn(process.execPath, ['--experimental-websocket', '--input-type=module', '-e', script],
                        { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk) => { output += chunk; });
    child.stderr.on('data', (chunk) => { output += chunk; });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    const [code, signal] = await new Promise((done) => child.once('exit', (...args) => done(args)));
    clearTimeout(timer);
    assert.equal(signal, null, `the process did not exit by itself within ${timeoutMs} ms:\n${output}`);
    assert.equal(code, 0, output);
    return output;
  }

  test('after a session, the process exits by itself', async () => {
    const output = await runClientScript(`
      const client = new SigmaxWebSocket();
      await client.connect(url);
      await client.subscribe(['all']);
      await client.getStatus();
      await client.disconnect();
      console.log('state', client.state);
    `);
    assert.match(output, /state closed/);
  });

  test('while reconnecting, the process exits by itself', async () => {
    // The connection goes through a proxy in the child, which then drops it.
    const output = await runClientScript(`
      const net = await import('node:net');
      const target = new URL(url);
      const sockets = new Set();
      const proxy = net.createServer((downstream) => {
        const upstream = net.connect(Number(target.port), '127.0.0.1');
        for (const socket of [downstream, upstream]) { sockets.add(socket); socket.on('error', () => {}); }
        downstream.pipe(upstream).pipe(downstream);
      });
      await new Promise((done) => proxy.listen(0, '127.0.0.1', done));
      const client = new SigmaxWebSocket({ reconnectDelayMs: 60000 });
      let reconnecting = null;
      const noticed = new Promise((done) => { reconnecting = done; });
      client.onStateChange((state) => { if (state === 'reconnecting') reconnecting(); });
      await client.connect('ws://127.0.0.1:' + proxy.address().port + '/api/ws');
      await client.subscribe(['alerts']);
      const pending = client.getStatus().catch((error) => console.log('pending', error.code));
      proxy.close();
      for (const socket of sockets) socket.destroy();
      await noticed;
      await client.disconnect();
      await pending;
      console.log('state', client.state);
    `);
    assert.match(output, /state closed/);
  });
});

test('backoffDelay grows exponentially up to the cap, with jitter in its upper half', () => {
  assert.equal(backoffDelay(0, 500, 30_000, () => 0), 250);
  assert.equal(backoffDelay(0, 500, 30_000, () => 1), 500);
  assert.equal(backoffDelay(3, 500, 30_000, () => 1), 4000);
  assert.equal(backoffDelay(20, 500, 30_000, () => 0), 15_000);
  assert.equal(backoffDelay(1000, 500, 30_000, () => 1), 30_000);
});
