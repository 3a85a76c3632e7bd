// The real gateway for the tests: `python -m app migrate`, then Hypercorn as a subprocess in a
// process group of its own on a free loopback port, killed, paused or restarted by its group
// id. Also the client under test, built fresh from src/, and bounded waiting.

import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { bundle, PACKAGE_DIR } from '../../scripts/build.mjs';
import { gatewayPython, REPOSITORY_DIR } from '../../scripts/generate-events.mjs';

export { PACKAGE_DIR, REPOSITORY_DIR, gatewayPython };

const HOST = '127.0.0.1';
const START_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 10_000;
const OUTPUT_LIMIT = 20_000;

export const REDIS_URL = process.env.SIGMAX_TEST_REDIS_URL || 'redis://127.0.0.1:6379/0';
export const REQUIRE_SERVICES = process.env.SIGMAX_REQUIRE_SERVICES === '1';

const scratch = mkdtempSync(join(tmpdir(), 'sigmax-ts-client-'));
const running = new Set();
// A test process that dies must not leave gateways behind.
process.on('exit', () => {
  for (const gateway of running) gateway.signal('SIGKILL');
  rmSync(scratch, { recursive: true, force: true });
});

let clientModule;

/** The client as `npm run build` bundles it from the current src/. */
export async function loadClient() {
  if (clientModule === undefined) {
    const path = join(scratch, 'sigmax.js');
    writeFileSync(path, await bundle());
    clientModule = await import(pathToFileURL(path).href);
  }
  return clientModule;
}

/** The path of the bundle that loadClient() imported (for child processes). */
export async function clientPath() {
  await loadClient();
  return join(scratch, 'sigmax.js');
}

export function scratchPath(name) {
  return join(scratch, name);
}

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, HOST, () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

export const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

/** Poll `check` until it returns a truthy value, at most `timeoutMs`. */
export async function waitFor(check, { timeoutMs = 10_000, intervalMs = 20, what = 'the condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/** A fresh SQLite database, migrated. */
export function migratedDatabase(name = 'gateway') {
  const databaseUrl = `sqlite:///${join(scratch, `${name}-${Date.now()}-${Math.random().toString(36).slice(2)}.db`)}`;
  execFileSync(gatewayPython(), ['-m', 'app', 'migrate'], {
    cwd: REPOSITORY_DIR,
    env: { ...process.env, DATABASE_URL: databaseUrl },
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: 60_000,
  });
  return databaseUrl;
}

/** Delete archived events of a SQLite database, as the archive's retention (or a killed gateway
 * that had not written them yet) leaves it. */
export function forgetArchived(databaseUrl) {
  const script = 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); '
    + 'c.execute("DELETE FROM events"); c.commit()';
  execFileSync(gatewayPython(), ['-c', script, databaseUrl.slice('sqlite:///'.length)], {
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: 30_000,
  });
}

export class Gateway {
  /** Start a gateway (SIMULATION off: the tests publish every event) and wait until it is ready. */
  static async start({ env = {}, port, databaseUrl } = {}) {
    const gateway = new Gateway(port ?? await freePort(), databaseUrl ?? migratedDatabase(), env);
    await gateway.run();
    return gateway;
  }

  constructor(port, databaseUrl, env) {
    this.port = port;
    this.databaseUrl = databaseUrl;
    this.env = env;
    this.process = null;
    this.output = '';
  }

  get url() {
    return `ws://${HOST}:${this.port}/api/ws`;
  }

  get httpUrl() {
    return `http://${HOST}:${this.port}`;
  }

  async run() {
    const child = spawn(gatewayPython(), ['-m', 'hypercorn', '--config', 'file:hypercorn_config.py', 'wsgi:app'], {
      cwd: REPOSITORY_DIR,
      detached: true, // its own process group: the workers die with it
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        ...process.env,
        HOST,
        PORT: String(this.port),
        WORKERS: '1',
        SIMULATION: 'false',
        DATABASE_URL: this.databaseUrl,
        REDIS_URL: '',
        API_KEYS: '',
        LOG_LEVEL: 'WARNING',
        ...this.env,
      },
    });
    const keep = (chunk) => { this.output = (this.output + chunk).slice(-OUTPUT_LIMIT); };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    child.exited = new Promise((done) => child.once('exit', done));
    this.process = child;
    running.add(this);
    let exited = false;
    child.exited.then(() => { exited = true; running.delete(this); });
    await waitFor(async () => {
      if (exited) throw new Error(`the gateway exited at start:\n${this.output}`);
      try {
        const response = await fetch(`${this.httpUrl}/api/health`);
        await response.body?.cancel();
        return response.status === 200;
      } catch {
        return false;
      }
    }, { timeoutMs: START_TIMEOUT_MS, intervalMs: 100, what: `the gateway on port ${this.port}` });
  }

  /** Send `signal` to the gateway's whole process group. */
  signal(signal) {
    if (this.process === null || this.process.exitCode !== null || this.process.signalCode !== null) return;
    try {
      process.kill(-this.process.pid, signal);
    } catch {
      // already gone
    }
  }

  /** SIGKILL: no goodbye to the clients, as when a host dies. */
  async kill() {
    const child = this.process;
    if (child === null) return;
    this.signal('SIGCONT');
    this.signal('SIGKILL');
    await child.exited;
    this.process = null;
  }

  async stop() {
    const child = this.process;
    if (child === null) return;
    this.signal('SIGCONT');
    this.signal('SIGTERM');
    const timer = setTimeout(() => this.signal('SIGKILL'), STOP_TIMEOUT_MS);
    await child.exited;
    clearTimeout(timer);
    this.signal('SIGKILL'); // any worker left in the group
    this.process = null;
  }

  /** Restart on the same port with the same database (and settings, unless `env` changes them). */
  async restart(env = {}) {
    await this.kill();
    this.env = { ...this.env, ...env };
    await this.run();
  }

  pause() {
    this.signal('SIGSTOP');
  }

  resume() {
    this.signal('SIGCONT');
  }

  /** POST /api/events; resolves with `{accepted, first_seq, last_seq}`. */
  async publish(events, apiKey) {
    const headers = { 'Content-Type': 'application/json' };
    if (apiKey) headers['X-API-Key'] = apiKey;
    const response = await fetch(`${this.httpUrl}/api/events`, {
      method: 'POST', headers, body: JSON.stringify({ events }),
    });
    const body = await response.json();
    if (response.status !== 202) throw new Error(`POST /api/events: ${response.status} ${JSON.stringify(body)}`);
    return body;
  }
}

/** `count` alert events, numbered from `from` in their data. */
export function alerts(count, from = 0, symbol) {
  return Array.from({ length: count }, (_, index) => ({
    type: 'alert',
    ...(symbol ? { symbol } : {}),
    data: { level: 'info', message: `alert ${from + index}`, number: from + index },
  }));
}

/** The seqs of published batches, in order. */
export function seqsOf(results) {
  const seqs = [];
  for (const { first_seq: first, last_seq: last } of results) {
    for (let seq = first; seq <= last; seq += 1) seqs.push(seq);
  }
  return seqs;
}

/** Whether Redis answers PING at REDIS_URL, within a second. */
export function redisReachable() {
  const url = new URL(REDIS_URL);
  return new Promise((done) => {
    const socket = createConnection({ host: url.hostname, port: Number(url.port || 6379) });
    const finish = (ok) => { clearTimeout(timer); socket.destroy(); done(ok); };
    const timer = setTimeout(() => finish(false), 1_000);
    socket.once('error', () => finish(false));
    socket.once('connect', () => socket.write('PING\r\n'));
    socket.once('data', (data) => finish(String(data).startsWith('+PONG')));
  });
}

/** Delete the Redis keys under `prefix` (the test's own deployment). */
export function deleteRedisKeys(prefix) {
  const script = 'import sys, redis; r = redis.Redis.from_url(sys.argv[1]); '
    + 'keys = list(r.scan_iter(match=sys.argv[2] + ":*", count=1000)); keys and r.delete(*keys)';
  execFileSync(gatewayPython(), ['-c', script, REDIS_URL, prefix], {
    cwd: REPOSITORY_DIR, stdio: ['ignore', 'pipe', 'pipe'], timeout: 30_000,
  });
}

/** Record every state change of `client` as `[state, detail]`. */
export function recordStates(client) {
  const states = [];
  client.onStateChange((state, detail) => states.push([state, detail]));
  return states;
}

/** Skip (or fail, with SIGMAX_REQUIRE_SERVICES=1) a test that needs a service that is missing. */
export function skipWithout(t, available, reason) {
  if (available) return false;
  if (REQUIRE_SERVICES) throw new Error(`${reason} (SIGMAX_REQUIRE_SERVICES=1)`);
  t.skip(reason);
  return true;
}

