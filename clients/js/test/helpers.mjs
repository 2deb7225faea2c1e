// Test support: the cluster `make test-clients` started (PGCR_CLIENTS_PORT; its endpoint at +1000, the browser
// tests' page server at +2000), SQL through the host's psql, waiting for conditions, and Chromium.

import { execFile } from "node:child_process";
import { mkdtemp, rm, readFile } from "node:fs/promises";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);

export const PORT = Number(process.env.PGCR_CLIENTS_PORT ?? 5488);
export const EP = PORT + 1000;
export const PAGE_PORT = PORT + 2000;
export const ENDPOINT = `http://127.0.0.1:${EP}`;
/** Where tests leave files (the dashboard's screenshot). */
export const OUT = process.env.PGCR_CLIENTS_OUT ?? join(tmpdir(), "pgcr-clients");
export const JS_ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");

/** A SQL literal. */
export function lit(value) {
  if (value === null || value === undefined) return "NULL";
  if (Array.isArray(value)) return `ARRAY[${value.map(lit).join(",")}]::text[]`;
  if (typeof value === "number" || typeof value === "boolean") return String(value);
  return `'${String(value).replaceAll("'", "''")}'`;
}

/** The host's psql on the cluster, each `-c` statement in a transaction of its own; its rows unaligned. */
async function psql(statements) {
  const { stdout } = await run(
    "psql",
    ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", String(PORT), "-U", "postgres",
      "-d", "postgres", ...statements.flatMap((s) => ["-c", s])],
    { timeout: 30_000 },
  );
  return stdout.split("\n").filter((l) => l !== "");
}

/** Runs one statement and returns the first column of each row, as text. */
export const sql = (query) => psql([query]);

/** Runs each statement in a transaction of its own, in one psql session. */
export async function sqlEach(statements) {
  await psql(statements);
}

export async function sqlValue(query) {
  return (await sql(query))[0] ?? null;
}

/** Waits until `fn()` returns something truthy (which it returns), or fails after `timeout` ms. */
export async function waitFor(fn, { timeout = 15_000, interval = 25, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await sleep(interval);
  }
  throw new Error(`timed out after ${timeout} ms waiting for ${what}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let prepared = null;
/** The extension, created once, and the worker's endpoint answering /health. */
export function prepare() {
  prepared ??= (async () => {
    await sql("CREATE EXTENSION IF NOT EXISTS pg_changerelay");
    await waitFor(healthy, { timeout: 30_000, what: `the endpoint on ${EP} reporting 200 /health` });
  })();
  return prepared;
}

let tables = 0;
/** A fresh table `(id text PRIMARY KEY, v text)` tracked under a fresh label (`name` and a suffix). */
export async function trackedTable(name = "jl") {
  const suffix = `${Date.now().toString(36).slice(-5)}${++tables}`;
  const table = `js_${name}_${suffix}`;
  const label = `${name}_${suffix}`;
  await prepare();
  await sql(`CREATE TABLE ${table} (id text PRIMARY KEY, v text)`);
  await sql(`SELECT changerelay.track(${lit(table)}, ${lit(label)})`);
  return { table, label };
}

/** A token for `labels`, once the endpoint accepts it. */
export async function makeToken(labels, rows = false) {
  const name = `jt_${process.pid}_${Date.now().toString(36)}_${++tables}`;
  const secret = await sqlValue(`SELECT changerelay.create_token(${lit(name)}, ${lit(labels)}, ${rows})`);
  await waitFor(async () => (await fetch(`${ENDPOINT}/status`, { headers: { Authorization: `Bearer ${secret}` } })).status === 200,
    { what: "the new token to reach the endpoint" });
  return secret;
}

export async function version(label, identifier = null) {
  const v = await sqlValue(`SELECT changerelay.version(${lit(label)}, ${lit(identifier)})`);
  return v === null ? null : Number(v);
}

export async function currentCursor() {
  return sqlValue("SELECT changerelay.current_cursor()");
}

/** changerelay.changes() of one label after `since`: [{cursor, id}] in commit order. */
export async function history(since, label) {
  const rows = await sql(
    `SELECT cursor || ' ' || (new->>'id') FROM changerelay.changes(${lit(since)}, ${lit([label])}, 10000)`,
  );
  return rows.map((r) => {
    const [cursor, id] = r.split(" ");
    return { cursor, id };
  });
}

/** Waits for `n` changes of `label` after `since` in the history; the event id (the version) of the last. */
export async function applied(since, label, n) {
  const ids = await waitFor(async () => {
    const rows = await sql(`SELECT event_id FROM changerelay.changes(${lit(since)}, ${lit([label])}, 10000)`);
    return rows.length >= n && rows;
  }, { what: `${n} changes of ${label}` });
  return Number(ids.at(-1));
}

/** The cursor with another cluster's system id (and a valid checksum): the server answers it with a resync. */
export function foreignCursor(cursor, systemId = 12345n) {
  const raw = Buffer.from(cursor.slice(4), "base64url");
  raw.writeBigUInt64BE(BigInt(systemId), 1);
  let a = 0;
  let b = 0;
  for (const x of raw.subarray(0, raw.length - 2)) {
    a = (a + x) % 255;
    b = (b + a) % 255;
  }
  raw.writeUInt16BE((b << 8) | a, raw.length - 2);
  return `cr1_${raw.toString("base64url")}`;
}

async function workerPid() {
  return sqlValue("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'");
}

export async function healthy() {
  try {
    return (await fetch(`${ENDPOINT}/health`)).status === 200;
  } catch {
    return false;
  }
}

/** pg_terminate_backend() of the relay worker; resolves once it runs again with its endpoint healthy. */
export async function restartWorker({ whileDown } = {}) {
  const pid = await waitFor(workerPid, { what: "the relay worker" });
  await sql(`SELECT pg_terminate_backend(${pid})`);
  if (whileDown) await whileDown();
  await waitFor(async () => {
    const now = await workerPid();
    return now && now !== pid;
  }, { timeout: 30_000, what: "a new relay worker" });
  await waitFor(healthy, { timeout: 30_000, what: "the endpoint back" });
}

// --- the browser ----------------------------------------------------------------------------------------------

/** Debian's chromium, headless, driven by playwright-core: nothing is downloaded, a fresh profile each time. */
export async function launchChromium() {
  const { chromium } = await import("playwright-core");
  const profile = await mkdtemp(join(tmpdir(), "pgcr-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-quic",
    ],
    viewport: { width: 1200, height: 820 },
    timeout: 60_000,
  });
  return {
    context,
    async close() {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/** Watches a page for script errors and Content-Security-Policy violations. */
export function pageProblems(page) {
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && !/Failed to load resource|WebSocket connection to/.test(m.text())) {
      problems.push(`console error: ${m.text()}`);
    }
  });
  return problems;
}

const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".map": "application/json" };

/** Serves the browser test page and the built client (dist/) on 127.0.0.1:PAGE_PORT, an allowed origin. */
export async function servePage() {
  const files = { "/": join(JS_ROOT, "test", "page.html"), "/test/harness.mjs": join(JS_ROOT, "test", "harness.mjs") };
  const server = createServer(async (req, res) => {
    const path = new URL(req.url ?? "/", "http://x").pathname;
    const file = files[path] ?? (path.startsWith("/dist/") ? join(JS_ROOT, normalize(path)) : null);
    try {
      if (!file || !file.startsWith(JS_ROOT)) throw new Error("not found");
      const body = await readFile(file);
      res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(PAGE_PORT, "127.0.0.1", resolve);
  });
  return {
    url: `http://127.0.0.1:${PAGE_PORT}/`,
    close: () => new Promise((r) => server.close(r)),
  };
}
