// The committed artifacts match what they are made from: the generated event types match the
// gateway's AsyncAPI document, and app/static/sigmax.js is a fresh build of src/.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { bundle, STATIC_COPY_PATH } from '../scripts/build.mjs';
import { GENERATED_PATH, loadDocument, renderEvents } from '../scripts/generate-events.mjs';
import { loadClient } from './helpers/gateway.mjs';

test('src/events.generated.ts is up to date with the gateway\'s AsyncAPI document', () => {
  const expected = renderEvents(loadDocument());
  const committed = readFileSync(GENERATED_PATH, 'utf8');
  assert.ok(committed === expected,
            'src/events.generated.ts is out of date with the gateway\'s AsyncAPI document: run `npm run generate`');
});

test('the generated types follow the document', () => {
  const document = loadDocument();
  const text = renderEvents(document);
  for (const name of ['ConnectedData', 'SubscribedData', 'ErrorData', 'ProposalCreatedData', 'TradeExecutedData']) {
    assert.match(text, new RegExp(`export interface ${name} \\{`));
  }
  assert.match(text, /\n {2}market_update: MarketEntry\[\];\n/);
  assert.match(text, /\n {2}stream_id: string;\n/);

  // A new event type or field in the document changes the output, so the check above fails.
  const changed = structuredClone(document);
  changed.components.schemas.AlertData.properties.source = { type: 'string' };
  assert.match(renderEvents(changed), /\n {2}source\?: string;\n/);
});

test('app/static/sigmax.js is a fresh build of client/typescript', async () => {
  const fresh = await bundle();
  let committed = '';
  try { committed = readFileSync(STATIC_COPY_PATH, 'utf8'); } catch { /* missing */ }
  assert.ok(committed === fresh,
            'app/static/sigmax.js differs from a fresh build of client/typescript: run `npm run build`');
});

test('the bundle is one ES module without imports', async () => {
  const text = await bundle();
  assert.doesNotMatch(text, /^\s*import\b/m);
  assert.doesNotMatch(text, /\bimport\s*\(/);
  assert.doesNotMatch(text, /\brequire\s*\(/);
  const client = await loadClient();
  for (const name of ['SigmaxWebSocket', 'SigmaxError', 'TOPICS', 'SERVER_EVENT_TYPES', 'backoffDelay']) {
    assert.ok(name in client, `the bundle exports ${name}`);
  }
});
