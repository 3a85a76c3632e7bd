// replay(): archived events in order with their original seq and timestamps, apart from the live
// subscriptions, against a real gateway.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { alerts, Gateway, loadClient, seqsOf, waitFor } from './helpers/gateway.mjs';

let SigmaxWebSocket;
const clients = [];
const gateways = [];

before(async () => {
  ({ SigmaxWebSocket } = await loadClient());
});

after(async () => {
  await Promise.all(clients.map((client) => client.disconnect()));
  await Promise.all(gateways.map((gateway) => gateway.stop()));
});

async function archived(gateway, seq) {
  await waitFor(async () => {
    const lines = (await (await fetch(`${gateway.httpUrl}/api/events?since=${seq - 1}`)).text()).trim();
    return lines !== '';
  }, { what: `seq ${seq} in the archive` });
}

test('replay streams archived events in order, apart from the live subscriptions', async () => {
  const gateway = await Gateway.start();
  gateways.push(gateway);
  const published = seqsOf([await gateway.publish(alerts(10))]);
  await gateway.publish([{ type: 'market_update', data: [{ symbol: 'BTC/USDT', price: 1 }] }]);
  await archived(gateway, 11);

  const client = new SigmaxWebSocket({ reconnectDelayMs: 100 });
  clients.push(client);
  const live = [];
  client.on('*', (event) => live.push(event));
  await client.connect(gateway.url);
  await client.subscribe(['market']);

  const replayed = [];
  for await (const event of client.replay({ since: 3, topics: ['alerts'] })) replayed.push(event);
  assert.deepEqual(replayed.map((event) => event.seq), published.slice(3));
  assert.ok(replayed.every((event) => event.type === 'alert' && typeof event.timestamp === 'string'));
  assert.equal(replayed[0].data.number, 3);
  assert.equal(live.length, 0); // no handler saw them

  await assert.rejects(async () => {
    for await (const event of client.replay({ since: 'yesterday' })) replayed.push(event);
  }, (error) => error.code === 'INVALID_POSITION');
});
