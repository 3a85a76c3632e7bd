// End to end: the gateway's /dashboard in headless Chromium, against real gateway processes
// (`python -m hypercorn --config file:hypercorn_config.py wsgi:app`, as deployed).
//
//   npm ci && node --test          (tests/test_browser.py runs this from pytest)
//
// Environment: SIGMAX_PYTHON (default .venv/bin/python of the repository), SIGMAX_CHROMIUM
// (default /usr/bin/chromium), SIGMAX_TEST_REDIS_URL (default redis://127.0.0.1:6379/0),
// SIGMAX_REQUIRE_SERVICES=1 (fail instead of skip without Redis), SIGMAX_UPDATE_SCREENSHOT=1
// (also write docs/dashboard.png, the README's screenshot).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

const HERE = dirname(fileURLToPath(import.meta.url));
const REPOSITORY = resolve(HERE, '..', '..');
const PYTHON = resolve(REPOSITORY, process.env.SIGMAX_PYTHON || '.venv/bin/python');
const CHROMIUM = process.env.SIGMAX_CHROMIUM || '/usr/bin/chromium';
const REDIS_URL = process.env.SIGMAX_TEST_REDIS_URL || 'redis://127.0.0.1:6379/0';
const REQUIRE_SERVICES = process.env.SIGMAX_REQUIRE_SERVICES === '1';
const ARTIFACTS = join(HERE, 'artifacts');
const DOCS_SCREENSHOT = join(REPOSITORY, 'docs', 'dashboard.png');
const VIEWPORT = { width: 1366, height: 768 };

// A fast simulated market: a price every 0.5 s, analyses every second, proposals from weak
// signals, the portfolio every second; a dead leader's lease runs out in 2 s.
const SIMULATION = {
  SIMULATION: 'true',
  MARKET_INTERVAL: '0.5',
  ANALYSIS_INTERVAL: '1',
  PORTFOLIO_INTERVAL: '1',
  STATUS_INTERVAL: '2',
  HEALTH_INTERVAL: '2',
  PROPOSAL_CONFIDENCE: '0.05',
  LEADER_TTL: '2',
};

let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--headless=new'],
    timeout: 30_000,
  });
});

after(async () => {
  await browser?.close();
});

// -- helpers -----------------------------------------------------------------------------

async function freePort() {
  const server = createServer();
  await new Promise((done) => server.listen(0, '127.0.0.1', done));
  const { port } = server.address();
  await new Promise((done) => server.close(done));
  return port;
}

async function waitFor(check, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      if (await check()) return;
    } catch (error) {
      last = error;
    }
    await new Promise((done) => setTimeout(done, 100));
  }
  throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

function reachable(url, timeoutMs = 2000) {
  const { hostname, port } = new URL(url);
  return new Promise((done) => {
    const socket = connect({ host: hostname, port: Number(port || 6379) });
    const finish = (ok) => {
      socket.destroy();
      done(ok);
    };
    socket.setTimeout(timeoutMs, () => finish(false));
    socket.once('connect', () => finish(true));
    socket.once('error', () => finish(false));
  });
}

/** A gateway process on its own SQLite file; start, SIGKILL and start again on the same port. */
class Gateway {
  constructor(settings) {
    this.folder = mkdtempSync(join(tmpdir(), 'sigmax-e2e-'));
    // Only what the gateway needs from this environment: no stray setting (API_KEYS, WORKERS...).
    this.env = {
      PATH: process.env.PATH,
      HOME: process.env.HOME ?? this.folder,
      LANG: 'C.UTF-8',
      HOST: '127.0.0.1',
      LOG_LEVEL: 'WARNING',
      DATABASE_URL: `sqlite:///${this.folder}/g.db`,
      ...settings,
    };
    this.output = [];
    this.process = null;
  }

  get url() {
    return `http://127.0.0.1:${this.env.PORT}`;
  }

  log() {
    return this.output.join('').split('\n').slice(-30).join('\n');
  }

  async start() {
    if (!this.migrated) {
      const done = spawnSync(PYTHON, ['-m', 'app', 'migrate'], {
        cwd: REPOSITORY, env: this.env, encoding: 'utf8', timeout: 60_000,
      });
      assert.equal(done.status, 0, `migrate failed: ${done.error ?? ''}${done.stderr}`);
      this.migrated = true;
    }
    const child = spawn(PYTHON, ['-m', 'hypercorn', '--config', 'file:hypercorn_config.py', 'wsgi:app'], {
      cwd: REPOSITORY, env: this.env, detached: true, stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.process = child;
    this.exited = new Promise((done) => child.once('exit', done));
    for (const stream of [child.stdout, child.stderr]) {
      stream.setEncoding('utf8');
      stream.on('data', (chunk) => {
        this.output.push(chunk);
        if (this.output.length > 500) this.output.shift();
      });
    }
    await waitFor(async () => {
      if (child.exitCode !== null) throw new Error(`the gateway exited (${child.exitCode}):\n${this.log()}`);
      const response = await fetch(`${this.url}/api/health`, { signal: AbortSignal.timeout(2000) });
      return response.ok;
    }, 30_000, `the gateway on ${this.url} to be healthy`);
  }

  async kill() {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    try {
      process.kill(-child.pid, 'SIGKILL'); // its whole process group: Hypercorn and workers
    } catch {
      // already gone
    }
    await Promise.race([this.exited, new Promise((done) => setTimeout(done, 10_000))]);
  }

  async request(method, path, body) {
    const headers = { 'Content-Type': 'application/json' };
    if (this.apiKey) headers['X-API-Key'] = this.apiKey;
    const response = await fetch(`${this.url}${path}`, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10_000),
    });
    const payload = await response.json();
    assert.ok(response.ok, `${method} ${path}: ${response.status} ${JSON.stringify(payload)}`);
    return payload;
  }

  async close() {
    await this.kill();
    if (this.env.REDIS_PREFIX) {
      // The test's keys only: the stream, the counter and the lease under its own prefix.
      spawnSync(PYTHON, ['-c', [
        'import sys, redis',
        'client = redis.Redis.from_url(sys.argv[1], socket_connect_timeout=3)',
        'keys = list(client.scan_iter(sys.argv[2] + ":*"))',
        'client.delete(*keys) if keys else None',
      ].join('\n'), this.env.REDIS_URL, this.env.REDIS_PREFIX], { timeout: 20_000 });
    }
    rmSync(this.folder, { recursive: true, force: true });
  }
}

/** Uncaught errors and Content-Security-Policy violations of the page. */
function watchProblems(page) {
  const problems = [];
  page.on('pageerror', (error) => problems.push(`uncaught: ${error.message}`));
  page.on('console', (message) => {
    if (/Content[- ]Security[- ]Policy|Refused to (load|execute|apply|connect)/i.test(message.text())) {
      problems.push(`CSP: ${message.text()}`);
    }
  });
  return problems;
}

async function textOf(page, selector) {
  return (await page.textContent(selector, { timeout: 5000 }))?.trim() ?? '';
}

async function textChanges(page, selector, from, timeoutMs, what) {
  try {
    await page.waitForFunction(([sel, old]) => {
      const node = document.querySelector(sel);
      return node !== null && node.textContent.trim() !== old;
    }, [selector, from], { timeout: timeoutMs, polling: 100 });
  } catch (error) {
    throw new Error(`${what} did not change from ${JSON.stringify(from)} within ${timeoutMs / 1000} s`,
      { cause: error });
  }
}

async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, name);
  await page.screenshot({ path, timeout: 10_000 });
  return path;
}

/** A failed scenario's error, with the page's screenshot (`name` in artifacts/) and the
 * gateway's log. */
async function withEvidence(error, page, gateway, name) {
  await screenshot(page, name).catch(() => {});
  error.message += `\n-- gateway log --\n${gateway.log()}`;
  return error;
}

const badge = (state) => `#connection[data-state="${state}"]`;
const BTC_PRICE = '#market tr[data-symbol="BTC/USDT"] .price';
// The system area's facts about the trading engine and the market feed (from system_status).
const ENGINE_FACT = '#status-facts [data-fact="engine"] dd';
const FEED_FACT = '#status-facts [data-fact="feed"] dd';

// -- scenarios ---------------------------------------------------------------------------

/** A running gateway with the fast simulation and `env`, and a fresh page watched for errors;
 * both are closed when test `t` ends. */
async function gatewayAndPage(t, env) {
  const gateway = new Gateway({ ...SIMULATION, PORT: String(await freePort()), ...env });
  t.after(() => gateway.close());
  await gateway.start();
  const context = await browser.newContext({ viewport: VIEWPORT, deviceScaleFactor: 1 });
  t.after(() => context.close());
  const page = await context.newPage();
  return { gateway, page, problems: watchProblems(page) };
}

test('live dashboard: prices, approval, execution, portfolio; kill, restart, resume', async (t) => {
  if (!(await reachable(REDIS_URL))) {
    const reason = `Redis is not reachable at ${REDIS_URL}`;
    if (REQUIRE_SERVICES) assert.fail(`${reason}, and SIGMAX_REQUIRE_SERVICES=1 requires it`);
    t.skip(reason);
    return;
  }
  const { gateway, page, problems } = await gatewayAndPage(t, {
    REDIS_URL, REDIS_PREFIX: `sigmax-e2e-${randomUUID().slice(0, 8)}`,
  });
  try {
    await page.goto(`${gateway.url}/dashboard`, { timeout: 15_000 });
    await page.waitForSelector(badge('connected'), { timeout: 15_000 });
    assert.equal(await textOf(page, '#connection-label'), 'Connected');

    // The system area: the built-in paper engine (nothing to reach) and the simulated market.
    await page.waitForSelector(`${ENGINE_FACT}[data-mode="paper"]`, { timeout: 10_000 });
    assert.equal(await textOf(page, ENGINE_FACT), 'paper');
    await page.waitForSelector(`${FEED_FACT}[data-source="simulated"]`, { timeout: 10_000 });
    assert.equal(await textOf(page, FEED_FACT), 'simulated · live');
    assert.equal(await page.getAttribute('#system-pill', 'data-status'), 'running');

    // Prices arrive and move.
    await page.waitForSelector(BTC_PRICE, { timeout: 10_000 });
    await textChanges(page, BTC_PRICE, await textOf(page, BTC_PRICE), 10_000, 'the BTC/USDT price');
    await page.waitForSelector('#analysis li', { timeout: 10_000 });

    // A proposal appears live; approving it with its button executes it.
    const proposal = await gateway.request('POST', '/api/proposals', {
      symbol: 'ETH/USDT', action: 'buy', reason: 'Manual proposal from the browser test',
    });
    const row = `#proposals li[data-proposal-id="${proposal.proposal_id}"]`;
    await page.waitForSelector(`${row}[data-status="pending"]`, { timeout: 10_000 });
    const cash = await textOf(page, '#cash');
    await page.click(`${row} button[data-action="approve"]`, { timeout: 5000 });
    await page.waitForSelector(`#trades tr[data-proposal-id="${proposal.proposal_id}"]`, { timeout: 10_000 });
    await page.waitForSelector(`${row}[data-status="executed"]`, { timeout: 5000 });
    await page.waitForSelector('#positions tr[data-symbol="ETH/USDT"]', { timeout: 10_000 });
    await textChanges(page, '#cash', cash, 10_000, 'the available cash');
    const trades = await gateway.request('GET', '/api/trades?limit=5');
    assert.ok(trades.items.some((trade) => trade.proposal_id === proposal.proposal_id),
      'the approval executed a trade');

    if (process.env.SIGMAX_UPDATE_SCREENSHOT === '1') {
      // The README's picture: wait for the agent's own proposals (bounded; optional).
      await page.waitForSelector('#proposals li[data-status="pending"]', { timeout: 30_000 }).catch(() => {});
      await page.waitForTimeout(1500);
      mkdirSync(dirname(DOCS_SCREENSHOT), { recursive: true });
      copyFileSync(await screenshot(page, 'dashboard-live.png'), DOCS_SCREENSHOT);
    }

    // The original SIGMAX engine's events, in its own shapes, are shown without an error.
    await gateway.request('POST', '/api/events', { events: [
      { type: 'alert', data: { severity: 'critical', message: 'Original engine alert', action_required: true } },
      { type: 'warning', data: { severity: 'medium', message: 'Original engine warning' } },
      { type: 'status_change', data: { previous_status: 'running', current_status: 'running', reason: 'Original engine status' } },
      { type: 'trade_executed', data: { proposal_id: 'prop_original', symbol: 'BTC/USDT', action: 'buy',
        size: 0.001, filled_price: 95000.0, order_id: 'order_original', status: 'filled' } },
    ] });
    for (const message of ['Original engine alert', 'Original engine warning', 'Original engine status']) {
      await page.waitForSelector(`#log li:has-text("${message}")`, { timeout: 10_000 });
    }
    assert.equal(await page.getAttribute('#log li:has-text("Original engine alert")', 'data-level'), 'critical');
    const originalTrade = '#trades tr[data-order-id="order_original"]';
    await page.waitForSelector(originalTrade, { timeout: 10_000 });
    assert.equal(await textOf(page, `${originalTrade} td:last-child`), '—', 'a trade without a fee');
    // A position without entry_price (the next simulated snapshot replaces it: caught at once).
    const positionShown = page.waitForSelector('#positions tr[data-symbol="XRP/USDT"]', { timeout: 10_000 });
    await gateway.request('POST', '/api/events', { events: [{ type: 'portfolio_update', data: {
      total_value: 100000.0, available_cash: 50000.0, total_pnl: 0, total_pnl_percent: 0,
      positions: [{ symbol: 'XRP/USDT', size: 10, value: 6.0 }] } }] });
    await positionShown;
    assert.deepEqual(problems, []);

    // Rejecting with its button closes a proposal without a trade.
    const unwanted = await gateway.request('POST', '/api/proposals', {
      symbol: 'SOL/USDT', action: 'buy', reason: 'Manual proposal to reject',
    });
    const unwantedRow = `#proposals li[data-proposal-id="${unwanted.proposal_id}"]`;
    await page.click(`${unwantedRow}[data-status="pending"] button[data-action="reject"]`, { timeout: 10_000 });
    await page.waitForSelector(`${unwantedRow}[data-status="rejected"]`, { timeout: 5000 });
    assert.equal((await gateway.request('GET', `/api/proposals/${unwanted.proposal_id}`)).status, 'rejected');
    await page.waitForSelector(unwantedRow, { state: 'detached', timeout: 10_000 });

    // The gateway dies (SIGKILL) and comes back on the same port: the page reconnects and
    // resumes from the last seq it saw (the stream is in Redis), and prices move again.
    await page.evaluate(() => {
      const node = document.getElementById('connection');
      window.badgeStates = [node.dataset.state];
      new MutationObserver(() => window.badgeStates.push(node.dataset.state))
        .observe(node, { attributes: true, attributeFilter: ['data-state'] });
    });
    await gateway.kill();
    await page.waitForSelector(badge('reconnecting'), { timeout: 15_000 });
    assert.match(await textOf(page, '#connection-detail'), /^attempt \d+$/);
    const stalled = await textOf(page, BTC_PRICE);
    await gateway.start();
    await page.waitForSelector(badge('resumed'), { timeout: 30_000 });
    assert.match(await textOf(page, '#connection-detail'), /^recovered · \d+ replayed$/);
    const states = await page.evaluate(() => window.badgeStates);
    assert.ok(states.indexOf('reconnecting') > 0 && states.indexOf('reconnecting') < states.indexOf('resumed'),
      `badge went ${states.join(' -> ')}`);
    await textChanges(page, BTC_PRICE, stalled, 20_000, 'the BTC/USDT price after the restart');
    await page.waitForTimeout(500);
    await screenshot(page, 'dashboard.png');
    assert.deepEqual(problems, []);
  } catch (error) {
    throw await withEvidence(error, page, gateway, 'dashboard-failure.png');
  }
});

test('with API keys: the page asks for one, refuses a wrong one, then shows the data', async (t) => {
  const key = `e2e-${randomUUID()}`;
  const { gateway, page, problems } = await gatewayAndPage(t, { API_KEYS: key });
  try {
    await page.goto(`${gateway.url}/dashboard`, { timeout: 15_000 });
    await page.waitForSelector('#key-dialog[open]', { timeout: 10_000 });
    await page.waitForSelector(badge('auth'), { timeout: 5000 });

    await page.fill('#key-input', 'not-the-key', { timeout: 5000 });
    await page.click('#key-submit', { timeout: 5000 });
    await page.waitForFunction(() => document.getElementById('key-dialog').open
      && document.getElementById('key-error').textContent.includes('refused'), null, { timeout: 10_000 });
    assert.equal(await page.evaluate(() => sessionStorage.getItem('sigmax.apiKey')), null,
      'a refused key is not kept');

    await page.fill('#key-input', key, { timeout: 5000 });
    await page.click('#key-submit', { timeout: 5000 });
    await page.waitForSelector(badge('connected'), { timeout: 15_000 });
    assert.equal(await page.evaluate(() => document.getElementById('key-dialog').open), false);
    await page.waitForFunction((selector) => /\d/.test(document.querySelector(selector)?.textContent ?? ''),
      BTC_PRICE, { timeout: 10_000 });
    await page.waitForFunction(() => /\d/.test(document.getElementById('total-value').textContent),
      null, { timeout: 10_000 });
    assert.equal(await page.evaluate(() => sessionStorage.getItem('sigmax.apiKey')), key);

    // The key stays for the tab: a reload connects without asking.
    await page.reload({ timeout: 15_000 });
    await page.waitForSelector(badge('connected'), { timeout: 15_000 });
    assert.equal(await page.evaluate(() => document.getElementById('key-dialog').open), false);
    await screenshot(page, 'dashboard-api-key.png');
    assert.deepEqual(problems, []);
  } catch (error) {
    throw await withEvidence(error, page, gateway, 'dashboard-api-key-failure.png');
  }
});

test('a remote engine that does not answer: remote · unreachable, the status degraded', async (t) => {
  // ENGINE_URL at a loopback port that nothing listens on.
  const { gateway, page, problems } = await gatewayAndPage(t, {
    ENGINE_URL: `http://127.0.0.1:${await freePort()}`, ENGINE_TIMEOUT: '1',
  });
  try {
    await page.goto(`${gateway.url}/dashboard`, { timeout: 15_000 });
    await page.waitForSelector(badge('connected'), { timeout: 15_000 });
    await page.waitForSelector(`${ENGINE_FACT}[data-mode="remote"][data-reachable="false"]`, { timeout: 20_000 });
    assert.equal(await textOf(page, ENGINE_FACT), 'remote · unreachable');
    await page.waitForSelector('#system-pill[data-status="degraded"]', { timeout: 10_000 });
    assert.match(await page.getAttribute('#system-pill', 'title'), /remote engine is unreachable/);
    // The market is the gateway's own: it goes on.
    await page.waitForSelector(`${FEED_FACT}[data-source="simulated"]`, { timeout: 10_000 });
    await page.waitForSelector(BTC_PRICE, { timeout: 10_000 });
    await textChanges(page, BTC_PRICE, await textOf(page, BTC_PRICE), 10_000, 'the BTC/USDT price');
    await screenshot(page, 'dashboard-remote-unreachable.png');
    assert.deepEqual(problems, []);
  } catch (error) {
    throw await withEvidence(error, page, gateway, 'dashboard-remote-unreachable-failure.png');
  }
});
