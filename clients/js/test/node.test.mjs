// The built client (dist/) in Node 20 (run with --experimental-websocket) against the cluster of `make test-clients`.

import { test } from "node:test";

import { ChangeRelay } from "../dist/index.js";
import { changesAcrossRestart, loaderSemantics, nodeDriver, resyncFromAForeignCursor } from "./scenarios.mjs";

test("Node: a change feed across a worker restart, nothing missed or repeated", { timeout: 90_000 }, async () => {
  await changesAcrossRestart(nodeDriver(ChangeRelay));
});

test("Node: loaders run at start and on increase, not on repeats, never overlapping", { timeout: 90_000 }, async () => {
  await loaderSemantics(nodeDriver(ChangeRelay));
});

test("Node: resync from a cursor of another cluster, then checkpoints while idle", { timeout: 30_000 }, async () => {
  await resyncFromAForeignCursor(nodeDriver(ChangeRelay), nodeDriver(ChangeRelay));
});
