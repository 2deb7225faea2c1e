// The built client (dist/) in headless Chromium, on a page served from another origin that the cluster allows
// (changerelay.allowed_origins), against the cluster of `make test-clients`.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { launchChromium, pageProblems, servePage } from "./helpers.mjs";
import { changesAcrossRestart, loaderSemantics, pageDriver } from "./scenarios.mjs";

let browser;
let site;

before(async () => {
  site = await servePage();
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  await site?.close();
});

async function openPage() {
  const page = await browser.context.newPage();
  const problems = pageProblems(page);
  await page.goto(site.url);
  await page.waitForFunction(() => document.title === "ready");
  return { page, problems };
}

test("Chromium: a change feed across a worker restart, nothing missed or repeated", { timeout: 90_000 }, async () => {
  const { page, problems } = await openPage();
  await changesAcrossRestart(pageDriver(page));
  assert.deepEqual(problems, []);
  await page.close();
});

test("Chromium: loaders run at start and on increase, not on repeats, never overlapping", { timeout: 90_000 }, async () => {
  const { page, problems } = await openPage();
  await loaderSemantics(pageDriver(page));
  assert.deepEqual(problems, []);
  await page.close();
});
