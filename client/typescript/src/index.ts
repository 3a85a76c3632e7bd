/** The SIGMAX WebSocket API client: `new SigmaxWebSocket(options)`, then `connect(url)`. */
export {
  DEFAULT_URL,
  SigmaxWebSocket,
  backoffDelay,
} from './client.js';
export type {
  CommandOutcome,
  ConnectionState,
  EventDataMap,
  EventHandler,
  EventType,
  ReplayOptions,
  ResyncRequiredData,
  SigmaxEvent,
  SigmaxOptions,
  StateDetail,
  StateHandler,
} from './client.js';
export { ClientErrorCode, SigmaxError } from './errors.js';
export * from './events.generated.js';
