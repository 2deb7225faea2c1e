// The dashboard the endpoint serves at `/`, in headless Chromium: a token typed in, labels whose `all` version
// moves after a commit, the worker's state, the clients, the throughput sparkline; no script error and no
// Content-Security-Policy violation. Leaves a screenshot in PGCR_CLIENTS_OUT (docs/dashboard.png is one).

import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { after, before, test } from "node:test";

import {
  ENDPOINT,
  OUT,
  applied,
  currentCursor,
  launchChromium,
  makeToken,
  pageProblems,
  sleep,
  sqlEach,
  trackedTable,
  version,
  waitFor,
} from "./helpers.mjs";

let browser;

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
});

test("dashboard: versions moving live, worker state, clients, throughput", { timeout: 90_000 }, async () => {
  const tables = [];
  for (const name of ["parameters", "prices", "feature_flags"]) {
    const t = await trackedTable(name);
    await sqlEach([`INSERT INTO ${t.table} SELECT 'k' || g, 'v' FROM generate_series(1, 20) g`]);
    tables.push(t);
  }
  const labels = tables.map((t) => t.label);
  await waitFor(async () => (await Promise.all(labels.map((l) => version(l, "k20")))).every(Boolean),
    { what: "the first versions" });
  const token = await makeToken(labels, false);

  const page = await browser.context.newPage();
  const problems = pageProblems(page);
  await page.goto(`${ENDPOINT}/`);
  await page.fill("#token", token);
  await page.click("#connect");

  const { table, label } = tables[0];
  const cell = page.locator(`tr[data-label="${label}"] td.version`);
  const shown = async () => (await cell.count()) > 0 && (await cell.textContent());
  const v1 = await version(label);
  await waitFor(async () => (await shown()) === String(v1), { what: `the page to show ${label} at ${v1}` });

  // A commit moves the label's `all` version on the page, pushed over the WebSocket.
  const since = await currentCursor();
  await sqlEach([`UPDATE ${table} SET v = 'moved' WHERE id = 'k1'`]);
  const v2 = await applied(since, label, 1);
  assert.ok(v2 > v1);
  await waitFor(async () => (await shown()) === String(v2), { timeout: 5_000, what: `the page to show ${v2}` });

  assert.equal(await page.textContent("#worker-state"), "streaming");
  await waitFor(async () => Number(await page.textContent("#clients-websocket")) >= 1,
    { what: "the page's own WebSocket among the clients" });
  assert.equal(await page.locator("#labels tr").count(), 3, "the token's three labels");
  assert.equal(await page.textContent(`tr[data-label="${label}"] td.rows`), "20", "the rows of its map");

  // Some load for the sparkline: eight seconds of commits on every label, in waves.
  for (let i = 0; i < 24; i++) {
    const rows = [1, 2, 3, 4, 5, 6].slice(0, 1 + Math.round(2.5 + 2.5 * Math.sin(i / 3)));
    await sqlEach(tables.flatMap((t) => rows.map((k) => `UPDATE ${t.table} SET v = 'w${i}' WHERE id = 'k${k + (i % 14)}'`)));
    await sleep(250);
  }
  await waitFor(async () => Number(/peak ([\d.]+)/.exec(await page.textContent("#throughput-caption"))?.[1]) > 0,
    { what: "a peak of changes per second" });
  for (const t of tables) {
    const cell = page.locator(`tr[data-label="${t.label}"] td.version`);
    await waitFor(async () => (await cell.textContent()) === String(await version(t.label)),
      { timeout: 10_000, what: `${t.label} at its version` });
  }
  assert.ok((await page.locator("#throughput polyline").count()) === 1, "a sparkline");

  // The token stays in this browser, never in the address.
  assert.ok(!page.url().includes(token));
  assert.equal(await page.evaluate(() => sessionStorage.getItem("changerelay.dashboard.token")), token);
  assert.equal(await page.evaluate(() => localStorage.getItem("changerelay.dashboard.token")), null);

  await mkdir(OUT, { recursive: true });
  await page.setViewportSize({ width: 1200, height: 560 });
  await page.screenshot({ path: join(OUT, "dashboard.png"), fullPage: true });
  assert.deepEqual(problems, [], "no script error, no CSP violation");
  await page.close();
});
