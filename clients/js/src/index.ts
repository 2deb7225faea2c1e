// pg_changerelay's client for browsers and Node: follow version maps and change feeds over the endpoint's
// WebSocket, with reconnection from the last cursor, resync handling and the cache (loader) pattern.

export { ChangeRelay, RelayError, socketUrl } from "./relay.js";
export type {
  ChangeFeedOptions,
  CloseInfo,
  ConnectionState,
  RelayErrorCode,
  RelayEvents,
  RelayOptions,
  WebSocketConstructor,
  WebSocketLike,
} from "./relay.js";
export { Cached } from "./loader.js";
export type { LoadContext, Loader, LoaderOptions } from "./loader.js";
export { Backoff } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export * from "./protocol.js";
