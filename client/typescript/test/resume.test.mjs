// Reconnect and resume across a gateway that is killed and started again on the same port:
// with Redis, history survives and the client gets every event once, in order; in memory, the
// stream is a new one, numbered on after the archive, and the client resumes from the archive or,
// when the archive lacks its events, says so (resync_required, recovered: false).

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import {
  alerts, deleteRedisKeys, forgetArchived, Gateway, loadClient, migratedDatabase, recordStates, REDIS_URL,
  redisReachable, seqsOf, sleep, skipWithout, waitFor,
} from './helpers/gateway.mjs';

let SigmaxWebSocket;
const clients = [];
const gateways = [];

function newClient(options = {}) {
  const client = new SigmaxWebSocket({ reconnectDelayMs: 100, maxReconnectDelayMs: 500, ...options });
  clients.push(client);
  return client;
}

async function startGateway(options) {
  const gateway = await Gateway.start(options);
  gateways.push(gateway);
  return gateway;
}

/** A client subscribed to alerts on `gateway`, recording their seqs, resyncs and states. */
async function followAlerts(gateway) {
  const client = newClient();
  const states = recordStates(client);
  const received = [];
  client.on('alert', (event) => received.push(event.seq));
  const resyncs = [];
  client.on('resync_required', (event) => resyncs.push(event));
  await client.connect(gateway.url);
  await client.subscribe(['alerts']);
  return { client, states, received, resyncs };
}

before(async () => {
  ({ SigmaxWebSocket } = await loadClient());
});

after(async () => {
  await Promise.all(clients.map((client) => client.disconnect()));
  await Promise.all(gateways.map((gateway) => gateway.stop()));
});

test('with Redis, a gateway killed and restarted on the same port: no gap, no duplicate', async (t) => {
  if (skipWithout(t, await redisReachable(), `Redis is not reachable at ${REDIS_URL}`)) return;
  const prefix = `sigmax-ts-client-${process.pid}-${Date.now()}`;
  t.after(() => deleteRedisKeys(prefix));
  const databaseUrl = migratedDatabase('redis');
  const env = { REDIS_URL, REDIS_PREFIX: prefix };
  // Two hosts of one deployment: `other` takes the events while `gateway` is down.
  const gateway = await startGateway({ env, databaseUrl });
  const other = await startGateway({ env, databaseUrl });

  const { client, states, received, resyncs } = await followAlerts(gateway);
  const streamId = client.streamId;

  const published = [await gateway.publish(alerts(10, 0))];
  await waitFor(() => received.length === 10, { what: 'the first alerts' });

  await gateway.kill();
  await waitFor(() => client.state === 'reconnecting', { what: 'the lost connection to be noticed' });
  published.push(await other.publish(alerts(10, 10)));

  // Events keep coming while the gateway starts again and the client resumes.
  let publishing = true;
  const publisher = (async () => {
    for (let batch = 0; publishing && batch < 200; batch += 1) {
      published.push(await other.publish(alerts(5, 20 + batch * 5)));
      await sleep(20);
    }
  })();
  try {
    await gateway.run();
    await waitFor(() => client.state === 'connected', { timeoutMs: 15_000, what: 'the resume' });
    await sleep(300);
  } finally {
    publishing = false;
    await publisher;
  }
  published.push(await gateway.publish(alerts(10, 5000)));
  const expected = seqsOf(published);
  await waitFor(() => received.length >= expected.length, { timeoutMs: 15_000, what: `${expected.length} alerts` });
  await sleep(200);

  assert.deepEqual(received, expected, 'every alert once, in order');
  assert.equal(resyncs.length, 0);
  assert.equal(client.streamId, streamId);
  const resumed = states.filter(([state, detail]) => state === 'connected' && detail.resumed);
  assert.equal(resumed.length, 1);
  assert.equal(resumed[0][1].recovered, true);
  assert.ok(resumed[0][1].replayed >= 10, `replayed ${resumed[0][1].replayed}`);
  const attempts = states.filter(([state]) => state === 'reconnecting').map(([, detail]) => detail.attempt);
  assert.deepEqual(attempts, attempts.map((_, index) => index + 1));
  assert.equal(client.reconnects, 1);
  await client.disconnect();
});

test('Redis loses its data: the client follows the new stream and resumes in it', async (t) => {
  if (skipWithout(t, await redisReachable(), `Redis is not reachable at ${REDIS_URL}`)) return;
  const prefix = `sigmax-ts-client-reset-${process.pid}-${Date.now()}`;
  t.after(() => deleteRedisKeys(prefix));
  const gateway = await startGateway({ env: { REDIS_URL, REDIS_PREFIX: prefix } });
  const { client, states, received, resyncs } = await followAlerts(gateway);
  const firstStream = client.streamId;
  const published = [await gateway.publish(alerts(5, 0))];
  await waitFor(() => received.length === 5, { what: 'the first alerts' });

  deleteRedisKeys(prefix); // what a Redis restarted without persistence has: nothing
  await waitFor(() => client.streamId !== firstStream, { what: 'the stream_reset notice' });
  // Publishing waits until every worker has raised the counter: retry until accepted.
  await waitFor(async () => {
    try {
      published.push(await gateway.publish(alerts(5, 5)));
      return true;
    } catch {
      return false;
    }
  }, { timeoutMs: 10_000, intervalMs: 200, what: 'publishing in the new stream' });
  await gateway.restart();
  await waitFor(() => client.state === 'connected' && client.reconnects === 1, { timeoutMs: 15_000, what: 'the resume' });
  published.push(await gateway.publish(alerts(5, 10)));
  const expected = seqsOf(published);
  await waitFor(() => received.length >= expected.length, { what: `${expected.length} alerts` });
  await sleep(200);

  assert.deepEqual(received, expected, 'every alert once, in order');
  assert.deepEqual(expected, Array.from({ length: 15 }, (_, i) => expected[0] + i), 'no seq used twice');
  assert.equal(resyncs.length, 0, 'nothing was missed');
  const resumed = states.filter(([state, detail]) => state === 'connected' && detail.resumed);
  assert.equal(resumed.length, 1);
  assert.equal(resumed[0][1].recovered, true, 'resumed in the new stream');
});

/** A client with 3 alerts from an in-memory gateway that is then killed, and whose archive then
 * holds them (or, `forget`, not). The gateway is started again on the same port. */
async function killedAfterThreeAlerts({ forget }) {
  const gateway = await startGateway();
  const client = newClient();
  const states = recordStates(client);
  const events = [];
  client.on('*', (event) => events.push(event));
  await client.connect(gateway.url);
  await client.subscribe(['alerts']);
  const streamId = client.streamId;
  await gateway.publish(alerts(3));
  await waitFor(() => events.length === 3, { what: 'the first alerts' });
  assert.equal(client.lastSeq, 3);
  await waitFor(async () => (await (await fetch(`${gateway.httpUrl}/api/events?since=2`)).text()) !== '',
                { what: 'the archive' });
  await gateway.kill();
  if (forget) forgetArchived(gateway.databaseUrl);
  await gateway.run();
  await waitFor(() => client.state === 'connected' && client.reconnects === 1,
                { timeoutMs: 15_000, what: 'the reconnect' });
  assert.notEqual(client.streamId, streamId);
  return { gateway, client, states, events };
}

test('in memory, a restarted gateway numbers on after its archive: the client resumes', async () => {
  const { gateway, client, states, events } = await killedAfterThreeAlerts({ forget: false });
  const resumed = states.find(([state, detail]) => state === 'connected' && detail.resumed);
  assert.deepEqual(resumed[1], { resumed: true, recovered: true, replayed: 0 });
  const published = await gateway.publish(alerts(2, 3));
  assert.deepEqual(seqsOf([published]), [4, 5]);
  const alertSeqs = () => events.filter((event) => event.type === 'alert').map((event) => event.seq);
  await waitFor(() => alertSeqs().length === 5, { what: 'the new alerts' });
  assert.deepEqual(alertSeqs(), [1, 2, 3, 4, 5]);
  assert.equal(events.filter((event) => event.type === 'resync_required').length, 0);
  await client.disconnect();
});

test('in memory, a restarted gateway without the events in its archive: resync_required', async () => {
  const { gateway, client, states, events } = await killedAfterThreeAlerts({ forget: true });
  const resumed = states.find(([state, detail]) => state === 'connected' && detail.resumed);
  assert.deepEqual(resumed[1], { resumed: true, recovered: false, replayed: 0 });
  const resync = events.find((event) => event.type === 'resync_required');
  assert.equal(resync.seq, null);
  assert.equal(resync.data.since, 3);
  assert.deepEqual(resync.data.topics, ['alerts']);

  // The new stream's seqs start again at 1: accepted, not dropped as duplicates.
  const published = await gateway.publish(alerts(2, 3));
  await waitFor(() => events.filter((event) => event.type === 'alert').length === 5, { what: 'the new alerts' });
  assert.deepEqual(events.filter((event) => event.type === 'alert').slice(3).map((event) => event.seq),
                   seqsOf([published]));
  assert.equal(client.duplicatesDropped, 0);
  await client.disconnect();
});

test('with auto-reconnect off, a lost connection closes the client', async () => {
  const gateway = await startGateway();
  const client = newClient({ autoReconnect: false });
  const states = recordStates(client);
  await client.connect(gateway.url);
  await client.subscribe(['alerts']);
  await gateway.kill();
  await waitFor(() => client.state === 'closed', { what: 'the client to close' });
  assert.equal(states.at(-1)[1].error.code, 'CONNECTION_LOST');
  await assert.rejects(client.getStatus(), { code: 'NOT_CONNECTED' });
  await sleep(300);
  assert.deepEqual(states.map(([state]) => state), ['connecting', 'connected', 'closed']);
});
