/**
 * The one error type of the client. `code` is the gateway's when it answered with an `error`
 * event (`AUTHENTICATION_FAILED`, `INVALID_TOPIC`, `RATE_LIMITED`, ...), else one of
 * {@link ClientErrorCode}; `details` is the gateway's explanation when it gave one.
 */
export class SigmaxError extends Error {
  readonly code: string;
  readonly details?: string;

  constructor(message: string, code: string, details?: string) {
    super(message);
    this.name = 'SigmaxError';
    this.code = code;
    if (details !== undefined) this.details = details;
  }
}

/** The codes of errors the client raises itself, in the style of the gateway's. */
export const ClientErrorCode = {
  /** No WebSocket: not a browser, and Node without `--experimental-websocket` nor `WebSocketImpl`. */
  NO_WEBSOCKET: 'NO_WEBSOCKET',
  /** The URL is not a WebSocket URL. */
  INVALID_URL: 'INVALID_URL',
  /** The gateway cannot be reached, closed at once, or is not a SIGMAX gateway. */
  CONNECTION_FAILED: 'CONNECTION_FAILED',
  /** No `connected` greeting within `connectTimeoutMs`. */
  CONNECT_TIMEOUT: 'CONNECT_TIMEOUT',
  /** The connection was lost before the reply (a command is not sent again), or for good. */
  CONNECTION_LOST: 'CONNECTION_LOST',
  /** A request before `connect()`, or after the client closed. */
  NOT_CONNECTED: 'NOT_CONNECTED',
  /** `connect()` while connected; `disconnect()` first. */
  ALREADY_CONNECTED: 'ALREADY_CONNECTED',
  /** `disconnect()` was called while the request or the connection was under way. */
  DISCONNECTED: 'DISCONNECTED',
  /** No reply within `requestTimeoutMs`. */
  REQUEST_TIMEOUT: 'REQUEST_TIMEOUT',
  /** A `command_result` that says `success: false`. */
  COMMAND_FAILED: 'COMMAND_FAILED',
} as const;

export type ClientErrorCode = (typeof ClientErrorCode)[keyof typeof ClientErrorCode];
