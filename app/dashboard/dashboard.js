// The SIGMAX dashboard: the state over REST first, then live over the WebSocket
// (`subscribe(['all'])`) with the TypeScript client's browser bundle, which reconnects and
// resumes by itself. Server text reaches the page through textContent only.
import { SigmaxWebSocket } from '/static/sigmax.js';

const KEY_STORAGE = 'sigmax.apiKey';
// Longest lists kept on screen: older rows are dropped.
const LIMITS = { analysis: 60, trades: 50, log: 50, proposals: 100, spark: 60 };
// How long a decided proposal stays in the list, showing how it ended.
const DECIDED_VISIBLE_MS = 6000;
const SVG_NS = 'http://www.w3.org/2000/svg';
const WS_URL = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/api/ws`;

const $ = (id) => document.getElementById(id);

// -- formatting ----------------------------------------------------------------------------

const amount = new Intl.NumberFormat('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const quantity = new Intl.NumberFormat('en-US', { maximumFractionDigits: 6 });
const compact = new Intl.NumberFormat('en-US', { notation: 'compact', maximumFractionDigits: 2 });
const priceFormats = [2, 4, 6].map((digits) => new Intl.NumberFormat('en-US', {
  minimumFractionDigits: digits, maximumFractionDigits: digits,
}));

const isNumber = (value) => typeof value === 'number' && Number.isFinite(value);
const fmtMoney = (value) => (isNumber(value) ? amount.format(value) : '—');
const fmtSize = (value) => (isNumber(value) ? quantity.format(value) : '—');
const fmtCompact = (value) => (isNumber(value) ? compact.format(value) : '—');
const sign = (value) => (value > 0 ? '+' : '');
const fmtSigned = (value) => (isNumber(value) ? sign(value) + amount.format(value) : '—');
const fmtPercent = (value) => (isNumber(value) ? `${sign(value)}${value.toFixed(2)}%` : '');
const direction = (value) => (!isNumber(value) || value === 0 ? 'flat' : value > 0 ? 'up' : 'down');

function fmtPrice(value) {
  if (!isNumber(value)) return '—';
  const abs = Math.abs(value);
  return priceFormats[abs >= 100 ? 0 : abs >= 1 ? 1 : 2].format(value);
}

function fmtTime(timestamp) {
  const date = timestamp ? new Date(timestamp) : new Date();
  if (Number.isNaN(date.getTime())) return '';
  return date.toLocaleTimeString('en-GB', { hour12: false });
}

function fmtDuration(seconds) {
  if (!isNumber(seconds)) return '—';
  const s = Math.floor(seconds);
  const days = Math.floor(s / 86400);
  const hours = Math.floor((s % 86400) / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  if (days) return `${days}d ${hours}h`;
  if (hours) return `${hours}h ${String(minutes).padStart(2, '0')}m`;
  return `${minutes}m ${String(s % 60).padStart(2, '0')}s`;
}

const text = (value) => (value == null ? '' : String(value));

// -- DOM helpers ---------------------------------------------------------------------------

/** An element with properties (`class`, `text`, `dataset`, `title`, `on<event>`, attributes)
 * and children (nodes or strings, which become text nodes). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (name === 'class') node.className = value;
    else if (name === 'text') node.textContent = text(value);
    else if (name === 'dataset') Object.assign(node.dataset, value);
    else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : text(value));
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function symbolLabel(symbol) {
  const [base, quote] = text(symbol).split('/');
  return el('span', { class: 'symbol' }, base, quote ? el('span', { class: 'quote', text: `/${quote}` }) : null);
}

function sideChip(action) {
  const side = text(action).toLowerCase();
  return el('span', { class: `chip ${['buy', 'sell'].includes(side) ? side : 'hold'}`, text: side || '?' });
}

function flash(node, name) {
  node.classList.remove('flash-up', 'flash-down', 'flash-new');
  void node.offsetWidth; // restart the animation
  node.classList.add(name);
}

function keepAtMost(list, limit) {
  while (list.children.length > limit) list.lastElementChild.remove();
}

function toggleEmpty(list, empty) {
  $(empty).hidden = list.children.length > 0;
}

// -- market --------------------------------------------------------------------------------

const market = new Map(); // symbol -> {row, price, change, volume, spark, signal, history, last}

function marketRow(symbol) {
  let entry = market.get(symbol);
  if (entry) return entry;
  const price = el('span', { class: 'price', text: '—' });
  const spark = document.createElementNS(SVG_NS, 'svg');
  spark.setAttribute('class', 'spark');
  spark.setAttribute('viewBox', '0 0 96 26');
  spark.setAttribute('preserveAspectRatio', 'none');
  spark.append(document.createElementNS(SVG_NS, 'polyline'));
  entry = {
    price,
    spark,
    change: el('td', { class: 'num' }),
    volume: el('td', { class: 'num' }),
    signal: el('td'),
    history: [],
    last: null,
  };
  entry.row = el('tr', { dataset: { symbol } },
    el('td', {}, symbolLabel(symbol)), el('td', { class: 'num' }, price), entry.change,
    entry.volume, el('td', {}, spark), entry.signal);
  market.set(symbol, entry);
  const rows = $('market');
  const after = [...rows.children].find((row) => row.dataset.symbol > symbol);
  rows.insertBefore(entry.row, after ?? null);
  toggleEmpty(rows, 'market-empty');
  return entry;
}

function applyMarket(entries) {
  if (!Array.isArray(entries)) return;
  for (const tick of entries) {
    if (!tick || typeof tick.symbol !== 'string' || !isNumber(tick.price)) continue;
    const entry = marketRow(tick.symbol);
    if (entry.last !== null && tick.price !== entry.last) {
      flash(entry.price, tick.price > entry.last ? 'flash-up' : 'flash-down');
    }
    entry.last = tick.price;
    entry.price.textContent = fmtPrice(tick.price);
    entry.change.textContent = fmtPercent(tick.change_24h);
    entry.change.className = `num ${direction(tick.change_24h)}`;
    entry.volume.textContent = fmtCompact(tick.volume_24h);
    entry.history.push(tick.price);
    if (entry.history.length > LIMITS.spark) entry.history.shift();
    drawSpark(entry);
  }
}

function drawSpark({ spark, history }) {
  if (history.length < 2) return;
  const low = Math.min(...history);
  const span = Math.max(...history) - low || 1;
  const step = 96 / (LIMITS.spark - 1);
  const offset = 96 - step * (history.length - 1);
  const points = history.map((value, index) => (
    `${(offset + index * step).toFixed(1)},${(24 - ((value - low) / span) * 22).toFixed(1)}`));
  spark.firstChild.setAttribute('points', points.join(' '));
  spark.setAttribute('class', `spark ${direction(history[history.length - 1] - history[0])}`);
}

// -- analysis ------------------------------------------------------------------------------

function confidenceBar(confidence) {
  const share = isNumber(confidence) ? Math.max(0, Math.min(1, confidence)) : 0;
  const fill = el('span', { class: 'fill' });
  fill.style.width = `${(share * 100).toFixed(0)}%`;
  return el('span', { class: 'confidence', title: 'confidence' },
    el('span', { class: 'bar' }, fill), `${(share * 100).toFixed(0)}%`);
}

function onAnalysis({ data, timestamp }) {
  if (!data || typeof data.symbol !== 'string') return;
  const list = $('analysis');
  const item = el('li', { dataset: { symbol: data.symbol, decision: text(data.decision) } },
    el('span', { class: 'time', text: fmtTime(timestamp) }),
    symbolLabel(data.symbol),
    el('span', { class: 'signal' }, sideChip(data.decision), confidenceBar(data.confidence)),
    el('span', { class: 'reasoning', text: data.reasoning, title: data.reasoning }));
  list.prepend(item);
  keepAtMost(list, LIMITS.analysis);
  toggleEmpty(list, 'analysis-empty');

  const entry = marketRow(data.symbol);
  const pct = isNumber(data.confidence) ? `${(data.confidence * 100).toFixed(0)}%` : '';
  entry.signal.replaceChildren(sideChip(data.decision), el('span', { class: 'chip-sub', text: pct }));
}

// -- proposals -----------------------------------------------------------------------------

const proposals = new Map(); // proposal_id -> {node, outcome, actions, status}
const settled = new Set(); // ids decided while the page watched: never shown as pending again

function addProposal(data, live) {
  const id = text(data?.proposal_id);
  if (!id || proposals.has(id) || settled.has(id)) return;
  const approve = el('button', { type: 'button', class: 'button approve', text: 'Approve',
    dataset: { action: 'approve' }, onclick: () => decide(id, 'approve') });
  const reject = el('button', { type: 'button', class: 'button reject', text: 'Reject',
    dataset: { action: 'reject' }, onclick: () => decide(id, 'reject') });
  const actions = el('div', { class: 'proposal-actions' }, approve, reject);
  const outcome = el('div', { class: 'proposal-outcome', role: 'status' });
  const head = el('div', { class: 'proposal-head' },
    sideChip(data.action), symbolLabel(data.symbol),
    el('span', { class: 'proposal-size', text: fmtSize(data.size) }),
    isNumber(data.confidence) ? confidenceBar(data.confidence) : null);
  const meta = [`created ${fmtTime(data.created_at)}`];
  if (data.expires_at) meta.push(`expires ${fmtTime(data.expires_at)}`);
  if (data.source) meta.push(text(data.source));
  const node = el('li', { class: 'proposal', dataset: { proposalId: id, status: 'pending' } },
    head, actions, el('div', { class: 'proposal-reason', text: data.reason, title: data.reason }),
    el('div', { class: 'proposal-meta', text: meta.join(' · ') }), outcome);
  proposals.set(id, { node, outcome, actions, status: 'pending' });
  const list = $('proposals');
  list.prepend(node);
  if (live) flash(node, 'flash-new');
  while (list.children.length > LIMITS.proposals) forgetProposal(list.lastElementChild.dataset.proposalId);
  countProposals();
}

function forgetProposal(id) {
  const entry = proposals.get(id);
  if (!entry) return;
  entry.node.remove();
  proposals.delete(id);
  countProposals();
}

function countProposals() {
  const pending = [...proposals.values()].filter((entry) => entry.status === 'pending').length;
  $('proposal-count').textContent = String(pending);
  toggleEmpty($('proposals'), 'proposals-empty');
}

/** Show how a proposal ended; final states leave the list after a few seconds. */
function settleProposal(id, status, message) {
  settled.add(id);
  if (settled.size > 5000) settled.delete(settled.values().next().value);
  const entry = proposals.get(id);
  if (!entry) return;
  entry.status = status;
  entry.node.dataset.status = status;
  entry.outcome.textContent = message;
  entry.actions.replaceChildren();
  countProposals();
  if (status !== 'approved') setTimeout(() => forgetProposal(id), DECIDED_VISIBLE_MS);
}

async function decide(id, verb) {
  const entry = proposals.get(id);
  if (!entry || entry.status !== 'pending') return;
  for (const button of entry.actions.querySelectorAll('button')) button.disabled = true;
  entry.node.dataset.status = 'pending';
  entry.outcome.textContent = verb === 'approve' ? 'Approving…' : 'Rejecting…';
  try {
    const result = await api(`/api/proposals/${encodeURIComponent(id)}/${verb}`, {
      method: 'POST',
      body: verb === 'reject' ? { reason: 'Rejected from the dashboard' } : undefined,
    });
    const proposal = result?.proposal ?? {};
    if (proposal.status === 'executed' && result.trade) {
      onTrade({ data: result.trade, timestamp: result.trade.timestamp });
    } else if (proposal.status === 'approved') {
      settleProposal(id, 'approved', 'Approved: executes when trading resumes');
    } else {
      settleProposal(id, text(proposal.status) || 'rejected',
        proposal.status_reason ? `Rejected: ${proposal.status_reason}` : 'Rejected');
    }
  } catch (error) {
    if (isAuthFailure(error)) {
      askForKey('The gateway refused the API key.');
    } else if (error.status === 409 || error.status === 404) {
      settleProposal(id, 'closed', error.message);
      return;
    }
    entry.node.dataset.status = 'error';
    entry.outcome.textContent = `Could not ${verb}: ${error.message}`;
    for (const button of entry.actions.querySelectorAll('button')) button.disabled = false;
  }
}

function onProposalCreated({ data }) {
  addProposal(data, true);
  log(`New proposal: ${text(data?.action)} ${fmtSize(data?.size)} ${text(data?.symbol)}`);
}

function onProposalApproved({ data }) {
  const by = data?.approved_by ? ` by ${data.approved_by}` : '';
  if (proposals.get(text(data?.proposal_id))?.status === 'pending') {
    settleProposal(text(data.proposal_id), 'approved', `Approved${by}: executing…`);
  }
}

function onProposalClosed({ type, data }) {
  const status = type === 'proposal_expired' ? 'expired' : 'rejected';
  const reason = data?.reason ? `: ${data.reason}` : '';
  settleProposal(text(data?.proposal_id), status, `${status[0].toUpperCase()}${status.slice(1)}${reason}`);
  log(`Proposal ${status}: ${text(data?.symbol)}${reason}`, status === 'rejected' && data?.reason ? 'warning' : 'info');
}

/** After a resync: pending proposals the server no longer lists were decided meanwhile. */
function reconcileProposals(pending, before) {
  const listed = new Set(pending.map((p) => text(p.proposal_id)));
  for (const id of before) {
    if (!listed.has(id) && proposals.get(id)?.status === 'pending') forgetProposal(id);
  }
  for (const proposal of [...pending].reverse()) addProposal(proposal, false);
}

// -- executions ----------------------------------------------------------------------------

const trades = new Set(); // order ids shown

function onTrade({ data }, live = true) {
  if (!data || !data.order_id || trades.has(data.order_id)) return;
  trades.add(data.order_id);
  const row = el('tr', {
    class: 'trade', dataset: { orderId: data.order_id, proposalId: text(data.proposal_id), at: text(data.timestamp) },
  },
    el('td', { class: 'time', text: fmtTime(data.timestamp), title: text(data.timestamp) }),
    el('td', { class: 'symbol' }, symbolLabel(data.symbol)),
    el('td', {}, sideChip(data.action)),
    el('td', { class: 'num', text: fmtSize(data.size) }),
    el('td', { class: 'num', text: fmtPrice(data.filled_price) }),
    el('td', { class: 'num', text: fmtMoney(data.fee) }));
  const body = $('trades');
  if (live) {
    body.prepend(row);
    flash(row, 'flash-new');
  } else {
    body.append(row);
  }
  while (body.children.length > LIMITS.trades) {
    trades.delete(body.lastElementChild.dataset.orderId);
    body.lastElementChild.remove();
  }
  toggleEmpty(body, 'trades-empty');
  if (live) {
    const id = text(data.proposal_id);
    settleProposal(id, 'executed', `Executed ${fmtSize(data.size)} at ${fmtPrice(data.filled_price)}`);
    log(`Executed: ${text(data.action)} ${fmtSize(data.size)} ${text(data.symbol)} at ${fmtPrice(data.filled_price)}`);
    refreshPortfolio();
  }
}

// -- portfolio -----------------------------------------------------------------------------

function applyPortfolio(data) {
  if (!data || typeof data !== 'object') return;
  setFigure('total-value', fmtMoney(data.total_value));
  setFigure('cash', fmtMoney(data.available_cash));
  setFigure('total-pnl', fmtSigned(data.total_pnl), direction(data.total_pnl));
  const pct = $('total-pnl-percent');
  pct.textContent = fmtPercent(data.total_pnl_percent);
  pct.className = `figure-sub ${direction(data.total_pnl_percent)}`;
  const rows = (Array.isArray(data.positions) ? data.positions : []).map((position) => el('tr', {
    dataset: { symbol: text(position.symbol) },
  },
  el('td', {}, symbolLabel(position.symbol), el('span', { class: 'sub', text: fmtSize(position.size) })),
  el('td', { class: 'num', text: fmtPrice(position.entry_price) }),
  el('td', { class: 'num', text: fmtPrice(position.current_price) }),
  el('td', { class: 'num', text: fmtMoney(position.value) }),
  el('td', { class: `num ${direction(position.pnl)}` }, fmtSigned(position.pnl),
    el('span', { class: 'sub', text: fmtPercent(position.pnl_percent) }))));
  $('positions').replaceChildren(...rows);
  toggleEmpty($('positions'), 'positions-empty');
}

function setFigure(id, value, tone) {
  const node = $(id);
  if (node.textContent !== value && node.textContent !== '—') flash(node, 'flash-new');
  node.textContent = value;
  node.className = `figure-value${tone ? ` ${tone}` : ''}`;
}

let portfolioRefresh = null;
function refreshPortfolio() {
  // A trade changes the portfolio now; the next periodic update may be seconds away.
  clearTimeout(portfolioRefresh);
  portfolioRefresh = setTimeout(() => api('/api/portfolio').then(applyPortfolio).catch(() => {}), 150);
}

// -- system --------------------------------------------------------------------------------

const isRecord = (value) => value !== null && typeof value === 'object' && !Array.isArray(value);

// What the latest system_status and status_change said: the engine's status, the trading
// engine in use and the market feed. A status without `engine` or `market_feed` (a gateway
// without them, or the original engine's own status) keeps what is known: unknown until told.
const system = { status: null, engine: null, feed: null };

/** A system_status; with `keepStatus`, the facts only (the pill keeps a notice's status). */
function applyStatus(data, { keepStatus = false } = {}) {
  if (!isRecord(data)) return;
  if (data.status && !keepStatus) system.status = text(data.status);
  if (isRecord(data.engine)) system.engine = data.engine;
  if (isRecord(data.market_feed)) system.feed = data.market_feed;
  showEngineStatus();
  const counters = data.counters ?? {};
  const facts = [
    engineFact(system.engine),
    feedFact(system.feed),
    { name: 'Uptime', value: fmtDuration(data.uptime_seconds) },
    { name: 'Connections', value: text(data.connections ?? '—') },
    { name: 'Event bus', value: `${text(data.bus_backend || '—')}${data.leader ? ' · leader' : ''}` },
    { name: 'Proposals', value: text(counters.proposals_created ?? '—'), hint: 'Proposals made since the gateway started' },
    { name: 'Trades', value: text(counters.trades_executed ?? '—'), hint: 'Trades executed since the gateway started' },
    { name: 'Version', value: text(data.version || '—') },
  ];
  $('status-facts').replaceChildren(...facts.map(({ name, value, hint, fact, dataset }) => el('div', {
    title: hint, class: fact ? 'wide' : null, dataset: fact ? { fact } : null,
  }, el('dt', { text: name }), el('dd', { text: value, title: hint && !fact ? null : value, dataset }))));
}

/** The trading engine: the paper one, or the remote one and whether it answers. */
function engineFact(engine) {
  const fact = { name: 'Engine', fact: 'engine',
    hint: 'The trading engine: the built-in paper engine, or the remote one at ENGINE_URL' };
  const mode = text(engine?.mode);
  if (!mode) return { ...fact, value: 'unknown', dataset: { mode: 'unknown', tone: 'unknown' } };
  if (mode !== 'remote') return { ...fact, value: mode, dataset: { mode } };
  if (engine.reachable === true) {
    return { ...fact, value: 'remote · reachable', dataset: { mode, reachable: 'true', tone: 'up' } };
  }
  if (engine.reachable === false) {
    return { ...fact, value: 'remote · unreachable', dataset: { mode, reachable: 'false', tone: 'down' } };
  }
  return { ...fact, value: 'remote', dataset: { mode, reachable: 'unknown' } };
}

/** Where prices come from (MARKET_FEED), and whether it works. */
function feedFact(feed) {
  const fact = { name: 'Market feed', fact: 'feed',
    hint: 'Where prices come from (MARKET_FEED): degraded while it fails, the last known prices stay' };
  const source = text(feed?.source);
  if (!source) return { ...fact, value: 'unknown', dataset: { source: 'unknown', tone: 'unknown' } };
  if (feed.healthy === true) return { ...fact, value: `${source} · live`, dataset: { source, healthy: 'true', tone: 'up' } };
  if (feed.healthy === false) {
    return { ...fact, value: `${source} · degraded`, dataset: { source, healthy: 'false', tone: 'warn' } };
  }
  return { ...fact, value: source, dataset: { source, healthy: 'unknown' } };
}

/** Why a running system is degraded: what the engine and feed facts say is failing. */
function degradation() {
  const reasons = [];
  if (system.engine?.mode === 'remote' && system.engine.reachable === false) reasons.push('the remote engine is unreachable');
  if (system.feed?.healthy === false) reasons.push(`the market feed ${text(system.feed.source)} is failing`);
  return reasons;
}

function showEngineStatus() {
  const reasons = degradation();
  const status = system.status === 'running' && reasons.length ? 'degraded' : system.status;
  if (!status) return;
  const pill = $('system-pill');
  pill.dataset.status = status;
  pill.textContent = status.replace('_', ' ');
  pill.title = reasons.length ? `Trading engine status: ${reasons.join('; ')}` : 'Trading engine status';
}

let statusRefresh = null;
let statusRefreshKeeps = true;
/** The status now, asked of this connection's own worker (the one that sent a notice): after a
 * status change (the remote engine or the market feed failing or back), the facts change at
 * once, not at the next periodic system_status; `keepStatus` as in applyStatus. */
function refreshStatus({ keepStatus = false } = {}) {
  statusRefreshKeeps = (statusRefresh === null || statusRefreshKeeps) && keepStatus;
  clearTimeout(statusRefresh);
  statusRefresh = setTimeout(() => {
    const options = { keepStatus: statusRefreshKeeps };
    statusRefresh = null;
    socket?.getStatus().then((data) => applyStatus(data, options)).catch(() => {});
  }, 150);
}

function applyHealth(data) {
  if (!data || typeof data !== 'object') return;
  const meters = [['CPU', data.cpu_percent], ['Memory', data.memory_percent], ['Disk', data.disk_percent]];
  $('health').replaceChildren(...meters.map(([name, value]) => {
    const share = isNumber(value) ? Math.max(0, Math.min(100, value)) : 0;
    const fill = el('span', { class: `meter-fill${share >= 85 ? ' high' : ''}` });
    fill.style.width = `${share.toFixed(0)}%`;
    return el('div', { class: 'meter', dataset: { metric: name.toLowerCase() } },
      el('div', { class: 'meter-label' }, el('span', { text: name }),
        el('span', { text: isNumber(value) ? `${value.toFixed(0)}%` : '—' })),
      el('div', { class: 'meter-track' }, fill));
  }));
}

function onStatusChange({ data, timestamp }) {
  // The gateway's own notices say `status`; the original SIGMAX engine's, `current_status`.
  const status = data?.status ?? data?.current_status;
  if (status) {
    system.status = text(status);
    showEngineStatus();
  }
  // The gateway's own notices: the remote engine or the market feed went away or came back.
  if (data?.status && data.status !== 'shutting_down') refreshStatus({ keepStatus: true });
  const why = data?.reason ?? (data?.changed_by ? `by ${data.changed_by}` : '');
  log(`Status ${text(status)}${why ? `: ${why}` : ''}`, status === 'running' ? 'info' : 'warning', timestamp);
}

// An alert's `severity` (the original engine's low, medium, high, critical) as a log level.
const SEVERITY_LEVELS = { low: 'info', medium: 'warning', high: 'warning', critical: 'critical' };

/** `alert`, and the original engine's `warning`. */
function onAlert({ data, timestamp }) {
  const level = SEVERITY_LEVELS[data?.severity] ?? (text(data?.level) || 'warning');
  log(text(data?.message) || 'Alert', level, timestamp);
}

function log(message, level = 'info', timestamp = null) {
  const list = $('log');
  list.prepend(el('li', { dataset: { level } },
    el('span', { class: 'time', text: fmtTime(timestamp) }),
    el('span', { class: 'message', text: message, title: message })));
  keepAtMost(list, LIMITS.log);
}

// -- REST ----------------------------------------------------------------------------------

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

async function api(path, { method = 'GET', body } = {}) {
  const headers = { Accept: 'application/json' };
  const key = storedKey();
  if (key) headers['X-API-Key'] = key;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method, headers, cache: 'no-store', body: body === undefined ? undefined : JSON.stringify(body),
  });
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    // not JSON: reported by status below
  }
  if (!response.ok) {
    const error = new Error(text(payload?.details || payload?.error || `HTTP ${response.status}`));
    error.status = response.status;
    error.code = payload?.code;
    throw error;
  }
  return payload;
}

function isAuthFailure(error) {
  return error?.code === 'AUTHENTICATION_FAILED' || error?.status === 401;
}

/** The state as REST sees it now: at start, and when a resume could not replay what was missed.
 * What answers is shown even when a part fails (a remote engine that has not published its
 * portfolio yet); then the first failure (an authentication one first) is thrown. */
async function loadSnapshot() {
  const before = [...proposals.keys()];
  const parts = await Promise.allSettled([
    api('/api/market'), api('/api/portfolio'), api('/api/proposals?status=pending&limit=100'),
    api('/api/trades?limit=50'), api('/api/status'),
  ]);
  const [prices, portfolio, pending, executed, status] = parts.map((part) => part.value);
  if (prices) applyMarket(prices.symbols);
  if (portfolio) applyPortfolio(portfolio);
  if (pending) reconcileProposals(pending.items ?? [], before);
  if (executed) {
    for (const trade of executed.items ?? []) onTrade({ data: trade }, false);
    // Newest first, also when some arrived live before the snapshot (ISO times sort as text).
    const rows = [...$('trades').children];
    rows.sort((a, b) => (a.dataset.at < b.dataset.at ? 1 : a.dataset.at > b.dataset.at ? -1 : 0));
    $('trades').replaceChildren(...rows);
  }
  if (status) applyStatus(status);
  const failures = parts.filter((part) => part.status === 'rejected').map((part) => part.reason);
  if (failures.length) throw failures.find(isAuthFailure) ?? failures[0];
}

// -- the WebSocket -------------------------------------------------------------------------

const HANDLERS = {
  market_update: ({ data }) => applyMarket(data),
  analysis_update: onAnalysis,
  proposal_created: onProposalCreated,
  proposal_approved: onProposalApproved,
  proposal_rejected: onProposalClosed,
  proposal_expired: onProposalClosed,
  trade_executed: (event) => onTrade(event, true),
  portfolio_update: ({ data }) => applyPortfolio(data),
  system_status: ({ data }) => applyStatus(data),
  health_update: ({ data }) => applyHealth(data),
  status_change: onStatusChange,
  alert: onAlert,
  warning: onAlert,
  // After a resume that history could not cover, or when the gateway's event stream was
  // re-established and events were missed.
  resync_required: ({ data }) => {
    log(`Events after seq ${data.since} may be missing: state reloaded`, 'warning');
    loadSnapshot().catch(snapshotFailed);
  },
};

let socket = null;
let starting = false; // start() handles what the first connect() says
let everConnected = false;
let startRetry = null;
let startAttempt = 0;

function showConnection(state, label, detail = '', title = '') {
  const badge = $('connection');
  badge.dataset.state = state;
  badge.title = title;
  $('connection-label').textContent = label;
  $('connection-detail').textContent = detail;
}

function onState(state, detail) {
  switch (state) {
    case 'connecting':
      showConnection('connecting', 'Connecting');
      break;
    case 'connected':
      // The status of this connection's worker now, as its greeting had it (which the client
      // keeps to itself): the engine and the market feed may have changed while away.
      refreshStatus();
      if (detail.resumed) {
        const recovered = detail.recovered !== false;
        showConnection('resumed', 'Resumed',
          recovered ? `recovered · ${detail.replayed ?? 0} replayed` : 'resync',
          recovered ? 'Reconnected; every missed event was replayed'
            : 'Reconnected; history did not reach back, the state was reloaded');
        // Not recovered: the client's resync_required follows, which reloads the state.
        if (recovered) log(`Reconnected: ${detail.replayed ?? 0} missed events replayed`);
      } else {
        showConnection('connected', 'Connected');
        if (everConnected) {
          log('Reconnected: state reloaded');
          loadSnapshot().catch(snapshotFailed);
        }
      }
      everConnected = true;
      break;
    case 'reconnecting':
      showConnection('reconnecting', 'Reconnecting', detail.attempt ? `attempt ${detail.attempt}` : '',
        detail.error?.message ?? '');
      if (detail.attempt === 1 || detail.attempt === undefined) log('Connection lost: reconnecting', 'warning');
      break;
    case 'closed':
      if (detail.error?.code === 'AUTHENTICATION_FAILED' && !starting) {
        askForKey('The gateway refused the API key.');
      } else {
        showConnection('closed', 'Disconnected', '', detail.error?.message ?? '');
      }
      break;
    default:
      showConnection('idle', 'Idle');
  }
}

function snapshotFailed(error) {
  if (isAuthFailure(error)) askForKey('The gateway refused the API key.');
  else log(`Could not load the state: ${error.message}`, 'error');
}

async function openSocket(ws) {
  await ws.connect(WS_URL);
  await ws.subscribe(['all']);
  const health = await ws.command('get_health').catch(() => null);
  applyHealth(health && typeof health === 'object' && 'result' in health ? health.result : health);
}

async function stopSocket() {
  const old = socket;
  socket = null;
  if (old) await old.disconnect().catch(() => {});
}

async function start() {
  clearTimeout(startRetry);
  await stopSocket();
  const key = storedKey();
  $('key-button').hidden = !key;
  const ws = new SigmaxWebSocket({
    apiKey: key || undefined, autoReconnect: true, maxReconnectDelayMs: 5000, requestTimeoutMs: 10000,
  });
  socket = ws;
  ws.onStateChange((state, detail) => {
    if (ws === socket) onState(state, detail ?? {});
  });
  for (const [type, handle] of Object.entries(HANDLERS)) {
    ws.on(type, (event) => {
      if (ws !== socket) return;
      handle(event);
      if (isNumber(event.seq)) $('seq').textContent = `seq ${event.seq}`;
    });
  }
  starting = true;
  const [opened, loaded] = await Promise.allSettled([openSocket(ws), loadSnapshot()]);
  starting = false;
  if (ws !== socket) return;
  const failures = [opened, loaded].filter((r) => r.status === 'rejected').map((r) => r.reason);
  if (failures.some(isAuthFailure)) {
    await stopSocket();
    if (key) sessionStorage.removeItem(KEY_STORAGE);
    askForKey(key ? 'The gateway refused this API key.' : '');
    return;
  }
  if (opened.status === 'rejected') {
    // The first connection failed (the gateway is not up): start over, with backoff.
    await stopSocket();
    startAttempt += 1;
    const delay = Math.min(1000 * 2 ** (startAttempt - 1), 10000);
    showConnection('reconnecting', 'Reconnecting', `attempt ${startAttempt}`, text(opened.reason?.message));
    startRetry = setTimeout(start, delay);
    return;
  }
  startAttempt = 0;
  if (loaded.status === 'rejected') snapshotFailed(loaded.reason);
}

// -- the API key ---------------------------------------------------------------------------

function askForKey(message) {
  stopSocket();
  showConnection('auth', 'API key needed');
  $('key-error').textContent = message || '';
  const dialog = $('key-dialog');
  if (!dialog.open) dialog.showModal();
  $('key-input').value = '';
  $('key-input').focus();
}

$('key-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const key = $('key-input').value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $('key-dialog').close();
  start();
});
// Without a key there is nothing to show: the dialog stays until one is given.
$('key-dialog').addEventListener('cancel', (event) => event.preventDefault());
$('key-button').addEventListener('click', () => {
  sessionStorage.removeItem(KEY_STORAGE);
  start();
});

start();
