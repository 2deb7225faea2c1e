// The endpoint's protocol, as the README's endpoint section documents it: the commands a client sends over
// `/ws`, every message the server sends back, the close codes, and the JSON bodies of the HTTP endpoints.

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
/** A JSON object (rows, keys, metadata). */
export type JsonObject = { [key: string]: Json };

/** A version: `v` is the event id (commit LSN) of the last change, `ts` its commit time in ms since the epoch. */
export interface Version {
  v: number;
  ts: number;
}

/** A version map's entries: `all` (the label's version) and one per row identifier. */
export type VersionData = Record<string, Version>;

/** A tenant filter: equality on columns, one value or a list of values (compared as text). */
export type Filter = Record<string, string | number | boolean | Array<string | number | boolean>>;

// --- client → server ----------------------------------------------------------------------------------------

export interface SubscribeCommand {
  op: "subscribe";
  labels: string[];
  /** Changes after this cursor; `null` or absent: from now. */
  since?: string | null;
  /** Default true: the label's full version map, then deltas. */
  versions?: boolean;
  /** Default false: every change after `since`, exactly once, in commit order. */
  changes?: boolean;
  filter?: Filter | null;
}

export interface UnsubscribeCommand {
  op: "unsubscribe";
  labels: string[];
}

export type ClientCommand = SubscribeCommand | UnsubscribeCommand;

// --- server → client ----------------------------------------------------------------------------------------

export interface SubscribedMessage {
  type: "subscribed";
  labels: string[];
  /** The subscription's `since`, or the current position (null before the endpoint knows one). */
  cursor: string | null;
}

export interface UnsubscribedMessage {
  type: "unsubscribed";
  labels: string[];
}

/** A label's full version map (first, after subscribing) or a delta of the entries a commit moved. */
export interface VersionMapMessage {
  type?: undefined;
  label: string;
  data: VersionData;
}

export type ChangeOp = "insert" | "update" | "delete" | "truncate";

export interface ChangeMessage {
  type: "change";
  /** The position right after this change: resume from it. */
  cursor: string;
  event_id: number;
  seq: number;
  ts: number;
  xid: number;
  label: string;
  /** `schema.table` */
  table: string;
  op: ChangeOp;
  identifier: string | null;
  key: JsonObject | null;
  new: JsonObject | null;
  old: JsonObject | null;
  metadata: JsonObject | null;
}

export interface CheckpointMessage {
  type: "checkpoint";
  cursor: string;
}

/**
 * `cursor_expired` and `cursor_foreign` come from the server; `cursor_invalid` is this client's own, when
 * the server refused a stored cursor as malformed (`bad_cursor`).
 */
export type ResyncReason = "cursor_expired" | "cursor_foreign" | "cursor_invalid";

export interface ResyncMessage {
  type: "resync";
  reason: ResyncReason;
  /** The labels of the change subscription concerned (WebSocket). */
  labels?: string[];
  message: string;
}

export type ErrorCode =
  | "bad_json"
  | "unknown_op"
  | "unknown_label"
  | "forbidden"
  | "bad_cursor"
  | "bad_filter"
  | "too_large"
  | "busy"
  | "internal";

export interface ErrorMessage {
  type: "error";
  code: ErrorCode;
  /** Set when one label is at fault. */
  label?: string;
  message: string;
}

export type ServerMessage =
  | SubscribedMessage
  | UnsubscribedMessage
  | VersionMapMessage
  | ChangeMessage
  | CheckpointMessage
  | ResyncMessage
  | ErrorMessage;

/** WebSocket close codes the endpoint uses. */
export const CloseCode = {
  Normal: 1000,
  ShuttingDown: 1001,
  ProtocolError: 1002,
  BinaryMessage: 1003,
  InvalidUtf8: 1007,
  MessageTooLarge: 1009,
  NoPong: 1011,
  SlowClient: 4001,
  TokenRevoked: 4003,
} as const;

export class ProtocolError extends Error {
  override name = "ProtocolError";
}

const isObject = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);

/** Whether a server message is a version map or delta (the one message without `type`). */
export function isVersionMap(m: ServerMessage): m is VersionMapMessage {
  return m.type === undefined;
}

/** Parses one text message of the server; throws {@link ProtocolError} for anything the protocol does not know. */
export function parseServerMessage(text: string): ServerMessage {
  let m: unknown;
  try {
    m = JSON.parse(text);
  } catch (e) {
    throw new ProtocolError(`server message is not JSON: ${String(e)}`);
  }
  if (!isObject(m)) throw new ProtocolError("server message is not a JSON object");
  if (m.type === undefined) {
    if (typeof m.label === "string" && isObject(m.data)) return m as unknown as VersionMapMessage;
    throw new ProtocolError("message without type is not a version map");
  }
  switch (m.type) {
    case "change":
      if (typeof m.cursor === "string" && typeof m.label === "string") return m as unknown as ChangeMessage;
      break;
    case "checkpoint":
      if (typeof m.cursor === "string") return m as unknown as CheckpointMessage;
      break;
    case "subscribed":
    case "unsubscribed":
      if (Array.isArray(m.labels)) return m as unknown as SubscribedMessage | UnsubscribedMessage;
      break;
    case "resync":
    case "error":
      if (typeof m.message === "string") return m as unknown as ResyncMessage | ErrorMessage;
      break;
  }
  throw new ProtocolError(`unexpected server message of type ${JSON.stringify(m.type)}`);
}

// --- HTTP bodies --------------------------------------------------------------------------------------------

/** `GET /health` (200 while the worker consumes its slot, else 503). */
export interface HealthResponse {
  status: "ok" | "unavailable";
  state: string;
  consuming: boolean;
  last_event_id: number;
  lag_bytes: number;
  clients: number;
}

/** `GET /status` (token required): what the dashboard shows. */
export interface StatusResponse {
  worker: {
    state: string;
    consuming: boolean;
    last_event_id: number;
    lag_bytes: number;
    cursor: string | null;
  };
  clients: {
    connections: number;
    unauthenticated: number;
    websocket: number;
    sse: number;
    long_poll: number;
    worker_requests: number;
  };
  /** Labels this token may read. */
  labels: string[];
  /** Running totals since the endpoint started. */
  totals: { batches: number; changes: number; messages_sent: number; bytes_sent: number };
  uptime_ms: number;
}

/** `GET /changes` (long-poll). */
export interface LongPollResponse {
  changes: ChangeMessage[];
  cursor: string | null;
}

/** The body of a 4xx/5xx answer (410 is a resync body without `code`). */
export interface HttpErrorBody {
  type: "error";
  code: string;
  message: string;
}
