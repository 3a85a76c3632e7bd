/**
 * `SigmaxWebSocket`: the SIGMAX WebSocket API for browsers and Node, as the Python client
 * (`client/sigmax_client`) does it. One connection at a time; every request carries a
 * `request_id` and is settled by the reply that echoes it, whatever events arrive meanwhile.
 * When the connection is lost, the client reconnects with exponential backoff and jitter,
 * subscribes again to everything it had with `since` = the last seq it saw, and so hands every
 * event to the handlers once, in order.
 */
import { ClientErrorCode, SigmaxError } from './errors.js';
import type {
  ClientMessageType,
  CommandResultData,
  ConnectedData,
  ErrorData,
  HealthData,
  PortfolioData,
  ServerEventDataMap,
  SubscribedData,
  SubscriptionsData,
  SystemStatusData,
  ProposalCreatedData,
  TradeExecutedData,
} from './events.generated.js';

export type ConnectionState = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface SigmaxOptions {
  /** The API key: sent as the X-API-Key header where the WebSocket class can (Node), else as
   * `?api_key=` (browsers cannot set headers on a WebSocket); see `apiKeyIn`. */
  apiKey?: string;
  /** Where the key travels: 'header' (the default outside a browser) or 'query' (the default
   * in a browser: a URL can end up in logs, so use wss:// and short-lived keys there). */
  apiKeyIn?: 'header' | 'query';
  /** Reconnect and resume when the connection is lost (default true). */
  autoReconnect?: boolean;
  /** Longest wait between two reconnect attempts (default 30000). */
  maxReconnectDelayMs?: number;
  /** How long a request waits for its reply, a reconnect included (default 10000). */
  requestTimeoutMs?: number;
  /** The WebSocket class; default the global one (browsers, Node with --experimental-websocket). */
  WebSocketImpl?: typeof WebSocket;
  /** First wait before reconnecting; doubles with each failed attempt (default 500). */
  reconnectDelayMs?: number;
  /** How long opening a connection may take, the `connected` greeting included (default 10000). */
  connectTimeoutMs?: number;
  /** A connection silent for longer is dead (default twice the gateway's heartbeat_interval). */
  silenceTimeoutMs?: number;
}

export interface StateDetail {
  /** 'reconnecting': the attempt about to be made, from 1. */
  attempt?: number;
  /** 'connected': true after a reconnect (subscriptions restored), false on the first connect. */
  resumed?: boolean;
  /** 'connected' after a reconnect: false when the gateway's history no longer reached back. */
  recovered?: boolean;
  /** 'connected' after a reconnect: events replayed from the gateway's history. */
  replayed?: number;
  /** 'closed': why, when the client did not close on request; 'reconnecting': why the
   * connection or the previous attempt ended. */
  error?: SigmaxError;
  /** 'reconnecting': `error.message`. */
  reason?: string;
}

/** What `command` resolves with: for `get_status`, `get_portfolio` and `get_health`, `result` is
 * the data of the event the gateway answers with. */
export type CommandOutcome = Omit<CommandResultData, 'result'> & {
  result: CommandResultData['result'] | SystemStatusData | PortfolioData | HealthData;
};

/** Made by the client, not sent by the gateway: history did not reach back, reload over REST. */
export interface ResyncRequiredData {
  reason: string;
  since: number;
  replayed: number;
  topics: string[];
  symbols: string[];
}

export type EventDataMap = ServerEventDataMap & { resync_required: ResyncRequiredData };

export type EventType = keyof EventDataMap;

/** One event as the handlers get it: the gateway's envelope (`seq` null outside the stream). */
export type SigmaxEvent<K extends EventType = EventType> = {
  [T in K]: {
    type: T;
    data: EventDataMap[T];
    timestamp: string;
    seq: number | null;
    connection_id: string | null;
  };
}[K];

export type EventHandler<K extends EventType = EventType> = (event: SigmaxEvent<K>) => void;
export type StateHandler = (state: ConnectionState, detail: StateDetail) => void;

export const DEFAULT_URL = 'ws://localhost:8000/api/ws';

/** Replies to requests: consumed by the client, never handed to the handlers. */
const REPLY_TYPES: ReadonlySet<string> = new Set([
  'connected', 'subscribed', 'unsubscribed', 'subscriptions', 'command_result', 'pong',
]);
/** Event types that are also direct replies (to get_status and the commands that ask for them). */
const DIRECT_REPLY_TYPES: ReadonlySet<string> = new Set([
  'error', 'system_status', 'portfolio_update', 'health_update',
]);
/** A connection that stayed up this long starts the next reconnect from the shortest delay. */
const STABLE_AFTER_MS = 10_000;
/** How long `disconnect()` waits for the gateway to acknowledge the close. */
const CLOSE_TIMEOUT_MS = 2_000;
/** Used until the greeting says otherwise. */
const DEFAULT_HEARTBEAT_INTERVAL_S = 30;
const NORMAL_CLOSURE = 1000;

/**
 * Milliseconds to wait before reconnect `attempt` (0 first): exponential up to `capMs`, with
 * "equal jitter" (between half and all of it), so that clients cut off together do not all
 * come back at the same instant.
 */
export function backoffDelay(attempt: number, baseMs: number, capMs: number,
                             random: () => number = Math.random): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 32));
  return ceiling / 2 + random() * ceiling / 2;
}

interface ServerMessage {
  type: string;
  data?: unknown;
  timestamp?: unknown;
  seq?: unknown;
  request_id?: unknown;
  connection_id?: unknown;
}

interface PendingRequest {
  socket: WebSocket;
  /** Called synchronously with the reply, before the next message is read. */
  settle(reply: ServerMessage): void;
  fail(error: SigmaxError): void;
}

interface ConnectionWaiter {
  resolve(socket: WebSocket): void;
  reject(error: SigmaxError): void;
}

type RequestData = Record<string, unknown>;

/** What `replay()` asks for: see the gateway's `replay` message. */
export interface ReplayOptions {
  /** After this seq, or at or after this RFC 3339 time (default: the oldest archived event). */
  since?: number | string;
  /** Up to this seq or time (default: the newest archived event). */
  until?: number | string;
  /** The events' own topics (default: all). */
  topics?: string[];
  /** Events carrying one of these symbols (default: any). */
  symbols?: string[];
  /** Times the original pace (1: as it happened); 0, the default: as fast as they come. */
  speed?: number;
}

/** The messages of one running replay, handed over by the reader; null once its connection is lost. */
class ReplayInbox {
  private readonly messages: (ServerMessage | null)[] = [];
  private wake: (() => void) | null = null;

  constructor(readonly socket: WebSocket) {}

  push(message: ServerMessage | null): void {
    this.messages.push(message);
    this.wake?.();
    this.wake = null;
  }

  async next(): Promise<ServerMessage | null> {
    while (this.messages.length === 0) {
      await new Promise<void>((resolve) => { this.wake = resolve; });
    }
    return this.messages.shift() as ServerMessage | null;
  }
}

export class SigmaxWebSocket {
  private readonly autoReconnect: boolean;
  private readonly maxReconnectDelayMs: number;
  private readonly reconnectDelayMs: number;
  private readonly requestTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly silenceTimeoutMs: number | undefined;
  private readonly apiKey: string | undefined;
  private readonly apiKeyIn: 'header' | 'query';
  private readonly WebSocketImpl: typeof WebSocket | undefined;

  private currentState: ConnectionState = 'idle';
  private gatewayUrl = '';
  /** The connection requests go to; set as soon as its greeting arrives. */
  private socket: WebSocket | null = null;
  /** A connection being opened, not yet greeted: `disconnect()` must close it too. */
  private opening: { socket: WebSocket; abort(error: SigmaxError): void } | null = null;
  private closing = false;
  private session = 0;

  private readonly handlers = new Map<string, Set<(event: SigmaxEvent) => void>>();
  private readonly stateHandlers = new Set<StateHandler>();
  private readonly pending = new Map<string, PendingRequest>();
  private readonly replays = new Map<string, ReplayInbox>();
  private readonly waiters = new Set<ConnectionWaiter>();
  private requestCounter = 0;

  private subscribedTopics: string[] = [];
  private subscribedSymbols: string[] = [];
  private lastSeqSeen: number | null = null;
  /** Where to resume before any event was seen: the gateway's head when the subscription began. */
  private resumeFrom: number | null = null;
  /** The stream that lastSeqSeen / resumeFrom count in: a seq means nothing in another one. */
  private positionStream: string | null = null;
  private serverHead: number | null = null;
  private serverStream: string | null = null;
  private serverConnectionId: string | null = null;
  private heartbeatIntervalS = DEFAULT_HEARTBEAT_INTERVAL_S;
  private greetingStatusDue = false;

  private lastReceivedAt = 0;
  private connectedAt = 0;
  private watchdog: ReturnType<typeof setInterval> | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private wakeReconnect: (() => void) | null = null;
  private backoffAttempt = 0;
  private reconnectCount = 0;
  private droppedDuplicates = 0;

  constructor(options: SigmaxOptions = {}) {
    this.apiKey = options.apiKey;
    this.apiKeyIn = options.apiKeyIn
      ?? ('document' in globalThis ? 'query' : 'header');
    this.autoReconnect = options.autoReconnect ?? true;
    this.maxReconnectDelayMs = positive('maxReconnectDelayMs', options.maxReconnectDelayMs ?? 30_000);
    this.reconnectDelayMs = positive('reconnectDelayMs', options.reconnectDelayMs ?? 500);
    this.requestTimeoutMs = positive('requestTimeoutMs', options.requestTimeoutMs ?? 10_000);
    this.connectTimeoutMs = positive('connectTimeoutMs', options.connectTimeoutMs ?? 10_000);
    this.silenceTimeoutMs = options.silenceTimeoutMs === undefined
      ? undefined : positive('silenceTimeoutMs', options.silenceTimeoutMs);
    this.WebSocketImpl = options.WebSocketImpl;
  }

  // -- state --------------------------------------------------------------------------------

  get state(): ConnectionState {
    return this.currentState;
  }

  /** The seq of the last stream event received: where a reconnect resumes. */
  get lastSeq(): number | null {
    return this.lastSeqSeen;
  }

  /** The gateway's stream, from the `connected` greeting of the current connection. */
  get streamId(): string | null {
    return this.serverStream;
  }

  /** This connection's id at the gateway. */
  get connectionId(): string | null {
    return this.serverConnectionId;
  }

  get url(): string {
    return this.gatewayUrl;
  }

  /** What the client holds and restores on reconnect, as the gateway confirmed it. */
  get topics(): readonly string[] {
    return [...this.subscribedTopics];
  }

  get symbols(): readonly string[] {
    return [...this.subscribedSymbols];
  }

  /** Successful reconnects since `connect()`. */
  get reconnects(): number {
    return this.reconnectCount;
  }

  /** Events dropped because their seq had been seen already. */
  get duplicatesDropped(): number {
    return this.droppedDuplicates;
  }

  // -- public API ---------------------------------------------------------------------------

  /**
   * Connect; resolves after the gateway's `connected` greeting. Rejects with a SigmaxError
   * (`AUTHENTICATION_FAILED`, `MAX_CONNECTIONS_EXCEEDED`, `CONNECTION_FAILED`, ...) and does
   * not retry: reconnecting is for connections that were up.
   */
  async connect(url: string = DEFAULT_URL): Promise<void> {
    if (this.currentState === 'connecting' || this.currentState === 'connected'
        || this.currentState === 'reconnecting') {
      throw new SigmaxError(`already connected to ${this.gatewayUrl}; disconnect() first`,
                            ClientErrorCode.ALREADY_CONNECTED);
    }
    this.session += 1;
    this.closing = false;
    this.gatewayUrl = url;
    this.subscribedTopics = [];
    this.subscribedSymbols = [];
    this.lastSeqSeen = this.resumeFrom = this.positionStream = null;
    this.backoffAttempt = this.reconnectCount = this.droppedDuplicates = 0;
    this.setState('connecting', {});
    try {
      const socket = await this.open();
      if (socket !== this.socket) {
        throw new SigmaxError(`connection to ${url} lost at once`, ClientErrorCode.CONNECTION_FAILED);
      }
    } catch (error) {
      const failure = asSigmaxError(error);
      if (!this.closing) this.setState('closed', { error: failure });
      throw failure;
    }
    this.markConnected({ resumed: false });
  }

  /** Close the connection: pending requests reject, no timer is left, no reconnect follows. */
  async disconnect(): Promise<void> {
    this.closing = true;
    this.session += 1;
    this.stopWatchdog();
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.wakeReconnect?.();
    const stopped = new SigmaxError('disconnected', ClientErrorCode.DISCONNECTED);
    this.opening?.abort(stopped);
    const socket = this.socket;
    this.socket = null;
    this.failPending(stopped);
    if (this.currentState !== 'closed') this.setState('closed', {});
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
  subscribe(topics: string[], symbols: string[] = [],
            options: { since?: number } = {}): Promise<SubscribedData> {
    return quiet(this.subscribeNow(topics, symbols, options.since));
  }

  /** Stop receiving `topics` and `symbols`; resolves with the `unsubscribed` data. */
  unsubscribe(topics: string[], symbols: string[] = []): Promise<SubscribedData> {
    return quiet(this.unsubscribeNow(topics, symbols));
  }

  /** The gateway's status: the `system_status` reply to this very request. */
  async getStatus(): Promise<SystemStatusData> {
    const reply = await this.request('get_status', undefined, true);
    return reply.data as SystemStatusData;
  }

  /** What the gateway holds for this connection: `{topics, symbols, count}`. */
  async getSubscriptions(): Promise<SubscriptionsData> {
    const reply = await this.request('get_subscriptions', undefined, true);
    return reply.data as SubscriptionsData;
  }

  /**
   * Run a gateway command (`get_portfolio`, `approve_proposal`, ...); resolves with the
   * `command_result` data `{command, success, result}` (for `get_status`, `get_portfolio` and
   * `get_health`, which the gateway answers with the event they ask for, `result` is its data). Rejects with the gateway's code
   * (`FORBIDDEN_COMMAND`, `RATE_LIMITED`, ...) or `REQUEST_TIMEOUT`. Not sent again after a lost
   * connection, since whether it ran is then unknown: rejects with `CONNECTION_LOST`.
   */
  async command(name: string, args: Record<string, unknown> = {}): Promise<CommandOutcome> {
    const reply = await this.request('command', { ...args, command: name }, false);
    if (reply.type !== 'command_result') {
      // get_status, get_portfolio, get_health answer with the event they ask for.
      return { command: name, success: true, result: reply.data as CommandOutcome['result'] };
    }
    const data = reply.data as CommandResultData;
    if (data?.success === false) {
      throw new SigmaxError(`command ${name} failed: ${JSON.stringify(data.result)}`,
                            ClientErrorCode.COMMAND_FAILED);
    }
    return data;
  }

  /**
   * Call `handler` for every event of `type` (`'*'`: every event), in order; returns the
   * function that removes it. A handler that throws is reported and the others still run.
   */
  on<K extends EventType>(type: K, handler: (event: SigmaxEvent<K>) => void): () => void;
  on(type: '*', handler: (event: SigmaxEvent) => void): () => void;
  on(type: EventType | '*', handler: (event: SigmaxEvent) => void): () => void;
  on(type: string, handler: (event: never) => void): () => void {
    const callback = handler as (event: SigmaxEvent) => void;
    let set = this.handlers.get(type);
    if (set === undefined) this.handlers.set(type, set = new Set());
    set.add(callback);
    return () => { this.handlers.get(type)?.delete(callback); };
  }

  /** Call `handler(state, detail)` on every change of state; returns the function that removes it. */
  onStateChange(handler: StateHandler): () => void {
    this.stateHandlers.add(handler);
    return () => { this.stateHandlers.delete(handler); };
  }

  /** Called with the data of every `proposal_created` event: override in a subclass. */
  onProposal(data: ProposalCreatedData): void {
    void data;
  }

  /** Called with the data of every `trade_executed` event: override in a subclass. */
  onTrade(data: TradeExecutedData): void {
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
  async *replay(options: ReplayOptions = {}): AsyncGenerator<SigmaxEvent> {
    let position = options.since;
    for (;;) {
      const socket = await this.connectedSocket('replay', now() + this.requestTimeoutMs);
      const requestId = String(++this.requestCounter);
      const inbox = new ReplayInbox(socket);
      this.replays.set(requestId, inbox);
      try {
        const data: RequestData = {
          topics: options.topics ?? [], symbols: options.symbols ?? [], speed: options.speed ?? 0,
        };
        if (position !== undefined) data.since = position;
        if (options.until !== undefined) data.until = options.until;
        sendQuietly(socket, { type: 'replay', request_id: requestId, data });
        for (;;) {
          const message = await inbox.next();
          if (message === null) break;
          if (message.type === 'replay_complete') return;
          if (message.type === 'error') throw errorReply('replay', message);
          const event = toEvent(message);
          if (event.seq !== null) position = event.seq;
          yield event;
        }
      } finally {
        this.replays.delete(requestId);
      }
      if (!this.autoReconnect || this.closing) {
        throw new SigmaxError('connection lost during a replay', ClientErrorCode.CONNECTION_LOST);
      }
    }
  }

  private async subscribeNow(topics: string[], symbols: string[],
                             since: number | undefined): Promise<SubscribedData> {
    const data: RequestData = { topics: [...topics], symbols: [...symbols] };
    if (since !== undefined) data.since = since;
    const reply = await this.request('subscribe', data, true,
                                     since === undefined ? undefined : (message) => {
      this.checkRecovered(since, message.data);
    });
    const confirmed = reply.data as SubscribedData;
    addAll(this.subscribedTopics, confirmed.topics ?? topics);
    addAll(this.subscribedSymbols, confirmed.symbols ?? symbols);
    if (this.lastSeqSeen === null && this.resumeFrom === null) {
      // Nothing seen yet: a reconnect resumes from where this subscription started.
      this.resumeFrom = since ?? this.serverHead;
      this.positionStream = since === undefined ? this.serverStream : null;
    }
    return confirmed;
  }

  private async unsubscribeNow(topics: string[], symbols: string[]): Promise<SubscribedData> {
    const reply = await this.request('unsubscribe',
                                     { topics: [...topics], symbols: [...symbols] }, true);
    const confirmed = reply.data as SubscribedData;
    removeAll(this.subscribedTopics, confirmed.topics ?? topics);
    removeAll(this.subscribedSymbols, confirmed.symbols ?? symbols);
    return confirmed;
  }

  /**
   * Send a request once connected and return its reply, within requestTimeoutMs. `retry`:
   * send it again on the next connection when this one is lost first (for requests that may
   * safely run twice).
   */
  private async request(type: ClientMessageType, data: RequestData | undefined, retry: boolean,
                        onReply?: (reply: ServerMessage) => void): Promise<ServerMessage> {
    const deadline = now() + this.requestTimeoutMs;
    for (;;) {
      const socket = await this.connectedSocket(type, deadline);
      try {
        return await this.exchange(socket, type, data, deadline, onReply);
      } catch (error) {
        const retriable = error instanceof SigmaxError
          && error.code === ClientErrorCode.CONNECTION_LOST
          && retry && this.autoReconnect && !this.closing && now() < deadline;
        if (!retriable) throw error;
      }
    }
  }

  /** The open connection, waiting for a reconnect until `deadline`. */
  private connectedSocket(type: string, deadline: number): Promise<WebSocket> {
    if (this.currentState === 'connected' && this.socket !== null) {
      return Promise.resolve(this.socket);
    }
    if (this.currentState !== 'connecting' && this.currentState !== 'reconnecting') {
      return Promise.reject(new SigmaxError(
        this.currentState === 'idle' ? `${type}: not connected, call connect() first`
          : `${type}: the client is closed`, ClientErrorCode.NOT_CONNECTED));
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new SigmaxError(`${type}: not connected to ${this.gatewayUrl} within `
                               + `${this.requestTimeoutMs} ms (reconnecting)`,
                               ClientErrorCode.REQUEST_TIMEOUT));
      }, Math.max(0, deadline - now()));
      const waiter: ConnectionWaiter = {
        resolve: (socket) => { clearTimeout(timer); resolve(socket); },
        reject: (error) => { clearTimeout(timer); reject(error); },
      };
      this.waiters.add(waiter);
    });
  }

  /** Send one request on `socket`; settle with the reply that echoes its request_id. */
  private exchange(socket: WebSocket, type: ClientMessageType, data: RequestData | undefined,
                   deadline: number, onReply?: (reply: ServerMessage) => void):
      Promise<ServerMessage> {
    if (socket !== this.socket) {
      // Lost, or disconnect() called, between the caller's turn and this one.
      return Promise.reject(this.closing
        ? new SigmaxError(`${type}: disconnected`, ClientErrorCode.DISCONNECTED)
        : new SigmaxError(`connection lost before ${type} was sent`, ClientErrorCode.CONNECTION_LOST));
    }
    const requestId = String(++this.requestCounter);
    return new Promise((resolve, reject) => {
      const finish = () => {
        clearTimeout(timer);
        this.pending.delete(requestId);
      };
      const timer = setTimeout(() => {
        finish();
        reject(new SigmaxError(`no reply to ${type} within ${this.requestTimeoutMs} ms`,
                               ClientErrorCode.REQUEST_TIMEOUT));
      }, Math.max(0, deadline - now()));
      this.pending.set(requestId, {
        socket,
        settle: (reply) => {
          finish();
          if (reply.type === 'error') {
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
        },
      });
      const message: RequestData = { type, request_id: requestId };
      if (data !== undefined) message.data = data;
      try {
        socket.send(JSON.stringify(message));
      } catch (error) {
        finish();
        reject(new SigmaxError(`connection lost before ${type} was sent: ${String(error)}`,
                               ClientErrorCode.CONNECTION_LOST));
      }
    });
  }

  private failPending(error: SigmaxError, socket?: WebSocket): void {
    for (const request of [...this.pending.values()]) {
      if (socket === undefined || request.socket === socket) request.fail(error);
    }
    for (const inbox of this.replays.values()) {
      if (socket === undefined || inbox.socket === socket) inbox.push(null);
    }
    if (socket === undefined) {
      for (const waiter of [...this.waiters]) waiter.reject(error);
      this.waiters.clear();
    }
  }

  // -- the connection -----------------------------------------------------------------------

  /** Open a connection and read its greeting; the connection becomes `this.socket`. */
  private open(): Promise<WebSocket> {
    const Impl = this.WebSocketImpl ?? (globalThis as { WebSocket?: typeof WebSocket }).WebSocket;
    if (Impl === undefined) {
      return Promise.reject(new SigmaxError(
        'no WebSocket: pass options.WebSocketImpl, or run Node 20 with --experimental-websocket',
        ClientErrorCode.NO_WEBSOCKET));
    }
    let address: string;
    const inHeader = this.apiKey !== undefined && this.apiKeyIn === 'header';
    try {
      const url = new URL(this.gatewayUrl);
      if (this.apiKey && !inHeader) url.searchParams.set('api_key', this.apiKey);
      address = url.toString();
    } catch (error) {
      return Promise.reject(new SigmaxError(`invalid gateway URL ${this.gatewayUrl}`,
                                            ClientErrorCode.INVALID_URL, String(error)));
    }
    const shown = this.gatewayUrl;
    return new Promise((resolve, reject) => {
      let socket: WebSocket;
      try {
        // Node's WebSocket (undici) and the ws package take {headers} as their second argument.
        socket = inHeader
          ? new (Impl as unknown as new (url: string, init: unknown) => WebSocket)(
            address, { headers: { 'X-API-Key': this.apiKey } })
          : new Impl(address);
      } catch (error) {
        reject(new SigmaxError(`cannot connect to ${shown}: ${String(error)}`,
                               ClientErrorCode.INVALID_URL, String(error)));
        return;
      }
      let settled = false;
      const fail = (error: SigmaxError) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.opening = null;
        detach(socket);
        void closeSocket(socket);
        reject(error);
      };
      const timer = setTimeout(() => {
        fail(new SigmaxError(`${shown} sent no greeting within ${this.connectTimeoutMs} ms`,
                             ClientErrorCode.CONNECT_TIMEOUT));
      }, this.connectTimeoutMs);
      this.opening = { socket, abort: fail };
      socket.onmessage = (event: MessageEvent) => {
        if (settled) {
          this.receive(socket, event.data);
          return;
        }
        const message = decode(event.data);
        const data = isRecord(message?.data) ? message.data : {};
        if (message?.type === 'connected') {
          settled = true;
          clearTimeout(timer);
          this.opening = null;
          // Adopted at once, not when the promise continues: the messages that follow the
          // greeting may be dispatched before then.
          this.adopt(socket, data as Partial<ConnectedData>);
          resolve(socket);
        } else if (message?.type === 'error') {
          const code = typeof data.code === 'string' ? data.code : ClientErrorCode.CONNECTION_FAILED;
          const details = typeof data.details === 'string' ? data.details : undefined;
          fail(new SigmaxError(`${shown} refused the connection: ${String(data.error)} [${code}]`
                               + (details ? `: ${details}` : ''), code, details));
        } else {
          fail(new SigmaxError(`${shown} is not a SIGMAX gateway: its first message was `
                               + String(event.data).slice(0, 80),
                               ClientErrorCode.CONNECTION_FAILED));
        }
      };
      socket.onclose = (event: CloseEvent) => {
        if (settled) {
          this.lost(socket, closeText(event));
          return;
        }
        fail(new SigmaxError(`cannot connect to ${shown}: ${closeText(event)}`,
                             ClientErrorCode.CONNECTION_FAILED));
      };
      socket.onerror = (event: Event) => {
        // Browsers tell nothing more; Node and `ws` give a message.
        if (settled) return;
        const detail = (event as { message?: unknown }).message;
        fail(new SigmaxError(`cannot connect to ${shown}` + (detail ? `: ${String(detail)}` : ''),
                             ClientErrorCode.CONNECTION_FAILED));
      };
    });
  }

  private adopt(socket: WebSocket, greeting: Partial<ConnectedData>): void {
    this.socket = socket;
    this.serverConnectionId = typeof greeting.connection_id === 'string' ? greeting.connection_id : null;
    this.serverHead = typeof greeting.last_seq === 'number' ? greeting.last_seq : null;
    this.serverStream = typeof greeting.stream_id === 'string' ? greeting.stream_id : null;
    this.heartbeatIntervalS = typeof greeting.heartbeat_interval === 'number'
      && greeting.heartbeat_interval > 0 ? greeting.heartbeat_interval : DEFAULT_HEARTBEAT_INTERVAL_S;
    this.greetingStatusDue = true;
    this.lastReceivedAt = this.connectedAt = now();
    this.startWatchdog(socket);
  }

  private markConnected(detail: StateDetail): void {
    this.setState('connected', detail);
    const socket = this.socket;
    if (socket === null) return;
    for (const waiter of [...this.waiters]) waiter.resolve(socket);
    this.waiters.clear();
  }

  /** `socket` is gone: fail what waited on it, and reconnect unless that is off. */
  private lost(socket: WebSocket, reason: string): void {
    if (socket !== this.socket) return;
    this.socket = null;
    this.stopWatchdog();
    detach(socket);
    this.failPending(new SigmaxError(`connection lost: ${reason}`, ClientErrorCode.CONNECTION_LOST),
                     socket);
    if (this.closing || this.currentState !== 'connected') {
      return; // a reconnect under way goes on by itself
    }
    if (!this.autoReconnect) {
      const error = new SigmaxError(`connection to ${this.gatewayUrl} lost: ${reason}`,
                                    ClientErrorCode.CONNECTION_LOST);
      this.failPending(error);
      this.setState('closed', { error });
      return;
    }
    if (now() - this.connectedAt >= STABLE_AFTER_MS) this.backoffAttempt = 0;
    void this.reconnect(new SigmaxError(`connection to ${this.gatewayUrl} lost: ${reason}`,
                                        ClientErrorCode.CONNECTION_LOST));
  }

  /** Drop a connection that stopped answering: do not wait for a close that may never come. */
  private abandon(socket: WebSocket, reason: string): void {
    this.lost(socket, reason);
    void closeSocket(socket);
  }

  private async reconnect(cause: SigmaxError): Promise<void> {
    const session = this.session;
    for (let attempt = 1; !this.closing && session === this.session; attempt += 1) {
      this.setState('reconnecting', { attempt, reason: cause.message, error: cause });
      await this.pause(backoffDelay(this.backoffAttempt, this.reconnectDelayMs,
                                    this.maxReconnectDelayMs));
      if (this.closing || session !== this.session) return;
      this.backoffAttempt += 1;
      let socket: WebSocket | null = null;
      try {
        socket = await this.open();
        const detail = await this.resume(socket);
        if (socket !== this.socket) {
          throw new SigmaxError('connection lost while resuming', ClientErrorCode.CONNECTION_LOST);
        }
        this.reconnectCount += 1;
        this.markConnected(detail);
        return;
      } catch (error) {
        if (this.closing || session !== this.session) return;
        const failure = asSigmaxError(error);
        if (socket !== null) this.abandon(socket, failure.message);
        if (failure.code === 'AUTHENTICATION_FAILED') {
          // Retrying cannot help: the key was refused.
          this.failPending(failure);
          this.setState('closed', { error: failure });
          return;
        }
        cause = failure;
      }
    }
  }

  /** Subscribe again to everything, from the last seq seen. */
  private async resume(socket: WebSocket): Promise<StateDetail> {
    if (this.subscribedTopics.length === 0 && this.subscribedSymbols.length === 0) {
      return { resumed: true, recovered: true, replayed: 0 };
    }
    const since = this.lastSeqSeen ?? this.resumeFrom;
    const data: RequestData = { topics: [...this.subscribedTopics], symbols: [...this.subscribedSymbols] };
    if (since !== null) {
      data.since = since;
      if (this.positionStream !== null) data.stream_id = this.positionStream;
    }
    const detail: StateDetail = { resumed: true, recovered: true, replayed: 0 };
    await this.exchange(socket, 'subscribe', data, now() + this.requestTimeoutMs, (reply) => {
      if (since === null) return;
      const confirmed = isRecord(reply.data) ? reply.data : {};
      detail.recovered = confirmed.recovered !== false;
      detail.replayed = typeof confirmed.replayed === 'number' ? confirmed.replayed : 0;
      this.checkRecovered(since, reply.data);
    });
    return detail;
  }

  /**
   * After a subscribe with `since`: when history did not reach back, tell the handlers (before
   * any replayed event, so this runs as the reply is read) and accept the stream from here on.
   */
  private checkRecovered(since: number, reply: unknown): void {
    const data = isRecord(reply) ? reply : {};
    if (data.recovered !== false) return;
    // The gateway may have restarted its sequence: what follows is new whatever its seq.
    this.lastSeqSeen = null;
    this.resumeFrom = this.serverHead;
    this.positionStream = this.serverStream;
    this.requireResync({
      reason: `events after seq ${since} are no longer available; reload state over REST`,
      since,
      replayed: typeof data.replayed === 'number' ? data.replayed : 0,
      topics: Array.isArray(data.topics) ? data.topics as string[] : [...this.subscribedTopics],
      symbols: Array.isArray(data.symbols) ? data.symbols as string[] : [...this.subscribedSymbols],
    });
  }

  /**
   * Redis lost the gateway's stream and the worker moved to a new one: resume in that one from
   * now on; when events may be missing, tell the handlers, as after a resume that did not recover.
   */
  private streamReset(notice: unknown): void {
    const data = isRecord(notice) ? notice : {};
    if (typeof data.stream_id !== 'string') return;
    this.serverStream = this.positionStream = data.stream_id;
    if (data.recovered !== false) return;
    const since = this.lastSeqSeen ?? this.resumeFrom ?? 0;
    this.lastSeqSeen = null;
    this.resumeFrom = typeof data.last_seq === 'number' ? data.last_seq : null;
    this.requireResync({
      reason: typeof data.reason === 'string' ? data.reason
        : `events after seq ${since} may be missing; reload state over REST`,
      since,
      replayed: 0,
      topics: [...this.subscribedTopics],
      symbols: [...this.subscribedSymbols],
    });
  }

  private requireResync(resync: ResyncRequiredData): void {
    this.deliver({ type: 'resync_required', data: resync, timestamp: new Date().toISOString(),
                   seq: null, connection_id: this.serverConnectionId });
  }

  private pause(ms: number): Promise<void> {
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
  private startWatchdog(socket: WebSocket): void {
    this.stopWatchdog();
    const limit = this.silenceTimeoutMs ?? 2 * this.heartbeatIntervalS * 1000;
    this.watchdog = setInterval(() => {
      const silent = now() - this.lastReceivedAt;
      if (silent > limit) {
        this.abandon(socket, `no message for ${Math.round(silent)} ms`);
      }
    }, Math.max(50, Math.min(limit / 4, 1000)));
  }

  private stopWatchdog(): void {
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
  }

  // -- messages -----------------------------------------------------------------------------

  /** One message from the gateway: a reply, a heartbeat, or an event. */
  private receive(socket: WebSocket, raw: unknown): void {
    if (socket !== this.socket) return;
    this.lastReceivedAt = now();
    const message = decode(raw);
    if (message === null) return;
    const { type } = message;
    const requestId = message.request_id;
    if (requestId !== undefined && requestId !== null) {
      const replay = this.replays.get(String(requestId));
      if (replay !== undefined) {
        replay.push(message);
        return;
      }
      const request = this.pending.get(String(requestId));
      if (request !== undefined) {
        request.settle(message);
        return;
      }
      if (REPLY_TYPES.has(type) || DIRECT_REPLY_TYPES.has(type)) {
        return; // the reply to a request that gave up waiting
      }
    }
    const seq = typeof message.seq === 'number' && Number.isInteger(message.seq) ? message.seq : null;
    if (seq === null) {
      if (type === 'ping') {
        // The gateway closes connections it has not heard from for WS_CONNECTION_TIMEOUT.
        sendQuietly(socket, { type: 'pong' });
        return;
      }
      if (REPLY_TYPES.has(type)) return;
      if (type === 'stream_reset') {
        this.streamReset(message.data);
        return;
      }
      if (type === 'system_status' && this.greetingStatusDue) {
        // Part of the greeting, not an event the application subscribed to.
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

  private deliver(event: SigmaxEvent): void {
    for (const key of [event.type, '*']) {
      const set = this.handlers.get(key);
      if (set === undefined) continue;
      for (const handler of [...set]) {
        try {
          handler(event);
        } catch (error) {
          report(`a handler of ${event.type} events failed`, error);
        }
      }
    }
    try {
      if (event.type === 'proposal_created') this.onProposal(event.data);
      else if (event.type === 'trade_executed') this.onTrade(event.data);
    } catch (error) {
      report(`${event.type === 'proposal_created' ? 'onProposal' : 'onTrade'} failed`, error);
    }
  }

  private setState(state: ConnectionState, detail: StateDetail): void {
    this.currentState = state;
    for (const handler of [...this.stateHandlers]) {
      try {
        handler(state, detail);
      } catch (error) {
        report(`a state handler failed on ${state}`, error);
      }
    }
  }
}

function now(): number {
  return performance.now();
}

function positive(name: string, value: number): number {
  if (!(value > 0)) throw new RangeError(`${name} must be positive, not ${value}`);
  return value;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function decode(raw: unknown): ServerMessage | null {
  if (typeof raw !== 'string') return null;
  try {
    const message: unknown = JSON.parse(raw);
    return isRecord(message) && typeof message.type === 'string' ? message as unknown as ServerMessage : null;
  } catch {
    return null;
  }
}

function toEvent(message: ServerMessage): SigmaxEvent {
  const { seq } = message;
  return {
    type: message.type as EventType,
    data: message.data,
    timestamp: typeof message.timestamp === 'string' ? message.timestamp : new Date().toISOString(),
    seq: typeof seq === 'number' && Number.isInteger(seq) ? seq : null,
    connection_id: typeof message.connection_id === 'string' ? message.connection_id : null,
  } as SigmaxEvent;
}

function errorReply(type: string, reply: ServerMessage): SigmaxError {
  const data = (isRecord(reply.data) ? reply.data : {}) as Partial<ErrorData>;
  const code = typeof data.code === 'string' ? data.code : 'ERROR';
  const details = typeof data.details === 'string' ? data.details : undefined;
  return new SigmaxError(`${type}: ${data.error ?? 'error'} [${code}]${details ? `: ${details}` : ''}`,
                         code, details);
}

function asSigmaxError(error: unknown): SigmaxError {
  if (error instanceof SigmaxError) return error;
  return new SigmaxError(String(error), ClientErrorCode.CONNECTION_FAILED);
}

function closeText(event: CloseEvent): string {
  return `connection closed with code ${event.code}${event.reason ? ` ${event.reason}` : ''}`;
}

function detach(socket: WebSocket): void {
  socket.onopen = socket.onmessage = socket.onerror = socket.onclose = null;
}

function sendQuietly(socket: WebSocket, message: RequestData): void {
  try {
    socket.send(JSON.stringify(message));
  } catch {
    // Closing already: the close event says so.
  }
}

/** Close `socket`; resolves when it is closed, or after CLOSE_TIMEOUT_MS at most. */
function closeSocket(socket: WebSocket): Promise<void> {
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

function quiet<T>(promise: Promise<T>): Promise<T> {
  promise.catch(() => undefined);
  return promise;
}

function addAll(target: string[], values: readonly string[]): void {
  for (const value of values) if (!target.includes(value)) target.push(value);
}

function removeAll(target: string[], values: readonly string[]): void {
  for (const value of values) {
    const index = target.indexOf(value);
    if (index >= 0) target.splice(index, 1);
  }
}

function report(what: string, error: unknown): void {
  console.error(`sigmax: ${what}:`, error);
}

