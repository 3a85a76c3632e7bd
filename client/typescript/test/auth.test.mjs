// A gateway with API keys: the key goes in the X-API-Key header, a refused key fails connect() and is
// never retried, scopes and per-key connection limits come back as the gateway's codes.
// Node's own WebSocket throughout (undici inflates compressed messages in the background and
// dropped a compressed refusal that came right before the close; the gateway now sends its
// refusals uncompressed).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { alerts, Gateway, loadClient, recordStates, sleep, waitFor } from './helpers/gateway.mjs';

const READER = 'reader-key-0123456789';
const TRADER = 'trader-key-0123456789';
const LIMITED = 'limited-key-0123456789';
const PUBLISHER = 'publisher-key-0123456789';
const API_KEYS = `${READER}:read,${TRADER}:read+trade,${LIMITED}:read,${PUBLISHER}:publish`;

let gateway;
let SigmaxWebSocket;
const clients = [];

function newClient(options = {}) {
  const client = new SigmaxWebSocket({
    reconnectDelayMs: 100, maxReconnectDelayMs: 500, ...options,
  });
  clients.push(client);
  return client;
}

before(async () => {
  ({ SigmaxWebSocket } = await loadClient());
  gateway = await Gateway.start({ env: { API_KEYS, WS_MAX_CONNECTIONS_PER_KEY: '1' } });
});

after(async () => {
  await Promise.all(clients.map((client) => client.disconnect()));
  await gateway?.stop();
});

test('a wrong or missing key fails connect() with AUTHENTICATION_FAILED, without retrying', async () => {
  for (const apiKey of ['wrong-key', undefined]) {
    const client = newClient({ apiKey });
    const states = recordStates(client);
    await assert.rejects(client.connect(gateway.url), (error) => {
      assert.equal(error.name, 'SigmaxError');
      assert.equal(error.code, 'AUTHENTICATION_FAILED');
      assert.match(error.details, /API key|api_key/);
      return true;
    });
    await sleep(300);
    assert.deepEqual(states.map(([state]) => state), ['connecting', 'closed']);
    assert.equal(states[1][1].error.code, 'AUTHENTICATION_FAILED');
    assert.equal(client.state, 'closed');
  }
});

test('a key\'s scopes decide its commands', async () => {
  const reader = newClient({ apiKey: READER });
  await reader.connect(gateway.url);
  const portfolio = await reader.command('get_portfolio');
  assert.equal(portfolio.success, true);
  await assert.rejects(reader.command('pause'), { code: 'FORBIDDEN_COMMAND' });

  const trader = newClient({ apiKey: TRADER });
  await trader.connect(gateway.url);
  const events = [];
  trader.on('alert', (event) => events.push(event));
  await trader.subscribe(['alerts']);
  await gateway.publish(alerts(2), PUBLISHER);
  await waitFor(() => events.length === 2, { what: 'the alerts' });
  await reader.disconnect();
  await trader.disconnect();
});

test('beyond the per-key connection limit: MAX_CONNECTIONS_EXCEEDED', async () => {
  const first = newClient({ apiKey: LIMITED });
  await first.connect(gateway.url);
  const second = newClient({ apiKey: LIMITED });
  await assert.rejects(second.connect(gateway.url), { code: 'MAX_CONNECTIONS_EXCEEDED' });
  assert.equal(second.state, 'closed');
  await first.disconnect();
});

test('a key refused on reconnect closes the client instead of retrying', async () => {
  const client = newClient({ apiKey: READER });
  const states = recordStates(client);
  await client.connect(gateway.url);
  await client.subscribe(['alerts']);
  // The same gateway, started again without that key.
  await gateway.restart({ API_KEYS: `${TRADER}:read+trade,${PUBLISHER}:publish` });
  await waitFor(() => client.state === 'closed', { timeoutMs: 15_000, what: 'the client to give up' });
  const [, detail] = states.at(-1);
  assert.equal(detail.error.code, 'AUTHENTICATION_FAILED');
  const attempts = states.filter(([state]) => state === 'reconnecting').length;
  await sleep(500);
  assert.equal(states.filter(([state]) => state === 'reconnecting').length, attempts);
  await assert.rejects(client.getStatus(), { code: 'NOT_CONNECTED' });
});
