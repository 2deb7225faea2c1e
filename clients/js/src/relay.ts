// ChangeRelay: one WebSocket to the endpoint's `/ws`, kept open across server restarts.
//
// On every (re)connection it subscribes first to the change feed (from its last cursor) and then to the
// version map of each followed label. Server messages are handled strictly in order, one at a time: a
// `change` listener that returns a promise is awaited before the next message, and the cursor moves only
// after it, so the resume point is always "everything before it was handled". Reconnecting waits for the
// messages already received to be handled, then resumes from the cursor: nothing is missed or repeated.
// Version maps are replaced on each new subscription and merged with deltas; loaders (`loader.ts`) are
// offered every version their key reaches.

import { Backoff, type BackoffOptions } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { Cached, type Loader, type LoaderOptions } from "./loader.js";
import {
  CloseCode,
  type ChangeMessage,
  type ClientCommand,
  type ErrorCode,
  type ErrorMessage,
  type Filter,
  type ResyncMessage,
  type ServerMessage,
  type SubscribedMessage,
  type Version,
  type VersionData,
  type VersionMapMessage,
  isVersionMap,
  parseServerMessage,
} from "./protocol.js";

/** The part of the WHATWG WebSocket this client uses (browsers, Node 22+, Node 20 with --experimental-websocket). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ChangeFeedOptions {
  labels: string[];
  filter?: Filter;
  /** Where to resume (a cursor the endpoint gave); absent or null: from now. */
  cursor?: string | null;
}

export interface RelayOptions {
  /** `ws://host:port/ws`, or the endpoint's base `http(s)://host:port` (then `/ws` is used); in a page, may be relative. */
  url: string;
  /** A token from `changerelay.create_token()`; omit under `auth = trust`. Sent as `?token=`. */
  token?: string;
  /** Labels whose version maps to follow (each loader adds its own label). */
  versions?: string[];
  /** A change feed (the token needs `rows`). */
  changes?: ChangeFeedOptions;
  /** Reconnection delays (default 250 ms doubling to 10 s, 20 % jitter). */
  backoff?: BackoffOptions;
  /** A connection not open after this long is abandoned and retried (default 10 s). */
  connectTimeoutMs?: number;
  /** The WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
}

/** `idle` before start(); `waiting` between a close and the next attempt; `closed` after close() or a revoked token. */
export type ConnectionState = "idle" | "connecting" | "open" | "waiting" | "closed";

export interface CloseInfo {
  code: number;
  reason: string;
  /** Delay before the next attempt; null when the client will not reconnect. */
  retryInMs: number | null;
}

export type RelayErrorCode = ErrorCode | "token_revoked" | "protocol" | "loader" | "listener";

export class RelayError extends Error {
  override name = "RelayError";
  readonly code: RelayErrorCode;
  readonly label: string | undefined;

  constructor(code: RelayErrorCode, message: string, options: { label?: string; cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.code = code;
    this.label = options.label;
  }
}

export interface RelayEvents {
  /** A connection opened (before its subscriptions are answered). */
  open: () => void;
  /** A label's map (`full`: the whole map after subscribing; otherwise a delta, already merged). */
  versions: (label: string, data: Readonly<VersionData>, full: boolean) => void | Promise<void>;
  /** A change of the feed, in commit order, exactly once. The cursor moves past it once this resolves. */
  change: (change: ChangeMessage) => void | Promise<void>;
  /** The feed was idle; its cursor moved. */
  checkpoint: (cursor: string) => void | Promise<void>;
  /** The resume point moved (after a change, a checkpoint, or a new subscription): store it to resume later. */
  cursor: (cursor: string) => void | Promise<void>;
  /**
   * The cursor cannot be served (history pruned, another cluster): state derived from changes must be
   * reloaded. The feed has already been subscribed again from now; changes after that follow this event,
   * so apply them idempotently on top of what you reload.
   */
  resync: (message: ResyncMessage) => void | Promise<void>;
  error: (error: RelayError) => void;
  close: (info: CloseInfo) => void;
}

const NO_VERSION: Version = { v: 0, ts: 0 };
/** The close code of a connection that ended without a close frame. */
const ABNORMAL_CLOSE = 1006;
/** How long an open connection has, after an error, to report its close. */
const CLOSE_GRACE_MS = 5_000;

function keyOf(label: string, identifier: string | null): string {
  return identifier === null ? `${label}\u0000` : `${label}\u0000${identifier}`;
}

/** The WebSocket URL for `url` (in a page, relative to it) with the token in the query. */
export function socketUrl(url: string, token?: string): string {
  const u = new URL(url, (globalThis as { location?: { href: string } }).location?.href);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.pathname === "" || u.pathname === "/") u.pathname = "/ws";
  if (token) u.searchParams.set("token", token);
  return u.toString();
}

export class ChangeRelay extends Emitter<RelayEvents> {
  private readonly url: string;
  private readonly WS: WebSocketConstructor;
  private readonly backoff: Backoff;
  private readonly connectTimeoutMs: number;
  private readonly feed: { labels: string[]; filter: Filter | undefined } | null;
  private readonly followed = new Set<string>();
  private readonly maps = new Map<string, VersionData>();
  private readonly loaders = new Map<string, Cached<unknown>>();
  private resumeAt: string | null;
  /** (event_id, seq) of the last change handled: a change at or before it is a repeat and dropped. */
  private lastChange: [number, number] | null = null;
  private connectionState: ConnectionState = "idle";
  private ws: WebSocketLike | null = null;
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** Messages are handled one at a time, in order, on this chain. */
  private queue: Promise<void> = Promise.resolve();
  // Per connection:
  private awaitingMaps = new Set<string>();
  private feedAnswerPending = false;
  private waiters: Array<() => void> = [];
  private opened = 0;

  constructor(options: RelayOptions) {
    super();
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) {
      throw new Error(
        "no WebSocket implementation: on Node 20 run node with --experimental-websocket (Node 22 has it " +
          "built in), or pass options.WebSocket",
      );
    }
    this.WS = WS;
    this.url = socketUrl(options.url, options.token);
    this.backoff = new Backoff(options.backoff);
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.feed = options.changes ? { labels: [...options.changes.labels], filter: options.changes.filter } : null;
    this.resumeAt = options.changes?.cursor ?? null;
    for (const l of options.versions ?? []) this.followed.add(l);
  }

  /** The connection's state. */
  get state(): ConnectionState {
    return this.connectionState;
  }

  /** Where the change feed resumes: the position after the last change handled (or checkpoint). */
  get cursor(): string | null {
    return this.resumeAt;
  }

  /** How many connections have opened so far. */
  get connections(): number {
    return this.opened;
  }

  /** Connects (and keeps reconnecting until close()). */
  start(): this {
    if (this.connectionState === "idle") this.connect();
    return this;
  }

  /** Closes the connection for good, stops every loader, and resolves once the messages received are handled. */
  async close(): Promise<void> {
    if (this.connectionState === "closed") return this.queue;
    this.connectionState = "closed";
    clearTimeout(this.timer);
    const ws = this.ws;
    this.ws = null;
    ws?.close(CloseCode.Normal);
    for (const c of [...this.loaders.values()]) c.close();
    await this.queue;
  }

  /** Resolves when connected with every subscription answered and every followed label's map received. */
  ready(): Promise<void> {
    if (this.synced()) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Follows these labels' version maps too. */
  followVersions(...labels: string[]): void {
    for (const l of labels) {
      if (this.followed.has(l)) continue;
      this.followed.add(l);
      if (this.connectionState === "open") this.subscribeVersions(l);
    }
  }

  /** The version of a label (`all`) or of one of its rows, as last received. */
  version(label: string, identifier?: string): Version | undefined {
    return this.maps.get(label)?.[identifier ?? "all"];
  }

  /** A label's version map as last received. */
  versionMap(label: string): Readonly<VersionData> | undefined {
    return this.maps.get(label);
  }

  /**
   * Registers the loader of a cache: it runs once when the version of `label` (its `all` version, or the row
   * `identifier`'s) is first known, and again whenever that version increases; never twice at once, always
   * with the newest version. One loader per key.
   */
  loader<T>(label: string, load: Loader<T>, options?: LoaderOptions): Cached<T>;
  loader<T>(label: string, identifier: string, load: Loader<T>, options?: LoaderOptions): Cached<T>;
  loader<T>(
    label: string,
    second: string | Loader<T>,
    third?: Loader<T> | LoaderOptions,
    fourth?: LoaderOptions,
  ): Cached<T> {
    const identifier = typeof second === "string" ? second : null;
    const load = (typeof second === "string" ? third : second) as Loader<T>;
    const options = (typeof second === "string" ? fourth : third) as LoaderOptions | undefined;
    if (typeof load !== "function") throw new TypeError("loader(label, [identifier,] load): load must be a function");
    const key = keyOf(label, identifier);
    if (this.loaders.has(key)) {
      throw new Error(`a loader for ${label}${identifier === null ? "" : `/${identifier}`} is registered already`);
    }
    const cached = new Cached<T>(label, identifier, load, options ?? {}, {
      report: (e) => this.fail(new RelayError("loader", `loader of ${label} failed: ${String(e)}`, { label, cause: e })),
      detach: () => this.loaders.delete(key),
    });
    this.loaders.set(key, cached as Cached<unknown>);
    const map = this.maps.get(label);
    if (map && !this.awaitingMaps.has(label)) offer(cached as Cached<unknown>, map, true);
    this.followVersions(label);
    return cached;
  }

  // --- the connection ---------------------------------------------------------------------------------------

  private connect(): void {
    this.connectionState = "connecting";
    let ws: WebSocketLike;
    try {
      ws = new this.WS(this.url);
    } catch (e) {
      this.fail(new RelayError("protocol", `cannot open ${this.url}: ${String(e)}`, { cause: e }));
      this.retry();
      return;
    }
    this.ws = ws;
    let opened = false;
    let ended = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    // Every way a connection ends leads here once. Some implementations (Node 20's) fire only `error`, and
    // no `close`, when a connection fails before opening, so an error counts as the end too.
    const end = (code: number, reason: string) => {
      if (ended) return;
      ended = true;
      clearTimeout(timer);
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      this.enqueue(() => this.closed(ws, code, reason));
    };
    const abandon = (reason: string) => {
      if (ended) return;
      end(ABNORMAL_CLOSE, reason);
      // (Node 20's close() of a connecting socket dispatches `error` at once: the handlers are gone by now.)
      try {
        ws.close();
      } catch {
        // already closing
      }
    };
    timer = setTimeout(() => abandon("not open in time"), this.connectTimeoutMs);
    ws.onopen = () => {
      opened = true;
      clearTimeout(timer);
      // After the messages of the last connection are handled, so the cursor is final.
      this.enqueue(() => this.subscribeAll(ws));
    };
    ws.onmessage = (e) => {
      if (typeof e.data !== "string") return;
      const text = e.data;
      this.enqueue(() => this.handle(text));
    };
    ws.onerror = () => {
      if (!opened) return abandon("connection failed");
      // An open connection's close should follow; if it does not, give up on it.
      clearTimeout(timer);
      timer = setTimeout(() => abandon("no close after an error"), CLOSE_GRACE_MS);
    };
    ws.onclose = (e) => end(e.code, e.reason);
  }

  private closed(ws: WebSocketLike, code: number, reason: string): void {
    if (this.ws !== ws) return; // closed by close(), or superseded
    this.ws = null;
    this.awaitingMaps.clear();
    if (code === CloseCode.TokenRevoked) {
      this.connectionState = "closed";
      this.fail(new RelayError("token_revoked", "the endpoint closed the connection: token revoked"));
      void this.emit("close", this.reportError, { code, reason, retryInMs: null });
      return;
    }
    const delay = this.retry();
    void this.emit("close", this.reportError, { code, reason, retryInMs: delay });
  }

  /** Schedules the next connection attempt; returns its delay. */
  private retry(): number {
    this.connectionState = "waiting";
    const delay = this.backoff.next();
    this.timer = setTimeout(() => {
      if (this.connectionState === "waiting") this.connect();
    }, delay);
    return delay;
  }

  private subscribeAll(ws: WebSocketLike): Promise<void> | void {
    if (this.ws !== ws || this.connectionState !== "connecting") return;
    this.connectionState = "open";
    this.opened += 1;
    this.awaitingMaps.clear();
    // The feed first: the connection's first answer is then the feed's.
    if (this.feed) this.subscribeFeed();
    for (const l of this.followed) this.subscribeVersions(l);
    this.checkSynced();
    return this.emit("open", this.reportError);
  }

  private subscribeFeed(): void {
    if (!this.feed) return;
    this.feedAnswerPending = true;
    this.send({
      op: "subscribe",
      labels: this.feed.labels,
      since: this.resumeAt,
      versions: false,
      changes: true,
      filter: this.feed.filter ?? null,
    });
  }

  private subscribeVersions(label: string): void {
    this.awaitingMaps.add(label);
    this.send({ op: "subscribe", labels: [label], versions: true, changes: false });
  }

  private send(cmd: ClientCommand): void {
    const ws = this.ws;
    if (ws && ws.readyState === 1) ws.send(JSON.stringify(cmd));
  }

  // --- messages ---------------------------------------------------------------------------------------------

  private enqueue(step: () => Promise<void> | void): void {
    this.queue = this.queue.then(step).catch((e: unknown) => this.reportError(e));
  }

  private readonly reportError = (e: unknown): void => {
    this.fail(
      e instanceof RelayError ? e : new RelayError("listener", `a listener failed: ${String(e)}`, { cause: e }),
    );
  };

  private fail(error: RelayError): void {
    // An error nobody listens to is not lost, and must not throw.
    if (!this.has("error")) {
      console.error(error);
      return;
    }
    void this.emit("error", () => {}, error);
  }

  private async handle(text: string): Promise<void> {
    let m: ServerMessage;
    try {
      m = parseServerMessage(text);
    } catch (e) {
      this.fail(new RelayError("protocol", String(e), { cause: e }));
      return;
    }
    if (isVersionMap(m)) {
      await this.onVersions(m);
    } else {
      switch (m.type) {
        case "subscribed":
          await this.onSubscribed(m);
          break;
        case "change":
          await this.onChange(m);
          break;
        case "checkpoint":
          await this.moveCursor(m.cursor, "checkpoint");
          break;
        case "resync":
          await this.onResync(m);
          break;
        case "error":
          await this.onError(m);
          break;
        case "unsubscribed":
          break;
      }
    }
    this.checkSynced();
  }

  private async onSubscribed(m: SubscribedMessage): Promise<void> {
    this.backoff.reset();
    if (!this.feedAnswerPending || !this.feed || !sameLabels(m.labels, this.feed.labels)) return;
    this.feedAnswerPending = false;
    if (this.resumeAt === null && m.cursor !== null) await this.moveCursor(m.cursor, null);
  }

  private async onVersions(m: VersionMapMessage): Promise<void> {
    if (!this.followed.has(m.label)) return;
    const full = this.awaitingMaps.delete(m.label);
    const map: VersionData = full ? { ...m.data } : { ...this.maps.get(m.label), ...m.data };
    this.maps.set(m.label, map);
    for (const c of this.loaders.values()) {
      if (c.label === m.label) offer(c, map, full);
    }
    await this.emit("versions", this.reportError, m.label, map, full);
  }

  private async onChange(m: ChangeMessage): Promise<void> {
    if (!this.feed) return;
    const last = this.lastChange;
    if (last && (m.event_id < last[0] || (m.event_id === last[0] && m.seq <= last[1]))) return;
    await this.emit("change", this.reportError, m);
    this.lastChange = [m.event_id, m.seq];
    await this.moveCursor(m.cursor, null);
  }

  private async moveCursor(cursor: string, checkpoint: "checkpoint" | null): Promise<void> {
    if (cursor === this.resumeAt) return;
    this.resumeAt = cursor;
    if (checkpoint) await this.emit("checkpoint", this.reportError, cursor);
    await this.emit("cursor", this.reportError, cursor);
  }

  private async onResync(m: ResyncMessage): Promise<void> {
    if (!this.feed) return;
    this.resumeAt = null;
    // Positions from now on may be lower (another cluster, a restored server): forget the last one.
    this.lastChange = null;
    this.subscribeFeed();
    await this.emit("resync", this.reportError, m);
  }

  private async onError(m: ErrorMessage): Promise<void> {
    // The feed's subscribe goes first on a connection, so a refusal while it is unanswered is its refusal.
    const answersFeed =
      this.feedAnswerPending && (m.label === undefined || (this.feed?.labels.includes(m.label) ?? false));
    if (answersFeed) this.feedAnswerPending = false;
    if (m.label !== undefined) this.awaitingMaps.delete(m.label);
    this.fail(new RelayError(m.code, m.message, m.label === undefined ? {} : { label: m.label }));
    if (answersFeed && m.code === "bad_cursor") {
      // A stored cursor the server cannot read: as for an expired one, start again from now.
      await this.onResync({ type: "resync", reason: "cursor_invalid", labels: this.feed?.labels ?? [], message: m.message });
    } else if (m.code === "internal" || m.code === "busy") {
      // A subscription was lost on the server's side: a new connection subscribes everything again.
      this.ws?.close(CloseCode.Normal);
    }
  }

  // --- ready() ----------------------------------------------------------------------------------------------

  private synced(): boolean {
    return this.connectionState === "open" && this.awaitingMaps.size === 0 && !this.feedAnswerPending;
  }

  private checkSynced(): void {
    if (!this.synced() || this.waiters.length === 0) return;
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }
}

function sameLabels(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((l) => b.includes(l));
}

/**
 * Offers a loader the version its key has in `map`. A key absent from a full map was never changed (version
 * 0) — or, if it had a version before, its row was evicted from the worker's shared map: then the label's
 * `all` version stands in, as the worker's floor would (a spurious load at worst, never a missed one).
 */
function offer(c: Cached<unknown>, map: VersionData, full: boolean): void {
  const v = map[c.identifier ?? "all"];
  if (v) return c.offer(v);
  if (!full) return;
  if (c.latest === undefined) return c.offer(NO_VERSION);
  if (c.identifier !== null && map.all) c.offer(map.all);
}
