// SIGMAX WebSocket API client, built from client/typescript by `npm run build`. Do not edit.

// src/errors.ts
var SigmaxError = class extends Error {
  code;
  details;
  constructor(message, code, details) {
    super(message);
    this.name = "SigmaxError";
    this.code = code;
    if (details !== void 0) this.details = details;
  }
};
var ClientErrorCode = {
  /** No WebSocket: not a browser, and Node without `--experimental-websocket` nor `WebSocketImpl`. */
  NO_WEBSOCKET: "NO_WEBSOCKET",
  /** The URL is not a WebSocket URL. */
  INVALID_URL: "INVALID_URL",
  /** The gateway cannot be reached, closed at once, or is not a SIGMAX gateway. */
  CONNECTION_FAILED: "CONNECTION_FAILED",
  /** No `connected` greeting within `connectTimeoutMs`. */
  CONNECT_TIMEOUT: "CONNECT_TIMEOUT",
  /** The connection was lost before the reply (a command is not sent again), or for good. */
  CONNECTION_LOST: "CONNECTION_LOST",
  /** A request before `connect()`, or after the client closed. */
  NOT_CONNECTED: "NOT_CONNECTED",
  /** `connect()` while connected; `disconnect()` first. */
  ALREADY_CONNECTED: "ALREADY_CONNECTED",
  /** `disconnect()` was called while the request or the connection was under way. */
  DISCONNECTED: "DISCONNECTED",
  /** No reply within `requestTimeoutMs`. */
  REQUEST_TIMEOUT: "REQUEST_TIMEOUT",
  /** A `command_result` that says `success: false`. */
  COMMAND_FAILED: "COMMAND_FAILED"
};

// src/client.ts
var DEFAULT_URL = "ws://localhost:8000/api/ws";
var REPLY_TYPES = /* @__PURE__ */ new Set([
  "connected",
  "subscribed",
  "unsubscribed",
  "subscriptions",
  "command_result",
  "pong"
]);
var DIRECT_REPLY_TYPES = /* @__PURE__ */ new Set([
  "error",
  "system_status",
  "portfolio_update",
  "health_update"
]);
var STABLE_AFTER_MS = 1e4;
var CLOSE_TIMEOUT_MS = 2e3;
var DEFAULT_HEARTBEAT_INTERVAL_S = 30;
var NORMAL_CLOSURE = 1e3;
function backoffDelay(attempt, baseMs, capMs, random = Math.random) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 32));
  return ceiling / 2 + random() * ceiling / 2;
}
var ReplayInbox = class {
  constructor(socket) {
    this.socket = socket;
  }
  socket;
  messages = [];
  wake = null;
  push(message) {
    this.messages.push(message);
    this.wake?.();
    this.wake = null;
  }
  async next() {
    while (this.messages.length === 0) {
      await new Promise((resolve) => {
        this.wake = resolve;
      });
    }
    return this.messages.shift();
  }
};
var SigmaxWebSocket = class {
  autoReconnect;
  maxReconnectDelayMs;
  reconnectDelayMs;
  requestTimeoutMs;
  connectTimeoutMs;
  silenceTimeoutMs;
  apiKey;
  apiKeyIn;
  WebSocketImpl;
  currentState = "idle";
  gatewayUrl = "";
  /** The connection requests go to; set as soon as its greeting arrives. */
  socket = null;
  /** A connection being opened, not yet greeted: `disconnect()` must close it too. */
  opening = null;
  closing = false;
  session = 0;
  handlers = /* @__PURE__ */ new Map();
  stateHandlers = /* @__PURE__ */ new Set();
  pending = /* @__PURE__ */ new Map();
  replays = /* @__PURE__ */ new Map();
  waiters = /* @__PURE__ */ new Set();
  requestCounter = 0;
  subscribedTopics = [];
  subscribedSymbols = [];
  lastSeqSeen = null;
  /** Where to resume before any event was seen: the gateway's head when the subscription began. */
  resumeFrom = null;
  /** The stream that lastSeqSeen / resumeFrom count in: a seq means nothing in another one. */
  positionStream = null;
  serverHead = null;
  serverStream = null;
  serverConnectionId = null;
  heartbeatIntervalS = DEFAULT_HEARTBEAT_INTERVAL_S;
  greetingStatusDue = false;
  lastReceivedAt = 0;
  connectedAt = 0;
  watchdog = null;
  reconnectTimer = null;
  wakeReconnect = null;
  backoffAttempt = 0;
  reconnectCount = 0;
  droppedDuplicates = 0;
  constructor(options = {}) {
    this.apiKey = options.apiKey;
    this.apiKeyIn = options.apiKeyIn ?? ("document" in globalThis ? "query" : "header");
    this.autoReconnect = options.autoReconnect ?? true;
    this.maxReconnectDelayMs = positive("maxReconnectDelayMs", options.maxReconnectDelayMs ?? 3e4);
    this.reconnectDelayMs = positive("reconnectDelayMs", options.reconnectDelayMs ?? 500);
    this.requestTimeoutMs = positive("requestTimeoutMs", options.requestTimeoutMs ?? 1e4);
    this.connectTimeoutMs = positive("connectTimeoutMs", options.connectTimeoutMs ?? 1e4);
    this.silenceTimeoutMs = options.silenceTimeoutMs === void 0 ? void 0 : positive("silenceTimeoutMs", options.silenceTimeoutMs);
    this.WebSocketImpl = options.WebSocketImpl;
  }
  // -- state --------------------------------------------------------------------------------
  get state() {
    return this.currentState;
  }
  /** The seq of the last stream event received: where a reconnect resumes. */
  get lastSeq() {
    return this.lastSeqSeen;
  }
  /** The gateway's stream, from the `connected` greeting of the current connection. */
  get streamId() {
    return this.serverStream;
  }
  /** This connection's id at the gateway. */
  get connectionId() {
    return this.serverConnectionId;
  }
  get url() {
    return this.gatewayUrl;
  }
  /** What the client holds and restores on reconnect, as the gateway confirmed it. */
  get topics() {
    return [...this.subscribedTopics];
  }
  get symbols() {
    return [...this.subscribedSymbols];
  }
  /** Successful reconnects since `connect()`. */
  get reconnects() {
    return this.reconnectCount;
  }
  /** Events dropped because their seq had been seen already. */
  get duplicatesDropped() {
    return this.droppedDuplicates;
  }
  // -- public API ---------------------------------------------------------------------------
  /**
   * Connect; resolves after the gateway's `connected` greeting. Rejects with a SigmaxError
   * (`AUTHENTICATION_FAILED`, `MAX_CONNECTIONS_EXCEEDED`, `CONNECTION_FAILED`, ...) and does
   * not retry: reconnecting is for connections that were up.
   */
  async connect(url = DEFAULT_URL) {
    if (this.currentState === "connecting" || this.currentState === "connected" || this.currentState === "reconnecting") {
      throw new SigmaxError(
        `already connected to ${this.gatewayUrl}; disconnect() first`,
        ClientErrorCode.ALREADY_CONNECTED
      );
    }
    this.session += 1;
    this.closing = false;
    this.gatewayUrl = url;
    this.subscribedTopics = [];
    this.subscribedSymbols = [];
    this.lastSeqSeen = this.resumeFrom = this.positionStream = null;
    this.backoffAttempt = this.reconnectCount = this.droppedDuplicates = 0;
    this.setState("connecting", {});
    try {
      const socket = await this.open();
      if (socket !== this.socket) {
        throw new SigmaxError(`connection to ${url} lost at once`, ClientErrorCode.CONNECTION_FAILED);
      }
    } catch (error) {
      const failure = asSigmaxError(error);
      if (!this.closing) this.setState("closed", { error: failure });
      throw failure;
    }
    this.markConnected({ resumed: false });
  }
  /** Close the connection: pending requests reject, no timer is left, no reconnect follows. */
  async disconnect() {
    this.closing = true;
    this.session += 1;
    this.stopWatchdog();
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.wakeReconnect?.();
    const stopped = new SigmaxError("disconnected", ClientErrorCode.DISCONNECTED);
    this.opening?.abort(stopped);
    const socket = this.socket;
    this.socket = null;
    this.failPending(stopped);
    if (this.currentState !== "closed") this.setState("closed", {});
    if (socket !== null) await closeSocket(socket);
  }
  /**
   * Subscribe to `topics` (`proposals`, `market`, ... or `all`) and `symbols` (`BTC/USDT`);
   * resolves with the gateway's `subscribed` data. Kept across reconnects. `since` also replays
   * the events after that seq (a position the application kept).
   *
   * The spec calls it without awaiting: a failure then goes unreported rather than crashing
   * Node with an unhandled rejection; await it to see the error.
   */
  subscribe(topics, symbols = [], options = {}) {
    return quiet(this.subscribeNow(topics, symbols, options.since));
  }
  /** Stop receiving `topics` and `symbols`; resolves with the `unsubscribed` data. */
  unsubscribe(topics, symbols = []) {
    return quiet(this.unsubscribeNow(topics, symbols));
  }
  /** The gateway's status: the `system_status` reply to this very request. */
  async getStatus() {
    const reply = await this.request("get_status", void 0, true);
    return reply.data;
  }
  /** What the gateway holds for this connection: `{topics, symbols, count}`. */
  async getSubscriptions() {
    const reply = await this.request("get_subscriptions", void 0, true);
    return reply.data;
  }
  /**
   * Run a gateway command (`get_portfolio`, `approve_proposal`, ...); resolves with the
   * `command_result` data `{command, success, result}` (for `get_status`, `get_portfolio` and
   * `get_health`, which the gateway answers with the event they ask for, `result` is its data). Rejects with the gateway's code
   * (`FORBIDDEN_COMMAND`, `RATE_LIMITED`, ...) or `REQUEST_TIMEOUT`. Not sent again after a lost
   * connection, since whether it ran is then unknown: rejects with `CONNECTION_LOST`.
   */
  async command(name, args = {}) {
    const reply = await this.request("command", { ...args, command: name }, false);
    if (reply.type !== "command_result") {
      return { command: name, success: true, result: reply.data };
    }
    const data = reply.data;
    if (data?.success === false) {
      throw new SigmaxError(
        `command ${name} failed: ${JSON.stringify(data.result)}`,
        ClientErrorCode.COMMAND_FAILED
      );
    }
    return data;
  }
  on(type, handler) {
    const callback = handler;
    let set = this.handlers.get(type);
    if (set === void 0) this.handlers.set(type, set = /* @__PURE__ */ new Set());
    set.add(callback);
    return () => {
      this.handlers.get(type)?.delete(callback);
    };
  }
  /** Call `handler(state, detail)` on every change of state; returns the function that removes it. */
  onStateChange(handler) {
    this.stateHandlers.add(handler);
    return () => {
      this.stateHandlers.delete(handler);
    };
  }
  /** Called with the data of every `proposal_created` event: override in a subclass. */
  onProposal(data) {
    void data;
  }
  /** Called with the data of every `trade_executed` event: override in a subclass. */
  onTrade(data) {
    void data;
  }
  // -- requests -----------------------------------------------------------------------------
  /**
   * Archived events, oldest first, with their original seq and timestamps: after `since` up
   * to `until`, of `topics` and carrying one of `symbols`, paced at `speed` times their
   * original spacing. Apart from the live subscriptions (no handler sees them); ends with the
   * replay. A replay cut by a lost connection goes on after the last event given, on the next
   * connection.
   *
   *     for await (const event of client.replay({ since: '2026-12-03T09:00:00Z', speed: 10 })) ...
   */
  async *replay(options = {}) {
    let position = options.since;
    for (; ; ) {
      const socket = await this.connectedSocket("replay", now() + this.requestTimeoutMs);
      const requestId = String(++this.requestCounter);
      const inbox = new ReplayInbox(socket);
      this.replays.set(requestId, inbox);
      try {
        const data = {
          topics: options.topics ?? [],
          symbols: options.symbols ?? [],
          speed: options.speed ?? 0
        };
        if (position !== void 0) data.since = position;
        if (options.until !== void 0) data.until = options.until;
        sendQuietly(socket, { type: "replay", request_id: requestId, data });
        for (; ; ) {
          const message = await inbox.next();
          if (message === null) break;
          if (message.type === "replay_complete") return;
          if (message.type === "error") throw errorReply("replay", message);
          const event = toEvent(message);
          if (event.seq !== null) position = event.seq;
          yield event;
        }
      } finally {
        this.replays.delete(requestId);
      }
      if (!this.autoReconnect || this.closing) {
        throw new SigmaxError("connection lost during a replay", ClientErrorCode.CONNECTION_LOST);
      }
    }
  }
  async subscribeNow(topics, symbols, since) {
    const data = { topics: [...topics], symbols: [...symbols] };
    if (since !== void 0) data.since = since;
    const reply = await this.request(
      "subscribe",
      data,
      true,
      since === void 0 ? void 0 : (message) => {
        this.checkRecovered(since, message.data);
      }
    );
    const confirmed = reply.data;
    addAll(this.subscribedTopics, confirmed.topics ?? topics);
    addAll(this.subscribedSymbols, confirmed.symbols ?? symbols);
    if (this.lastSeqSeen === null && this.resumeFrom === null) {
      this.resumeFrom = since ?? this.serverHead;
      this.positionStream = since === void 0 ? this.serverStream : null;
    }
    return confirmed;
  }
  async unsubscribeNow(topics, symbols) {
    const reply = await this.request(
      "unsubscribe",
      { topics: [...topics], symbols: [...symbols] },
      true
    );
    const confirmed = reply.data;
    removeAll(this.subscribedTopics, confirmed.topics ?? topics);
    removeAll(this.subscribedSymbols, confirmed.symbols ?? symbols);
    return confirmed;
  }
  /**
   * Send a request once connected and return its reply, within requestTimeoutMs. `retry`:
   * send it again on the next connection when this one is lost first (for requests that may
   * safely run twice).
   */
  async request(type, data, retry, onReply) {
    const deadline = now() + this.requestTimeoutMs;
    for (; ; ) {
      const socket = await this.connectedSocket(type, deadline);
      try {
        return await this.exchange(socket, type, data, deadline, onReply);
      } catch (error) {
        const retriable = error instanceof SigmaxError && error.code === ClientErrorCode.CONNECTION_LOST && retry && this.autoReconnect && !this.closing && now() < deadline;
        if (!retriable) throw error;
      }
    }
  }
  /** The open connection, waiting for a reconnect until `deadline`. */
  connectedSocket(type, deadline) {
    if (this.currentState === "connected" && this.socket !== null) {
      return Promise.resolve(this.socket);
    }
    if (this.currentState !== "connecting" && this.currentState !== "reconnecting") {
      return Promise.reject(new SigmaxError(
        this.currentState === "idle" ? `${type}: not connected, call connect() first` : `${type}: the client is closed`,
        ClientErrorCode.NOT_CONNECTED
      ));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new SigmaxError(
          `${type}: not connected to ${this.gatewayUrl} within ${this.requestTimeoutMs} ms (reconnecting)`,
          ClientErrorCode.REQUEST_TIMEOUT
        ));
      }, Math.max(0, deadline - now()));
      const waiter = {
        resolve: (socket) => {
          clearTimeout(timer);
          resolve(socket);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        }
      };
      this.waiters.add(waiter);
    });
  }
  /** Send one request on `socket`; settle with the reply that echoes its request_id. */
  exchange(socket, type, data, deadline, onReply) {
    if (socket !== this.socket) {
      return Promise.reject(this.closing ? new SigmaxError(`${type}: disconnected`, ClientErrorCode.DISCONNECTED) : new SigmaxError(`connection lost before ${type} was sent`, ClientErrorCode.CONNECTION_LOST));
    }
    const requestId = String(++this.requestCounter);
    return new Promise((resolve, reject) => {
      const finish = () => {
        clearTimeout(timer);
        this.pending.delete(requestId);
      };
      const timer = setTimeout(() => {
        finish();
        reject(new SigmaxError(
          `no reply to ${type} within ${this.requestTimeoutMs} ms`,
          ClientErrorCode.REQUEST_TIMEOUT
        ));
      }, Math.max(0, deadline - now()));
      this.pending.set(requestId, {
        socket,
        settle: (reply) => {
          finish();
          if (reply.type === "error") {
            reject(errorReply(type, reply));
            return;
          }
          try {
            onReply?.(reply);
          } catch (error) {
            reject(asSigmaxError(error));
            return;
          }
          resolve(reply);
        },
        fail: (error) => {
          finish();
          reject(error);
        }
      });
      const message = { type, request_id: requestId };
      if (data !== void 0) message.data = data;
      try {
        socket.send(JSON.stringify(message));
      } catch (error) {
        finish();
        reject(new SigmaxError(
          `connection lost before ${type} was sent: ${String(error)}`,
          ClientErrorCode.CONNECTION_LOST
        ));
      }
    });
  }
  failPending(error, socket) {
    for (const request of [...this.pending.values()]) {
      if (socket === void 0 || request.socket === socket) request.fail(error);
    }
    for (const inbox of this.replays.values()) {
      if (socket === void 0 || inbox.socket === socket) inbox.push(null);
    }
    if (socket === void 0) {
      for (const waiter of [...this.waiters]) waiter.reject(error);
      this.waiters.clear();
    }
  }
  // -- the connection -----------------------------------------------------------------------
  /** Open a connection and read its greeting; the connection becomes `this.socket`. */
  open() {
    const Impl = this.WebSocketImpl ?? globalThis.WebSocket;
    if (Impl === void 0) {
      return Promise.reject(new SigmaxError(
        "no WebSocket: pass options.WebSocketImpl, or run Node 20 with --experimental-websocket",
        ClientErrorCode.NO_WEBSOCKET
      ));
    }
    let address;
    const inHeader = this.apiKey !== void 0 && this.apiKeyIn === "header";
    try {
      const url = new URL(this.gatewayUrl);
      if (this.apiKey && !inHeader) url.searchParams.set("api_key", this.apiKey);
      address = url.toString();
    } catch (error) {
      return Promise.reject(new SigmaxError(
        `invalid gateway URL ${this.gatewayUrl}`,
        ClientErrorCode.INVALID_URL,
        String(error)
      ));
    }
    const shown = this.gatewayUrl;
    return new Promise((resolve, reject) => {
      let socket;
      try {
        socket = inHeader ? new Impl(
          address,
          { headers: { "X-API-Key": this.apiKey } }
        ) : new Impl(address);
      } catch (error) {
        reject(new SigmaxError(
          `cannot connect to ${shown}: ${String(error)}`,
          ClientErrorCode.INVALID_URL,
          String(error)
        ));
        return;
      }
      let settled = false;
      const fail = (error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.opening = null;
        detach(socket);
        void closeSocket(socket);
        reject(error);
      };
      const timer = setTimeout(() => {
        fail(new SigmaxError(
          `${shown} sent no greeting within ${this.connectTimeoutMs} ms`,
          ClientErrorCode.CONNECT_TIMEOUT
        ));
      }, this.connectTimeoutMs);
      this.opening = { socket, abort: fail };
      socket.onmessage = (event) => {
        if (settled) {
          this.receive(socket, event.data);
          return;
        }
        const message = decode(event.data);
        const data = isRecord(message?.data) ? message.data : {};
        if (message?.type === "connected") {
          settled = true;
          clearTimeout(timer);
          this.opening = null;
          this.adopt(socket, data);
          resolve(socket);
        } else if (message?.type === "error") {
          const code = typeof data.code === "string" ? data.code : ClientErrorCode.CONNECTION_FAILED;
          const details = typeof data.details === "string" ? data.details : void 0;
          fail(new SigmaxError(`${shown} refused the connection: ${String(data.error)} [${code}]` + (details ? `: ${details}` : ""), code, details));
        } else {
          fail(new SigmaxError(
            `${shown} is not a SIGMAX gateway: its first message was ` + String(event.data).slice(0, 80),
            ClientErrorCode.CONNECTION_FAILED
          ));
        }
      };
      socket.onclose = (event) => {
        if (settled) {
          this.lost(socket, closeText(event));
          return;
        }
        fail(new SigmaxError(
          `cannot connect to ${shown}: ${closeText(event)}`,
          ClientErrorCode.CONNECTION_FAILED
        ));
      };
      socket.onerror = (event) => {
        if (settled) return;
        const detail = event.message;
        fail(new SigmaxError(
          `cannot connect to ${shown}` + (detail ? `: ${String(detail)}` : ""),
          ClientErrorCode.CONNECTION_FAILED
        ));
      };
    });
  }
  adopt(socket, greeting) {
    this.socket = socket;
    this.serverConnectionId = typeof greeting.connection_id === "string" ? greeting.connection_id : null;
    this.serverHead = typeof greeting.last_seq === "number" ? greeting.last_seq : null;
    this.serverStream = typeof greeting.stream_id === "string" ? greeting.stream_id : null;
    this.heartbeatIntervalS = typeof greeting.heartbeat_interval === "number" && greeting.heartbeat_interval > 0 ? greeting.heartbeat_interval : DEFAULT_HEARTBEAT_INTERVAL_S;
    this.greetingStatusDue = true;
    this.lastReceivedAt = this.connectedAt = now();
    this.startWatchdog(socket);
  }
  markConnected(detail) {
    this.setState("connected", detail);
    const socket = this.socket;
    if (socket === null) return;
    for (const waiter of [...this.waiters]) waiter.resolve(socket);
    this.waiters.clear();
  }
  /** `socket` is gone: fail what waited on it, and reconnect unless that is off. */
  lost(socket, reason) {
    if (socket !== this.socket) return;
    this.socket = null;
    this.stopWatchdog();
    detach(socket);
    this.failPending(
      new SigmaxError(`connection lost: ${reason}`, ClientErrorCode.CONNECTION_LOST),
      socket
    );
    if (this.closing || this.currentState !== "connected") {
      return;
    }
    if (!this.autoReconnect) {
      const error = new SigmaxError(
        `connection to ${this.gatewayUrl} lost: ${reason}`,
        ClientErrorCode.CONNECTION_LOST
      );
      this.failPending(error);
      this.setState("closed", { error });
      return;
    }
    if (now() - this.connectedAt >= STABLE_AFTER_MS) this.backoffAttempt = 0;
    void this.reconnect(new SigmaxError(
      `connection to ${this.gatewayUrl} lost: ${reason}`,
      ClientErrorCode.CONNECTION_LOST
    ));
  }
  /** Drop a connection that stopped answering: do not wait for a close that may never come. */
  abandon(socket, reason) {
    this.lost(socket, reason);
    void closeSocket(socket);
  }
  async reconnect(cause) {
    const session = this.session;
    for (let attempt = 1; !this.closing && session === this.session; attempt += 1) {
      this.setState("reconnecting", { attempt, reason: cause.message, error: cause });
      await this.pause(backoffDelay(
        this.backoffAttempt,
        this.reconnectDelayMs,
        this.maxReconnectDelayMs
      ));
      if (this.closing || session !== this.session) return;
      this.backoffAttempt += 1;
      let socket = null;
      try {
        socket = await this.open();
        const detail = await this.resume(socket);
        if (socket !== this.socket) {
          throw new SigmaxError("connection lost while resuming", ClientErrorCode.CONNECTION_LOST);
        }
        this.reconnectCount += 1;
        this.markConnected(detail);
        return;
      } catch (error) {
        if (this.closing || session !== this.session) return;
        const failure = asSigmaxError(error);
        if (socket !== null) this.abandon(socket, failure.message);
        if (failure.code === "AUTHENTICATION_FAILED") {
          this.failPending(failure);
          this.setState("closed", { error: failure });
          return;
        }
        cause = failure;
      }
    }
  }
  /** Subscribe again to everything, from the last seq seen. */
  async resume(socket) {
    if (this.subscribedTopics.length === 0 && this.subscribedSymbols.length === 0) {
      return { resumed: true, recovered: true, replayed: 0 };
    }
    const since = this.lastSeqSeen ?? this.resumeFrom;
    const data = { topics: [...this.subscribedTopics], symbols: [...this.subscribedSymbols] };
    if (since !== null) {
      data.since = since;
      if (this.positionStream !== null) data.stream_id = this.positionStream;
    }
    const detail = { resumed: true, recovered: true, replayed: 0 };
    await this.exchange(socket, "subscribe", data, now() + this.requestTimeoutMs, (reply) => {
      if (since === null) return;
      const confirmed = isRecord(reply.data) ? reply.data : {};
      detail.recovered = confirmed.recovered !== false;
      detail.replayed = typeof confirmed.replayed === "number" ? confirmed.replayed : 0;
      this.checkRecovered(since, reply.data);
    });
    return detail;
  }
  /**
   * After a subscribe with `since`: when history did not reach back, tell the handlers (before
   * any replayed event, so this runs as the reply is read) and accept the stream from here on.
   */
  checkRecovered(since, reply) {
    const data = isRecord(reply) ? reply : {};
    if (data.recovered !== false) return;
    this.lastSeqSeen = null;
    this.resumeFrom = this.serverHead;
    this.positionStream = this.serverStream;
    this.requireResync({
      reason: `events after seq ${since} are no longer available; reload state over REST`,
      since,
      replayed: typeof data.replayed === "number" ? data.replayed : 0,
      topics: Array.isArray(data.topics) ? data.topics : [...this.subscribedTopics],
      symbols: Array.isArray(data.symbols) ? data.symbols : [...this.subscribedSymbols]
    });
  }
  /**
   * Redis lost the gateway's stream and the worker moved to a new one: resume in that one from
   * now on; when events may be missing, tell the handlers, as after a resume that did not recover.
   */
  streamReset(notice) {
    const data = isRecord(notice) ? notice : {};
    if (typeof data.stream_id !== "string") return;
    this.serverStream = this.positionStream = data.stream_id;
    if (data.recovered !== false) return;
    const since = this.lastSeqSeen ?? this.resumeFrom ?? 0;
    this.lastSeqSeen = null;
    this.resumeFrom = typeof data.last_seq === "number" ? data.last_seq : null;
    this.requireResync({
      reason: typeof data.reason === "string" ? data.reason : `events after seq ${since} may be missing; reload state over REST`,
      since,
      replayed: 0,
      topics: [...this.subscribedTopics],
      symbols: [...this.subscribedSymbols]
    });
  }
  requireResync(resync) {
    this.deliver({
      type: "resync_required",
      data: resync,
      timestamp: (/* @__PURE__ */ new Date()).toISOString(),
      seq: null,
      connection_id: this.serverConnectionId
    });
  }
  pause(ms) {
    return new Promise((resolve) => {
      this.wakeReconnect = () => {
        this.wakeReconnect = null;
        if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
        this.reconnectTimer = null;
        resolve();
      };
      this.reconnectTimer = setTimeout(() => this.wakeReconnect?.(), ms);
    });
  }
  /** The gateway pings every heartbeat_interval: silence for longer than twice that means dead. */
  startWatchdog(socket) {
    this.stopWatchdog();
    const limit = this.silenceTimeoutMs ?? 2 * this.heartbeatIntervalS * 1e3;
    this.watchdog = setInterval(() => {
      const silent = now() - this.lastReceivedAt;
      if (silent > limit) {
        this.abandon(socket, `no message for ${Math.round(silent)} ms`);
      }
    }, Math.max(50, Math.min(limit / 4, 1e3)));
  }
  stopWatchdog() {
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
  }
  // -- messages -----------------------------------------------------------------------------
  /** One message from the gateway: a reply, a heartbeat, or an event. */
  receive(socket, raw) {
    if (socket !== this.socket) return;
    this.lastReceivedAt = now();
    const message = decode(raw);
    if (message === null) return;
    const { type } = message;
    const requestId = message.request_id;
    if (requestId !== void 0 && requestId !== null) {
      const replay = this.replays.get(String(requestId));
      if (replay !== void 0) {
        replay.push(message);
        return;
      }
      const request = this.pending.get(String(requestId));
      if (request !== void 0) {
        request.settle(message);
        return;
      }
      if (REPLY_TYPES.has(type) || DIRECT_REPLY_TYPES.has(type)) {
        return;
      }
    }
    const seq = typeof message.seq === "number" && Number.isInteger(message.seq) ? message.seq : null;
    if (seq === null) {
      if (type === "ping") {
        sendQuietly(socket, { type: "pong" });
        return;
      }
      if (REPLY_TYPES.has(type)) return;
      if (type === "stream_reset") {
        this.streamReset(message.data);
        return;
      }
      if (type === "system_status" && this.greetingStatusDue) {
        this.greetingStatusDue = false;
        return;
      }
    }
    this.greetingStatusDue = false;
    if (seq !== null) {
      if (this.lastSeqSeen !== null && seq <= this.lastSeqSeen) {
        this.droppedDuplicates += 1;
        return;
      }
      this.lastSeqSeen = seq;
      this.positionStream = this.serverStream;
    }
    this.deliver(toEvent(message));
  }
  deliver(event) {
    for (const key of [event.type, "*"]) {
      const set = this.handlers.get(key);
      if (set === void 0) continue;
      for (const handler of [...set]) {
        try {
          handler(event);
        } catch (error) {
          report(`a handler of ${event.type} events failed`, error);
        }
      }
    }
    try {
      if (event.type === "proposal_created") this.onProposal(event.data);
      else if (event.type === "trade_executed") this.onTrade(event.data);
    } catch (error) {
      report(`${event.type === "proposal_created" ? "onProposal" : "onTrade"} failed`, error);
    }
  }
  setState(state, detail) {
    this.currentState = state;
    for (const handler of [...this.stateHandlers]) {
      try {
        handler(state, detail);
      } catch (error) {
        report(`a state handler failed on ${state}`, error);
      }
    }
  }
};
function now() {
  return performance.now();
}
function positive(name, value) {
  if (!(value > 0)) throw new RangeError(`${name} must be positive, not ${value}`);
  return value;
}
function isRecord(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
function decode(raw) {
  if (typeof raw !== "string") return null;
  try {
    const message = JSON.parse(raw);
    return isRecord(message) && typeof message.type === "string" ? message : null;
  } catch {
    return null;
  }
}
function toEvent(message) {
  const { seq } = message;
  return {
    type: message.type,
    data: message.data,
    timestamp: typeof message.timestamp === "string" ? message.timestamp : (/* @__PURE__ */ new Date()).toISOString(),
    seq: typeof seq === "number" && Number.isInteger(seq) ? seq : null,
    connection_id: typeof message.connection_id === "string" ? message.connection_id : null
  };
}
function errorReply(type, reply) {
  const data = isRecord(reply.data) ? reply.data : {};
  const code = typeof data.code === "string" ? data.code : "ERROR";
  const details = typeof data.details === "string" ? data.details : void 0;
  return new SigmaxError(
    `${type}: ${data.error ?? "error"} [${code}]${details ? `: ${details}` : ""}`,
    code,
    details
  );
}
function asSigmaxError(error) {
  if (error instanceof SigmaxError) return error;
  return new SigmaxError(String(error), ClientErrorCode.CONNECTION_FAILED);
}
function closeText(event) {
  return `connection closed with code ${event.code}${event.reason ? ` ${event.reason}` : ""}`;
}
function detach(socket) {
  socket.onopen = socket.onmessage = socket.onerror = socket.onclose = null;
}
function sendQuietly(socket, message) {
  try {
    socket.send(JSON.stringify(message));
  } catch {
  }
}
function closeSocket(socket) {
  detach(socket);
  if (socket.readyState === socket.CLOSED) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, CLOSE_TIMEOUT_MS);
    function done() {
      clearTimeout(timer);
      socket.onclose = null;
      resolve();
    }
    socket.onclose = done;
    try {
      socket.close(NORMAL_CLOSURE);
    } catch {
      done();
    }
  });
}
function quiet(promise) {
  promise.catch(() => void 0);
  return promise;
}
function addAll(target, values) {
  for (const value of values) if (!target.includes(value)) target.push(value);
}
function removeAll(target, values) {
  for (const value of values) {
    const index = target.indexOf(value);
    if (index >= 0) target.splice(index, 1);
  }
}
function report(what, error) {
  console.error(`sigmax: ${what}:`, error);
}

// src/events.generated.ts
var TOPICS = [
  "all",
  "proposals",
  "executions",
  "analysis",
  "status",
  "market",
  "portfolio",
  "health",
  "alerts"
];
var SERVER_EVENT_TYPES = [
  "connected",
  "subscribed",
  "unsubscribed",
  "subscriptions",
  "command_result",
  "pong",
  "ping",
  "replay_complete",
  "error",
  "stream_reset",
  "analysis_update",
  "proposal_created",
  "proposal_approved",
  "proposal_rejected",
  "proposal_expired",
  "trade_executed",
  "status_change",
  "system_status",
  "market_update",
  "portfolio_update",
  "health_update",
  "alert",
  "warning"
];
var STREAM_EVENT_TYPES = [
  "analysis_update",
  "proposal_created",
  "proposal_approved",
  "proposal_rejected",
  "proposal_expired",
  "trade_executed",
  "status_change",
  "system_status",
  "market_update",
  "portfolio_update",
  "health_update",
  "alert",
  "warning"
];
var EVENT_TOPICS = {
  analysis_update: "analysis",
  proposal_created: "proposals",
  proposal_approved: "proposals",
  proposal_rejected: "proposals",
  proposal_expired: "proposals",
  trade_executed: "executions",
  status_change: "status",
  system_status: "status",
  market_update: "market",
  portfolio_update: "portfolio",
  health_update: "health",
  alert: "alerts",
  warning: "alerts"
};
export {
  ClientErrorCode,
  DEFAULT_URL,
  EVENT_TOPICS,
  SERVER_EVENT_TYPES,
  STREAM_EVENT_TYPES,
  SigmaxError,
  SigmaxWebSocket,
  TOPICS,
  backoffDelay
};
