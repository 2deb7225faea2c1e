// The two scenarios every client runs against the real cluster, in Node and in Chromium alike: a change feed
// followed across a relay worker restart (nothing missed, nothing twice), and the loader semantics (a run at
// start, on every increase and never on a repeat, never two at once, always the newest version).
//
// A driver starts a harness (harness.mjs) where the client runs and reads its state:
//   { start(options): Promise<void> (resolves once the client is ready), state(): Promise<State>, close() }

import assert from "node:assert/strict";

import { startHarness } from "./harness.mjs";
import {
  ENDPOINT,
  applied,
  currentCursor,
  foreignCursor,
  history,
  lit,
  makeToken,
  restartWorker,
  sleep,
  sqlEach,
  trackedTable,
  version,
  waitFor,
} from "./helpers.mjs";

export function nodeDriver(ChangeRelay) {
  let h = null;
  return {
    async start(options) {
      h = startHarness(ChangeRelay, { url: ENDPOINT, ...options });
      await h.ready();
    },
    state: async () => h.state(),
    close: async () => h?.close(),
  };
}

export function pageDriver(page) {
  return {
    async start(options) {
      await page.evaluate(async (o) => {
        window.h = window.startHarness(o);
        await window.h.ready();
      }, { url: ENDPOINT, ...options });
    },
    state: () => page.evaluate(() => window.h.state()),
    close: () => page.evaluate(() => window.h?.close()),
  };
}

const inserts = (table, from, to) =>
  Array.from({ length: to - from + 1 }, (_, i) => `INSERT INTO ${table} VALUES (${lit(String(from + i))}, 'x')`);

/** Changes from a cursor, a worker restart with commits while it is down, more changes: each exactly once. */
export async function changesAcrossRestart(driver) {
  const { table, label } = await trackedTable();
  const token = await makeToken([label], true);
  const start = await currentCursor();
  await driver.start({ token, changes: { labels: [label], cursor: start } });
  const count = async (n) => {
    try {
      await waitFor(async () => (await driver.state()).changes.length >= n, { timeout: 20_000, what: `${n} changes` });
    } catch (e) {
      const s = await driver.state();
      throw new Error(`${e.message}; ${s.changes.length} changes, state ${s.state}, closes ${JSON.stringify(s.closes)}, ` +
        `errors ${JSON.stringify(s.errors)}`);
    }
  };

  await sqlEach(inserts(table, 1, 15));
  await count(15);
  await restartWorker({ whileDown: () => sqlEach(inserts(table, 16, 30)) });
  await sqlEach(inserts(table, 31, 45));
  await count(45);
  // A last change: anything repeated would have come before it.
  await sqlEach(inserts(table, 46, 46));
  await count(46);
  await sleep(200);

  const s = await driver.state();
  const expected = Array.from({ length: 46 }, (_, i) => String(i + 1));
  assert.deepEqual(s.changes.map((c) => c.id), expected, "every committed row exactly once, in commit order");
  const truth = await history(start, label);
  assert.deepEqual(s.changes.map((c) => c.cursor), truth.map((t) => t.cursor), "the cursors of changerelay.changes()");
  assert.equal(s.cursor, truth.at(-1).cursor, "the client's cursor is the last change's");
  assert.ok(s.connections >= 2, `reconnected (${s.connections} connections)`);
  assert.ok(s.closes.some((c) => c.code === 1001 && c.retryInMs !== null), JSON.stringify(s.closes));
  assert.deepEqual(s.errors, []);
  assert.deepEqual(s.resyncs, []);
  await driver.close();
}

/** Loaders of a label's `all` and of one row, slow enough to overlap if they could. */
export async function loaderSemantics(driver) {
  const { table, label } = await trackedTable();
  await sqlEach([`INSERT INTO ${table} VALUES ('k1', 'a'), ('k2', 'b')`]);
  await waitFor(() => version(label, "k2"), { what: "the first versions" });
  const token = await makeToken([label], false);
  const all = label;
  const k1 = `${label}/k1`;
  await driver.start({
    token,
    loaders: [
      { label, delayMs: 300 },
      { label, identifier: "k1", delayMs: 300 },
    ],
  });
  const settled = (key, n, v) =>
    waitFor(async () => {
      const runs = (await driver.state()).runs[key];
      return runs.length >= n && runs.every((r) => r.ended !== null) && (v === undefined || runs.at(-1).v === v);
    }, { timeout: 20_000, what: `${key}: ${n} runs${v === undefined ? "" : ` ending with version ${v}`}` });

  // At start: once each, with the versions the database has.
  await settled(all, 1, await version(label));
  await settled(k1, 1, await version(label, "k1"));

  // Another row moves `all` but not k1.
  let since = await currentCursor();
  await sqlEach([`UPDATE ${table} SET v = 'B' WHERE id = 'k2'`]);
  await settled(all, 2, await applied(since, label, 1));
  await sleep(300);
  assert.equal((await driver.state()).runs[k1].length, 1, "k1's version did not move");

  // A burst of five k1 updates while its loader is busy: coalesced, newest version last, never overlapping.
  since = await currentCursor();
  await sqlEach([1, 2, 3, 4, 5].map((i) => `UPDATE ${table} SET v = 'a${i}' WHERE id = 'k1'`));
  const final = await applied(since, label, 5);
  await settled(k1, 2, final);
  await settled(all, 3, final);
  const burst = (await driver.state()).runs[k1].length - 1;
  assert.ok(burst === 1 || burst === 2, `five versions in 300 ms coalesced into ${burst} runs, not one each`);

  // Repeats: after a worker restart the client reconnects and gets the same versions again; nothing runs.
  let s = await driver.state();
  const before = { all: s.runs[all].length, k1: s.runs[k1].length, connections: s.connections };
  await restartWorker();
  await waitFor(async () => (await driver.state()).connections > before.connections, { what: "a reconnection" });
  await sleep(600);
  s = await driver.state();
  assert.equal(s.runs[all].length, before.all, "no run for the versions repeated after reconnecting");
  assert.equal(s.runs[k1].length, before.k1, "no run for k1's repeated version");

  // And it goes on after the restart.
  since = await currentCursor();
  await sqlEach([`UPDATE ${table} SET v = 'z' WHERE id = 'k1'`]);
  await settled(k1, before.k1 + 1, await applied(since, label, 1));

  s = await driver.state();
  for (const key of [all, k1]) {
    const vs = s.runs[key].map((r) => r.v);
    assert.deepEqual(vs, [...vs].sort((a, b) => a - b), `${key}: versions only grow`);
    assert.equal(new Set(vs).size, vs.length, `${key}: never twice for one version`);
    assert.equal(s.maxActive[key], 1, `${key}: never two runs at once`);
    for (let i = 1; i < s.runs[key].length; i++) {
      assert.ok(s.runs[key][i].started >= s.runs[key][i - 1].ended, `${key}: run ${i} started after ${i - 1} ended`);
    }
  }
  assert.deepEqual(s.errors, []);
  await driver.close();
}

/**
 * A cursor of another cluster: the client is told to resync, subscribes again from now and goes on; then, idle,
 * its cursor moves with the checkpoints, and a client resuming from a checkpoint gets exactly what followed.
 */
export async function resyncFromAForeignCursor(driver, anotherDriver) {
  const { table, label } = await trackedTable();
  const token = await makeToken([label], true);
  await driver.start({ token, changes: { labels: [label], cursor: foreignCursor(await currentCursor()) } });
  await waitFor(async () => (await driver.state()).resyncs.length === 1 && (await driver.state()).cursor !== null,
    { what: "a resync, then a cursor from now" });
  await sqlEach(inserts(table, 1, 1));
  await waitFor(async () => (await driver.state()).changes.length === 1, { what: "the change after the resync" });
  const s = await driver.state();
  assert.equal(s.resyncs[0].reason, "cursor_foreign");
  assert.deepEqual(s.resyncs[0].labels, [label]);
  assert.deepEqual(s.changes.map((c) => c.id), ["1"]);
  assert.deepEqual(s.errors, []);

  // Idle: a checkpoint (5 to 10 s after the last change) moves the cursor past it.
  await waitFor(async () => (await driver.state()).checkpoints.length > 0, { timeout: 12_000, what: "a checkpoint" });
  const idle = await driver.state();
  assert.equal(idle.cursor, idle.checkpoints.at(-1));
  assert.notEqual(idle.cursor, idle.changes[0].cursor);
  await driver.close();
  await sqlEach(inserts(table, 2, 3));
  await anotherDriver.start({ token, changes: { labels: [label], cursor: idle.cursor } });
  await waitFor(async () => (await anotherDriver.state()).changes.length >= 2, { what: "the changes after the checkpoint" });
  await sleep(200);
  assert.deepEqual((await anotherDriver.state()).changes.map((c) => c.id), ["2", "3"]);
  await anotherDriver.close();
}
