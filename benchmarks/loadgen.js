#!/usr/bin/env node
'use strict';
// SIGMAX Gateway fan-out load generator (a measuring instrument; Node >= 20, built-in modules only).
//
// Opens N WebSocket clients (a small RFC 6455 client on `net`: masked client frames, unmasked server
// frames with 7/16/64-bit lengths, no extensions: permessage-deflate is never offered), waits for
// `connected`, subscribes each client (topics and/or symbols assigned round-robin), waits for the
// matching `subscribed`, answers server `ping` events with `pong`, then publishes through
// POST /api/events in batches of K events and counts what every client receives:
//   received, expected (from routing), duplicates (same event id twice at one client), misrouted
//   (an event of a routing class the client did not subscribe to), lost (expected - unique received
//   after the drain), latency p50/p99/max of every delivery (all deliveries: no sampling).
// Modes: closed (as fast as delivered, at most --window deliveries outstanding), rate (--rate events/s,
// open loop, latency from the intended send time), idle (connect, subscribe, hold, publish nothing).
//
// Each data entry is {"ts_us":<epoch us at intended publish>,"id":<global event id>,"k":<routing class>,
// "symbol":...,"pad":...}; the client finds these three integers with one byte search per message
// (no JSON.parse of data messages; `--parse json` parses everything, to cross-check the counts).
//
// Prints exactly ONE JSON line on stdout. Phase marks go to stderr as `@@mark <name> <epoch_ms>` so a
// driver can sample the server's /proc at the same moments. Only loopback targets. Every loop is
// bounded in count, every phase in time, and a hard timer always ends the process.

const net = require('net');
const http = require('http');
const crypto = require('crypto');
const { URL } = require('url');
const { performance } = require('perf_hooks');

// ------------------------------------------------------------------ options
const OPTS = {
  url: 'ws://127.0.0.1:8000/api/ws',
  publishUrl: '',           // default http://<ws host:port>/api/events
  clients: 100,
  topics: 'market',         // comma list, assigned round-robin (--topics-per-client each)
  symbols: '',              // comma list, assigned round-robin (--symbols-per-client each)
  topicsPerClient: 1,
  symbolsPerClient: 1,
  publishTo: 'all',         // routing classes events go to: all | topics | symbols
  mode: 'closed',           // closed | rate | idle
  batch: 5,                 // events per POST (rate mode: at most)
  window: 10000,            // closed: max outstanding deliveries
  rate: 20,                 // rate: events/s
  maxInflight: 4,           // concurrent POSTs
  duration: 10,             // s measured (idle: s held)
  ramp: 2,                  // s of publishing before the measured window (not measured)
  settle: 1,                // s between "all subscribed" and the first publish / the hold
  drain: 5,                 // s max waiting for outstanding deliveries after publishing
  connectConcurrency: 200,  // handshakes + subscribes in flight
  connectTimeout: 90,       // s for the whole connect phase
  pad: 8,                   // characters of padding per data entry
  parse: 'fast',            // fast | json
  maxEvents: 2000000,       // hard cap on events published
  churnRate: 0,             // extra connections per second while publishing: connect, subscribe, leave
  churnHoldMin: 1,          // s a churning connection stays subscribed, at least
  churnHoldMax: 5,          // s at most (uniform); half leave with a close frame, half drop the socket
  label: '',
  timeout: 0,               // hard process timeout in s (0 = derived from the phases)
};

function parseArgs(argv) {
  const o = { ...OPTS };
  for (let i = 0; i < argv.length && i < 200; i++) {
    let a = argv[i];
    if (a === '-h' || a === '--help') {
      process.stderr.write('usage: node loadgen.js [--option value]...\n' + Object.entries(OPTS)
        .map(([k, v]) => `  --${k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())} (default ${JSON.stringify(v)})`).join('\n') + '\n');
      process.exit(0);
    }
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    a = a.slice(2);
    let v = null;
    const eq = a.indexOf('=');
    if (eq >= 0) { v = a.slice(eq + 1); a = a.slice(0, eq); }
    const k = a.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(k in OPTS)) throw new Error(`unknown option --${a}`);
    if (v === null) { if (i + 1 >= argv.length) throw new Error(`--${a} needs a value`); v = argv[++i]; }
    if (typeof OPTS[k] === 'number') {
      o[k] = Number(v);
      if (!Number.isFinite(o[k]) || o[k] < 0) throw new Error(`--${a}: not a non-negative number: ${v}`);
    } else o[k] = v;
  }
  if (!['closed', 'rate', 'idle'].includes(o.mode)) throw new Error('--mode is closed | rate | idle');
  if (!['fast', 'json'].includes(o.parse)) throw new Error('--parse is fast | json');
  if (!['all', 'topics', 'symbols'].includes(o.publishTo)) throw new Error('--publish-to is all | topics | symbols');
  return o;
}

function loopbackUrl(s) {
  const u = new URL(s);
  const h = u.hostname.replace(/^\[|\]$/g, '');
  if (!(h === 'localhost' || h === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h))) {
    throw new Error(`refusing target ${s}: only 127.0.0.0/8, localhost and ::1 are allowed`);
  }
  return u;
}

let opt;
try { opt = parseArgs(process.argv.slice(2)); } catch (e) { process.stderr.write(`loadgen: ${e.message}\n`); process.exit(2); }
let wsUrl, pubUrl;
try {
  wsUrl = loopbackUrl(opt.url);
  if (wsUrl.protocol !== 'ws:') throw new Error('only ws:// URLs');
  pubUrl = loopbackUrl(opt.publishUrl || `http://${wsUrl.host}/api/events`);
  if (pubUrl.protocol !== 'http:') throw new Error('only http:// publish URLs');
} catch (e) { process.stderr.write(`loadgen: ${e.message}\n`); process.exit(2); }
const N = Math.max(1, Math.min(20000, Math.floor(opt.clients)));
const BATCH = Math.max(1, Math.min(10000, Math.floor(opt.batch)));
const MAX_INFLIGHT = Math.max(1, Math.min(64, Math.floor(opt.maxInflight)));
const MAX_EVENTS = Math.max(1, Math.floor(opt.maxEvents));

const hardTimeoutS = opt.timeout || (opt.connectTimeout + opt.settle + opt.ramp + opt.duration + opt.drain + 30);
setTimeout(() => { process.stderr.write(`loadgen: hard timeout after ${hardTimeoutS}s\n`); process.exit(4); }, hardTimeoutS * 1000);

const nowUs = () => (performance.timeOrigin + performance.now()) * 1000; // epoch microseconds
const mark = (name) => process.stderr.write(`@@mark ${name} ${Date.now()}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------ routing model
// A routing class is what one published event looks like; its key set is every subscription key the
// gateway routes it to (its topic, and `symbol:X` for its symbol and the symbols of its entries).
// A client should receive an event iff its keys meet the class's key set (or it is on `all`).
const TYPE_FOR_TOPIC = {
  market: 'market_update', portfolio: 'portfolio_update', alerts: 'alert', analysis: 'analysis_update',
  status: 'status_change', health: 'health_update', executions: 'trade_executed', proposals: 'proposal_created',
};
const LIST_TYPES = new Set(['market_update']); // data is a list of per-symbol entries
const TOPIC_ENTRY_SYMBOL = 'BTC/USDT';         // the entry symbol of events sent to a topic
const split = (s) => (s ? String(s).split(',').map((x) => x.trim()).filter(Boolean) : []);
const topics = split(opt.topics).map((t) => t.toLowerCase());
const symbols = split(opt.symbols).map((s) => s.toUpperCase());

const classes = []; // {type, topic|null, symbol|null, entrySymbol, keys:Set}
if (opt.publishTo !== 'symbols') {
  for (const t of topics) {
    if (t === 'all') continue;
    const type = TYPE_FOR_TOPIC[t];
    if (!type) { process.stderr.write(`loadgen: no event type known for topic ${t}\n`); process.exit(2); }
    const list = LIST_TYPES.has(type);
    const keys = new Set([t]);
    if (list) keys.add('symbol:' + TOPIC_ENTRY_SYMBOL);
    classes.push({ type, topic: t, symbol: null, entrySymbol: list ? TOPIC_ENTRY_SYMBOL : null, keys });
  }
}
if (opt.publishTo !== 'topics') {
  for (const s of symbols) {
    // an event with only a symbol also goes to its type's topic (market_update -> market)
    classes.push({ type: 'market_update', topic: null, symbol: s, entrySymbol: s, keys: new Set(['symbol:' + s, 'market']) });
  }
}
const C = classes.length;
if (opt.mode !== 'idle' && C === 0) { process.stderr.write('loadgen: nothing to publish to (no topics/symbols)\n'); process.exit(2); }

// subscriptions per client, round-robin over the lists
const clientTopics = new Array(N), clientSymbols = new Array(N);
const member = new Uint8Array(N * Math.max(C, 1)); // member[i*C+c]: client i should get class c
for (let i = 0; i < N; i++) {
  const ts = [], ss = [];
  for (let j = 0; j < opt.topicsPerClient && topics.length; j++) { const t = topics[(i * opt.topicsPerClient + j) % topics.length]; if (!ts.includes(t)) ts.push(t); }
  for (let j = 0; j < opt.symbolsPerClient && symbols.length; j++) { const s = symbols[(i * opt.symbolsPerClient + j) % symbols.length]; if (!ss.includes(s)) ss.push(s); }
  clientTopics[i] = ts; clientSymbols[i] = ss;
  const keys = new Set([...ts, ...ss.map((s) => 'symbol:' + s)]);
  for (let c = 0; c < C; c++) {
    let m = keys.has('all');
    for (const k of classes[c].keys) if (keys.has(k)) { m = true; break; }
    member[i * C + c] = m ? 1 : 0;
  }
}

// ------------------------------------------------------------------ per-client state and counters
const ST_NEW = 0, ST_OPEN = 1, ST_SUBSCRIBING = 2, ST_READY = 3, ST_FAILED = 4, ST_CLOSED = 5;
const state = new Uint8Array(N);
const conns = new Array(N);
const recvOk = new Float64Array(N);   // unique, correctly routed deliveries
const dupCount = new Float64Array(N);
const misCount = new Float64Array(N);
const seen = new Array(N).fill(null); // per-client bitmap of event ids
const classFan = new Float64Array(Math.max(C, 1)); // ready clients per class (for the window)
const publishedPerClass = new Float64Array(Math.max(C, 1));
const closedSnapshot = new Map();     // client -> publishedPerClass at its close (mid-run)
const failReasons = {};
const closeCodes = {};
let nReady = 0, nFailed = 0, closedDuringRun = 0, shuttingDown = false;
let slowPath = 0;
let pingsAnswered = 0, wsPings = 0, errorMsgs = 0, otherMsgs = 0, invalidEvents = 0, unparsed = 0;
let received = 0;            // every data delivery (for the window and progress)
let receivedInWindow = 0, bytesInWindow = 0;
let lastProgressMs = 0;
let measuring = false;
let measureFirstId = Infinity, measureEndId = Infinity; // latency: events of the measured window
let dataBeforePublish = 0;

// latency histogram: 10 us buckets up to 30 s, exact counts of every recorded delivery
const BUCKET_US = 10, NBUCKETS = 3_000_000;
const hist = new Uint32Array(NBUCKETS + 1);
let latN = 0, latSum = 0, latMax = 0, latNeg = 0;
function recordLatency(us) {
  if (us < 0) { latNeg++; us = 0; }
  latN++; latSum += us; if (us > latMax) latMax = us;
  const b = (us / BUCKET_US) | 0;
  hist[b < NBUCKETS ? b : NBUCKETS]++;
}
function percentile(p) {
  if (!latN) return null;
  const target = Math.max(1, Math.ceil(latN * p));
  let cum = 0;
  for (let b = 0; b <= NBUCKETS; b++) {
    cum += hist[b];
    if (cum >= target) return b === NBUCKETS ? latMax : Math.min(latMax, (b + 1) * BUCKET_US);
  }
  return latMax;
}

// ------------------------------------------------------------------ data message handling
let nextId = 0; // ids published so far are [0, nextId)
// One clock read per socket read: every frame of a chunk arrived at the same moment.
let chunkUs = 0;
function onData(i, ts, id, k, len) {
  received++;
  if (measuring) { receivedInWindow++; bytesInWindow += len; }
  if (pubStarted === false) dataBeforePublish++;
  if (id < 0 || id >= nextId || k < 0 || k >= C) { invalidEvents++; return; }
  if (!member[i * C + k]) { misCount[i]++; return; }
  let bm = seen[i];
  const byte = id >>> 3, bit = 1 << (id & 7);
  if (bm === null || byte >= bm.length) {
    let size = bm === null ? 256 : bm.length;
    while (size <= byte) size *= 2;
    const nb = new Uint8Array(size);
    if (bm !== null) nb.set(bm);
    bm = seen[i] = nb;
  }
  if (bm[byte] & bit) { dupCount[i]++; return; }
  bm[byte] |= bit;
  recvOk[i]++;
  if (id >= measureFirstId && id < measureEndId) {
    if (chunkUs === 0) chunkUs = nowUs();
    recordLatency(chunkUs - ts);
  }
  if (wantKick && kickPending === false) { kickPending = true; setImmediate(kick); }
}

const NEEDLE = Buffer.from('"ts_us":');
const NL = NEEDLE.length;
let hint = -1; // offset of "ts_us": in the last data message: checked first, byte search otherwise
// Reads the non-negative integer at buf[p..end) after optional spaces; returns [value, nextPos] via globals.
let numVal = 0, numEnd = 0;
function readUint(buf, p, end) {
  while (p < end && buf[p] === 0x20) p++;
  let v = 0, c, any = false;
  while (p < end && (c = buf[p]) >= 0x30 && c <= 0x39) { v = v * 10 + (c - 0x30); p++; any = true; }
  numVal = any ? v : -1; numEnd = p;
  return any;
}
// Expects `,"<key>":` at p (a space allowed after the comma and after the colon); returns the position
// of the value, or -1: then the message takes the JSON.parse path, so a reordered entry is never misread.
const KEY_ID = Buffer.from('"id":'), KEY_K = Buffer.from('"k":');
function expectKey(buf, p, end, key) {
  if (p >= end || buf[p] !== 0x2c) return -1;
  p++;
  if (p < end && buf[p] === 0x20) p++;
  if (p + key.length > end) return -1;
  for (let j = 0; j < key.length; j++) if (buf[p + j] !== key[j]) return -1;
  return p + key.length;
}

function onMessage(i, buf, start, end) {
  if (opt.parse === 'fast') {
    let at = start + hint;
    if (hint < 0 || at + NL > end || buf[at] !== 0x22 || buf[at + 1] !== 0x74 || buf[at + 2] !== 0x73 || buf[at + 3] !== 0x5f ||
        buf[at + 4] !== 0x75 || buf[at + 5] !== 0x73 || buf[at + 6] !== 0x22 || buf[at + 7] !== 0x3a) {
      at = buf.indexOf(NEEDLE, start);
      if (at >= end) at = -1;
      if (at >= 0) hint = at - start;
    }
    if (at >= 0) {
      let p = at + NL;
      if (readUint(buf, p, end)) {
        const ts = numVal;
        p = expectKey(buf, numEnd, end, KEY_ID);
        if (p >= 0 && readUint(buf, p, end)) {
          const id = numVal;
          p = expectKey(buf, numEnd, end, KEY_K);
          if (p >= 0 && readUint(buf, p, end)) { onData(i, ts, id, numVal, end - start); return; }
        }
      }
      slowPath++; // not the layout we publish: parse it properly below
    }
  }
  let msg;
  try { msg = JSON.parse(buf.toString('utf8', start, end)); } catch (_) { unparsed++; return; }
  if (msg === null || typeof msg !== 'object') { otherMsgs++; return; }
  const d = Array.isArray(msg.data) ? msg.data[0] : msg.data;
  if (d && typeof d === 'object' && typeof d.ts_us === 'number') {
    onData(i, d.ts_us, typeof d.id === 'number' ? d.id : -1, typeof d.k === 'number' ? d.k : -1, end - start);
    return;
  }
  onControl(i, msg);
}

function onControl(i, msg) {
  switch (msg.type) {
    case 'connected':
      if (state[i] === ST_OPEN) subscribe(i);
      break;
    case 'subscribed':
      if (state[i] === ST_SUBSCRIBING && msg.request_id === `s${i}`) {
        state[i] = ST_READY; nReady++;
        for (let c = 0; c < C; c++) classFan[c] += member[i * C + c];
        connectDone(i);
      }
      break;
    case 'ping':
      conns[i].send('{"type":"pong"}'); pingsAnswered++;
      break;
    case 'error':
      errorMsgs++;
      if (state[i] === ST_SUBSCRIBING || state[i] === ST_OPEN) failClient(i, 'error_' + ((msg.data && msg.data.code) || 'reply'));
      break;
    default:
      otherMsgs++; // system_status, pong, ...
  }
}

// ------------------------------------------------------------------ minimal RFC 6455 client
// One read buffer for every socket: Node reads into it and calls back synchronously; each chunk is
// parsed completely before returning, and an incomplete tail is copied out.
const READ_BUF = Buffer.allocUnsafe(512 * 1024);
const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

function upgradeRequest(key) {
  return `GET ${wsUrl.pathname}${wsUrl.search} HTTP/1.1\r\nHost: ${wsUrl.host}\r\n` +
    `Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`;
}

function clientFrame(opcode, payload) {
  const len = payload.length;
  const hl = len < 126 ? 2 : len < 65536 ? 4 : 10;
  const f = Buffer.allocUnsafe(hl + 4 + len);
  f[0] = 0x80 | opcode;
  if (len < 126) f[1] = 0x80 | len;
  else if (len < 65536) { f[1] = 0x80 | 126; f.writeUInt16BE(len, 2); }
  else { f[1] = 0x80 | 127; f.writeUInt32BE(Math.floor(len / 4294967296), 2); f.writeUInt32BE(len >>> 0, 6); }
  crypto.randomFillSync(f, hl, 4);
  for (let j = 0; j < len; j++) f[hl + 4 + j] = payload[j] ^ f[hl + (j & 3)];
  return f;
}

function openClient(i) {
  const key = crypto.randomBytes(16).toString('base64');
  const acceptWant = crypto.createHash('sha1').update(key + GUID).digest('base64');
  let upgraded = false, tail = null, frag = null, fragOp = 0;
  const sock = net.connect({
    host: wsUrl.hostname.replace(/^\[|\]$/g, ''), port: Number(wsUrl.port || 80),
    onread: { buffer: READ_BUF, callback: (n, b) => { onBytes(b, n); } },
  });
  sock.setNoDelay(true);
  const c = {
    send(s) { if (upgraded && !sock.destroyed && sock.writable) sock.write(clientFrame(0x1, Buffer.from(s))); },
    close() { sock.destroy(); },
  };
  conns[i] = c;
  sock.on('connect', () => {
    sock.write(upgradeRequest(key));
  });
  sock.on('error', (e) => { failClient(i, e.code || 'socket_error'); });
  sock.on('close', () => { onClosed(i, upgraded ? lastClose : -1); });
  let lastClose = 1006;

  function onBytes(b, n) {
    let buf;
    // a view of exactly the bytes read: byte searches never run into stale bytes of READ_BUF
    if (tail !== null) { buf = Buffer.concat([tail, b.subarray(0, n)]); tail = null; } else buf = b.subarray(0, n);
    chunkUs = 0;
    const len = buf.length;
    let off = 0;
    if (!upgraded) {
      const e = buf.subarray(0, len).indexOf('\r\n\r\n');
      if (e < 0) {
        if (len > 8192) { failClient(i, 'bad_handshake'); sock.destroy(); } else tail = Buffer.from(buf.subarray(0, len));
        return;
      }
      const head = buf.toString('latin1', 0, e);
      const status = Number(head.slice(9, 12));
      const m = /\r\nsec-websocket-accept:[ \t]*([^\r\n]+)/i.exec(head);
      if (status !== 101) { failClient(i, `http_${status}`); sock.destroy(); return; }
      if (!m || m[1].trim() !== acceptWant) { failClient(i, 'bad_accept'); sock.destroy(); return; }
      if (/\r\nsec-websocket-extensions:/i.test(head)) { failClient(i, 'unexpected_extension'); sock.destroy(); return; }
      upgraded = true;
      if (state[i] === ST_NEW) state[i] = ST_OPEN;
      off = e + 4;
    }
    // frames: bounded by the bytes at hand
    while (len - off >= 2) {
      const b0 = buf[off], b1 = buf[off + 1];
      let plen = b1 & 0x7f, hl = 2;
      if (plen === 126) { if (len - off < 4) break; plen = buf.readUInt16BE(off + 2); hl = 4; }
      else if (plen === 127) { if (len - off < 10) break; plen = buf.readUInt32BE(off + 2) * 4294967296 + buf.readUInt32BE(off + 6); hl = 10; }
      if (b1 & 0x80) { failClient(i, 'masked_server_frame'); protocolError(); return; }
      if (len - off < hl + plen) break;
      const s = off + hl, e = s + plen, op = b0 & 0x0f, fin = (b0 & 0x80) !== 0;
      if (b0 & 0x70) { failClient(i, 'rsv_bits_set'); protocolError(); return; }
      if (op === 0x1 || op === 0x2) {
        if (fin) onMessage(i, buf, s, e);
        else { frag = [Buffer.from(buf.subarray(s, e))]; fragOp = op; }
      } else if (op === 0x0) {
        if (frag !== null) {
          frag.push(Buffer.from(buf.subarray(s, e)));
          if (fin) { const whole = Buffer.concat(frag); frag = null; if (fragOp) onMessage(i, whole, 0, whole.length); }
        }
      } else if (op === 0x9) { wsPings++; if (sock.writable) sock.write(clientFrame(0xA, buf.subarray(s, e))); }
      else if (op === 0x8) {
        lastClose = plen >= 2 ? buf.readUInt16BE(s) : 1005;
        if (sock.writable) sock.end(clientFrame(0x8, buf.subarray(s, Math.min(e, s + 2))));
        return;
      } // 0xA pong: nothing
      off = e;
    }
    if (off < len) tail = Buffer.from(buf.subarray(off, len));
  }
  function protocolError() { if (sock.writable) sock.end(clientFrame(0x8, Buffer.from([0x03, 0xea]))); }
}

// ------------------------------------------------------------------ churn
// Connections that come and go while events flow (not counted in deliveries or latency): each
// opens, subscribes like client 0, reads and discards what arrives, and leaves after its hold.
const churn = { started: 0, subscribed: 0, failed: 0, open: 0 };
function openChurner() {
  churn.started++; churn.open++;
  const key = crypto.randomBytes(16).toString('base64');
  const sock = net.connect({ host: wsUrl.hostname.replace(/^\[|\]$/g, ''), port: Number(wsUrl.port || 80) });
  let seen = '', subscribed = false, done = false;
  const finish = (failed) => { if (done) return; done = true; churn.open--; if (failed) churn.failed++; };
  const guard = setTimeout(() => { finish(!subscribed); sock.destroy(); }, (opt.churnHoldMax + 20) * 1000);
  sock.on('connect', () => {
    sock.write(upgradeRequest(key));
  });
  let upgraded = false;
  sock.on('data', (b) => {
    if (subscribed) return;
    seen = (seen + b.toString('latin1')).slice(-4096);
    if (!upgraded && seen.includes('\r\n\r\n')) {
      upgraded = true; // as a client must, the first frame only after the 101
      sock.write(clientFrame(0x1, Buffer.from(JSON.stringify({ type: 'subscribe', data: { topics: clientTopics[0], symbols: clientSymbols[0] }, request_id: 'churn' }))));
    }
    if (!seen.includes('"subscribed"')) return;
    subscribed = true; churn.subscribed++;
    const hold = opt.churnHoldMin + Math.random() * Math.max(0, opt.churnHoldMax - opt.churnHoldMin);
    setTimeout(() => {
      clearTimeout(guard); finish(false);
      if (churn.started % 2 && sock.writable) sock.end(clientFrame(0x8, Buffer.from([0x03, 0xe8])));
      else sock.destroy();
    }, hold * 1000);
  });
  sock.on('error', () => { clearTimeout(guard); finish(!subscribed); });
  sock.on('close', () => { clearTimeout(guard); finish(!subscribed); });
}
function startChurn(seconds) {
  if (!(opt.churnRate > 0)) return () => {};
  const every = 1000 / opt.churnRate, limit = Math.ceil(opt.churnRate * seconds);
  const timer = setInterval(() => { if (churn.started < limit) openChurner(); }, every);
  return () => clearInterval(timer);
}

// ------------------------------------------------------------------ connect phase
let inConnect = 0, connectFinished = 0, onConnectEvent = null;
const clientTimers = new Array(N).fill(null);
function subscribe(i) {
  state[i] = ST_SUBSCRIBING;
  conns[i].send(JSON.stringify({ type: 'subscribe', data: { topics: clientTopics[i], symbols: clientSymbols[i] }, request_id: `s${i}` }));
}
function connectDone(i) {
  if (clientTimers[i]) { clearTimeout(clientTimers[i]); clientTimers[i] = null; }
  inConnect--; connectFinished++;
  if (onConnectEvent) onConnectEvent();
}
function failClient(i, reason) {
  const s = state[i];
  if (s === ST_NEW || s === ST_OPEN || s === ST_SUBSCRIBING) {
    state[i] = ST_FAILED; nFailed++;
    failReasons[reason] = (failReasons[reason] || 0) + 1;
    if (conns[i]) conns[i].close();
    connectDone(i);
  }
}
function onClosed(i, code) {
  if (state[i] === ST_READY) {
    state[i] = ST_CLOSED; nReady--;
    for (let c = 0; c < C; c++) classFan[c] -= member[i * C + c];
    if (!shuttingDown) {
      closedDuringRun++; closeCodes[code] = (closeCodes[code] || 0) + 1;
      closedSnapshot.set(i, Float64Array.from(publishedPerClass));
    }
  } else failClient(i, code === -1 ? 'closed_before_upgrade' : `closed_${code}`);
}

function connectAll() {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const limit = Math.max(1, Math.floor(opt.connectConcurrency));
    let next = 0, finished = false;
    const pump = () => {
      if (finished) return;
      while (next < N && inConnect < limit) {
        const i = next++;
        inConnect++;
        clientTimers[i] = setTimeout(() => failClient(i, 'client_timeout'), 20000);
        openClient(i);
      }
      if (connectFinished >= N) finish();
    };
    const finish = () => {
      if (finished) return;
      finished = true; onConnectEvent = null; clearTimeout(guard);
      for (let i = 0; i < N; i++) if (state[i] !== ST_READY && state[i] !== ST_FAILED && state[i] !== ST_CLOSED) {
        if (i >= next) { state[i] = ST_FAILED; nFailed++; failReasons.not_started = (failReasons.not_started || 0) + 1; }
        else failClient(i, 'connect_phase_timeout');
      }
      resolve((performance.now() - t0) / 1000);
    };
    const guard = setTimeout(finish, opt.connectTimeout * 1000);
    onConnectEvent = () => setImmediate(pump);
    pump();
  });
}

// ------------------------------------------------------------------ publishing
const agent = new http.Agent({ keepAlive: true, maxSockets: MAX_INFLIGHT, maxFreeSockets: MAX_INFLIGHT });
const PAD = 'x'.repeat(Math.max(0, Math.min(65536, Math.floor(opt.pad))));
let pubStarted = false, rr = 0, posts = 0, postErrors = 0, expectedTotal = 0;
const postErrorKinds = {};
let postErrorSample = '';

function makeEvent(id, c, tsUs) {
  const cl = classes[c];
  const entry = `{"ts_us":${Math.round(tsUs)},"id":${id},"k":${c},"symbol":"${cl.entrySymbol || TOPIC_ENTRY_SYMBOL}",` +
    `"price":${95000.125 + (id % 1000) / 4},"volume_24h":1000000.5,"change_24h":2.5,"pad":"${PAD}"}`;
  const data = LIST_TYPES.has(cl.type) ? `[${entry}]` : entry;
  return cl.topic !== null
    ? `{"type":"${cl.type}","topic":"${cl.topic}","data":${data}}`
    : `{"type":"${cl.type}","symbol":"${cl.symbol}","data":${data}}`;
}

// n events, class round-robin; tsFn(j) = intended publish time of the j-th. Returns [body, fan].
function buildBatch(n, tsFn) {
  const parts = new Array(n);
  let fan = 0;
  for (let j = 0; j < n; j++) {
    const c = rr; rr = (rr + 1) % C;
    parts[j] = makeEvent(nextId, c, tsFn(j));
    nextId++;
    publishedPerClass[c]++;
    fan += classFan[c];
  }
  return [`{"events":[${parts.join(',')}]}`, fan];
}

function post(body, done) {
  posts++;
  const req = http.request({
    host: pubUrl.hostname.replace(/^\[|\]$/g, ''), port: Number(pubUrl.port || 80), path: pubUrl.pathname, method: 'POST', agent,
    headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }, timeout: 15000,
  }, (res) => {
    const bad = res.statusCode < 200 || res.statusCode >= 300;
    let text = '';
    if (bad) { res.setEncoding('utf8'); res.on('data', (d) => { if (text.length < 400) text += d; }); } else res.resume();
    res.on('end', () => {
      if (bad) {
        postErrors++; postErrorKinds[`http_${res.statusCode}`] = (postErrorKinds[`http_${res.statusCode}`] || 0) + 1;
        if (!postErrorSample) postErrorSample = text.slice(0, 400);
        done(false);
      } else done(true);
    });
  });
  req.on('socket', (s) => s.setNoDelay(true));
  req.on('timeout', () => req.destroy(new Error('timeout')));
  req.on('error', (e) => { postErrors++; const k = e.code || e.message; postErrorKinds[k] = (postErrorKinds[k] || 0) + 1; done(false); });
  req.end(body);
}

// closed loop: publish whenever outstanding deliveries + the next batch's fan-out fit in the window
let wantKick = false, kickPending = false, kick = () => {}, writtenOff = 0, stalls = 0;
function runClosed(totalMs, onWindowStart) {
  return new Promise((resolve) => {
    const tStart = performance.now(), tMeasure = tStart + opt.ramp * 1000, tEnd = tMeasure + totalMs;
    let inflight = 0, stopped = false, windowStarted = false;
    const nextFan = () => { let f = 0; for (let j = 0; j < BATCH; j++) f += classFan[(rr + j) % C]; return f; };
    const outstanding = () => expectedTotal - received - writtenOff;
    const pump = () => {
      kickPending = false;
      if (stopped) return;
      wantKick = false;
      for (let guard = 0; guard < MAX_INFLIGHT && inflight < MAX_INFLIGHT && nextId + BATCH <= MAX_EVENTS; guard++) {
        const out = outstanding();
        if (out > 0 && out + nextFan() > opt.window) { wantKick = true; break; }
        const now = nowUs();
        const [body, fan] = buildBatch(BATCH, () => now);
        expectedTotal += fan; inflight++;
        post(body, () => { inflight--; if (stopped) { if (inflight === 0) resolve(); } else setImmediate(pump); });
      }
    };
    kick = () => { const out = outstanding(); if (out <= 0 || out + nextFan() <= opt.window) pump(); else kickPending = false; };
    let seenReceived = received;
    lastProgressMs = performance.now();
    const timer = setInterval(() => {
      const now = performance.now();
      if (received !== seenReceived) { seenReceived = received; lastProgressMs = now; }
      if (!windowStarted && now >= tMeasure) { windowStarted = true; onWindowStart(); }
      if (now >= tEnd) { stopped = true; wantKick = false; clearInterval(timer); if (inflight === 0) resolve(); return; }
      // stall guard: no delivery for 2 s while deliveries are outstanding -> write them off
      if (outstanding() > 0 && now - lastProgressMs > 2000) { stalls++; writtenOff += outstanding(); lastProgressMs = now; pump(); }
    }, 5);
    pump();
  });
}

// open loop at a fixed rate: event j is due at t0 + j/rate; each tick posts what is due (<= BATCH per POST)
let maxLagEvents = 0, unsent = 0;
function runRate(totalMs, onWindowStart) {
  return new Promise((resolve) => {
    const t0 = performance.now(), t0us = nowUs();
    const rampEvents = Math.floor(opt.ramp * opt.rate);
    const total = Math.min(MAX_EVENTS, rampEvents + Math.floor((totalMs / 1000) * opt.rate));
    let issued = 0, inflight = 0, stopped = false, windowStarted = false;
    const tick = () => {
      const elapsed = performance.now() - t0;
      if (!windowStarted && issued >= rampEvents) { windowStarted = true; onWindowStart(); }
      const due = Math.min(total, Math.floor((elapsed / 1000) * opt.rate) + 1);
      if (due - issued > maxLagEvents) maxLagEvents = due - issued;
      for (let guard = 0; guard < MAX_INFLIGHT && issued < due && inflight < MAX_INFLIGHT; guard++) {
        // never mix ramp and measured events in one POST
        const cap = issued < rampEvents ? Math.min(BATCH, rampEvents - issued) : BATCH;
        const n = Math.min(due - issued, cap), base = issued;
        const [body, fan] = buildBatch(n, (j) => t0us + ((base + j) * 1e6) / opt.rate);
        issued += n; expectedTotal += fan; inflight++;
        post(body, () => { inflight--; if (stopped && inflight === 0) resolve(); });
      }
      if (issued >= total || elapsed >= opt.ramp * 1000 + totalMs + 1000) {
        stopped = true; clearInterval(timer); unsent = total - issued;
        if (inflight === 0) resolve();
      }
    };
    const timer = setInterval(tick, 1);
    tick();
  });
}

function drainWait(maxMs) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    let last = received, lastChange = t0;
    const iv = setInterval(() => {
      const now = performance.now();
      if (received !== last) { last = received; lastChange = now; }
      const done = received >= expectedTotal - writtenOff;
      if (done || now - t0 > maxMs || now - lastChange > 1500) { clearInterval(iv); resolve(done); }
    }, 10);
  });
}

// ------------------------------------------------------------------ main
async function main() {
  const out = { tool: 'sigmax-loadgen', label: opt.label, mode: opt.mode, url: opt.url, clients: N,
    topics, symbols_count: symbols.length, classes: C, batch: BATCH, window: opt.window, rate_target_eps: opt.mode === 'rate' ? opt.rate : null,
    duration_s: opt.duration, ramp_s: opt.ramp, parse: opt.parse };
  mark('connect-start');
  const connectS = await connectAll();
  Object.assign(out, { subscribed: nReady, connect_failures: nFailed, connect_fail_reasons: failReasons, connect_s: +connectS.toFixed(2) });
  mark('connected');
  await sleep(opt.settle * 1000);

  let cpu0 = null, tw0 = 0, tw1 = 0;
  const windowStart = () => {
    measureFirstId = nextId; measuring = true; receivedInWindow = 0; bytesInWindow = 0;
    cpu0 = process.cpuUsage(); tw0 = performance.now();
    mark('measure-start');
  };
  let drained = true;
  if (opt.mode === 'idle') {
    windowStart();
    await sleep(opt.duration * 1000);
  } else if (nReady > 0) {
    pubStarted = true;
    const stopChurn = startChurn(opt.ramp + opt.duration);
    if (opt.mode === 'closed') await runClosed(opt.duration * 1000, windowStart);
    else await runRate(opt.duration * 1000, windowStart);
    stopChurn();
    if (cpu0 === null) windowStart(); // window never started (e.g. no events due): empty window
  } else windowStart();
  tw1 = performance.now();
  measuring = false;
  measureEndId = nextId;
  const cpu = process.cpuUsage(cpu0);
  mark('measure-end');
  if (opt.mode !== 'idle') drained = await drainWait(opt.drain * 1000);
  mark('drained');

  // per-client accounting
  let expected = 0, ok = 0, lost = 0, dups = 0, mis = 0, shortClients = 0, counted = 0, minRecv = Infinity, maxRecv = 0;
  for (let i = 0; i < N; i++) {
    if (state[i] !== ST_READY && state[i] !== ST_CLOSED) continue;
    counted++;
    const pub = closedSnapshot.get(i) || publishedPerClass;
    let e = 0;
    for (let c = 0; c < C; c++) if (member[i * C + c]) e += pub[c];
    expected += e; ok += recvOk[i]; dups += dupCount[i]; mis += misCount[i];
    if (recvOk[i] < e) { lost += e - recvOk[i]; shortClients++; }
    if (recvOk[i] < minRecv) minRecv = recvOk[i];
    if (recvOk[i] > maxRecv) maxRecv = recvOk[i];
  }
  const win = Math.max(1e-3, (tw1 - tw0) / 1000);
  const ms = (us) => (us === null ? null : +(us / 1000).toFixed(3));
  Object.assign(out, {
    measured_s: +win.toFixed(3),
    events_published: nextId, events_measured: measureEndId - (Number.isFinite(measureFirstId) ? measureFirstId : measureEndId),
    posts, post_errors: postErrors, post_error_kinds: postErrorKinds, post_error_sample: postErrorSample || null,
    publish_eps: +((measureEndId - (Number.isFinite(measureFirstId) ? measureFirstId : measureEndId)) / win).toFixed(1),
    delivered_in_window: receivedInWindow, delivered_per_s: Math.round(receivedInWindow / win),
    avg_frame_bytes: receivedInWindow ? Math.round(bytesInWindow / receivedInWindow) : null,
    expected, received_total: received, received_unique: ok, lost, duplicates: dups, misrouted: mis,
    invalid_events: invalidEvents, unparsed_msgs: unparsed, slow_path_msgs: slowPath, clients_short: shortClients, clients_counted: counted,
    per_client_min: counted ? minRecv : null, per_client_max: counted ? maxRecv : null,
    drained, stalls, written_off: writtenOff, data_before_publish: dataBeforePublish,
    rate_max_lag_events: opt.mode === 'rate' ? maxLagEvents : null, rate_unsent: opt.mode === 'rate' ? unsent : null,
    latency_ms: { p50: ms(percentile(0.5)), p90: ms(percentile(0.9)), p99: ms(percentile(0.99)), p999: ms(percentile(0.999)),
      max: latN ? ms(latMax) : null, mean: latN ? ms(latSum / latN) : null },
    latency_samples: latN, latency_sampled: false, latency_resolution_ms: BUCKET_US / 1000, latency_negative: latNeg,
    loadgen_cpu_pct: +(((cpu.user + cpu.system) / 1000 / (tw1 - tw0)) * 100).toFixed(1),
    loadgen_cpu_sys_pct: +((cpu.system / 1000 / (tw1 - tw0)) * 100).toFixed(1),
    still_subscribed: nReady, closed_during_run: closedDuringRun, close_codes: closeCodes,
    churn_started: churn.started, churn_subscribed: churn.subscribed, churn_failed: churn.failed,
    pings_answered: pingsAnswered, ws_pings: wsPings, error_msgs: errorMsgs, other_msgs: otherMsgs,
  });
  shuttingDown = true;
  agent.destroy();
  for (let i = 0; i < N && i < conns.length; i++) if (conns[i]) conns[i].close();
  process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(nReady > 0 || opt.mode === 'idle' ? 0 : 3));
}

main().catch((e) => { process.stderr.write(`loadgen error: ${(e && e.stack) || e}\n`); process.exit(2); });
