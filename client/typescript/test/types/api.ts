// Compiled by `npm run typecheck`, never run: the spec's usage and the public API that the
// dashboard relies on keep their shapes.

import {
  SigmaxError,
  SigmaxWebSocket,
  type ConnectionState,
  type EventType,
  type ProposalCreatedData,
  type SigmaxEvent,
  type SigmaxOptions,
  type StateDetail,
  type SubscribedData,
  type TradeExecutedData,
} from '../../src/index.js';

type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends (<T>() => T extends B ? 1 : 2) ? true : false;
type Expect<T extends true> = T;

function use(..._values: unknown[]): void {}

// The spec's "TypeScript/JavaScript Client" section.
export class SpecClient extends SigmaxWebSocket {
  override onProposal(data: ProposalCreatedData): void {
    use(data.proposal_id, data.symbol, data.action);
  }

  override onTrade(data: TradeExecutedData): void {
    use(data.filled_price);
  }
}

export async function specUsage(): Promise<void> {
  const client = new SigmaxWebSocket();
  await client.connect('ws://localhost:8000/api/ws');
  client.subscribe(['proposals', 'executions'], ['BTC/USDT']);
}

export type StateIsExact = Expect<Equal<ConnectionState,
  'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed'>>;

export const options: Required<Pick<SigmaxOptions,
  'apiKey' | 'autoReconnect' | 'maxReconnectDelayMs' | 'requestTimeoutMs' | 'WebSocketImpl'>> = {
  apiKey: 'key', autoReconnect: true, maxReconnectDelayMs: 30_000, requestTimeoutMs: 10_000,
  WebSocketImpl: WebSocket,
};

export const detail: StateDetail = {
  attempt: 1, resumed: true, recovered: true, replayed: 0, error: new SigmaxError('lost', 'CONNECTION_LOST'),
};

export function errors(error: SigmaxError): Error {
  const code: string = error.code;
  const details: string | undefined = error.details;
  use(code, details);
  return error;
}

export async function api(client: SigmaxWebSocket, type: EventType | '*'): Promise<void> {
  const connect: (url: string) => Promise<void> = (url) => client.connect(url);
  const disconnect: () => Promise<void> = () => client.disconnect();
  const subscribed: Promise<SubscribedData> = client.subscribe(['alerts']);
  const unsubscribed: Promise<unknown> = client.unsubscribe(['alerts'], ['BTC/USDT']);
  const status: Promise<unknown> = client.getStatus();
  const held: Promise<unknown> = client.getSubscriptions();
  const commanded: Promise<unknown> = client.command('approve_proposal', { proposal_id: 'p' });
  const result: unknown = (await client.command('get_portfolio')).result;
  const off: () => void = client.on('proposal_created', (event) => {
    const id: string | null | undefined = event.data.proposal_id; // optional: engines may omit it
    const seq: number | null = event.seq;
    use(id, seq);
  });
  const offAll: () => void = client.on('*', (event: SigmaxEvent) => use(event.type, event.data));
  const offEither: () => void = client.on(type, (event: SigmaxEvent) => use(event));
  const offMarket = client.on('market_update', (event) => use(event.data.map((entry) => entry.price)));
  // The dashboard's system area: the trading engine and the market feed (absent: unknown).
  const offStatus = client.on('system_status', (event) => {
    const mode: 'paper' | 'remote' | null | undefined = event.data.engine?.mode;
    const reachable: boolean | null | undefined = event.data.engine?.reachable;
    const source: string | null | undefined = event.data.market_feed?.source;
    const healthy: boolean | null | undefined = event.data.market_feed?.healthy;
    use(mode, reachable, source, healthy);
  });
  const offState: () => void = client.onStateChange((state: ConnectionState, change: StateDetail) => {
    use(state, change.attempt, change.resumed, change.recovered, change.replayed, change.error?.code);
  });
  const state: ConnectionState = client.state;
  const lastSeq: number | null = client.lastSeq;
  const streamId: string | null = client.streamId;
  // @ts-expect-error the state is the client's to change
  client.state = 'idle';
  use(connect, disconnect, subscribed, unsubscribed, status, held, commanded, result, off, offAll,
      offEither, offMarket, offStatus, offState, state, lastSeq, streamId);
}
