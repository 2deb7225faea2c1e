// A ChangeRelay with every event recorded, and loaders that record each run (version, start, end, overlap).
// The same module runs in Node and in the browser test page; state() is plain JSON for page.evaluate().

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * options: { url, token, changes?, loaders?: [{ label, identifier?, delayMs? }] }
 */
export function startHarness(ChangeRelay, { loaders = [], ...options }) {
  const h = {
    changes: [], checkpoints: [], errors: [], opens: 0, closes: [], resyncs: [], runs: {}, active: {}, maxActive: {},
  };
  const relay = new ChangeRelay({ ...options, backoff: { initialMs: 100, maxMs: 1000 } });
  relay.on("change", (c) => {
    h.changes.push({ id: (c.new ?? c.key)?.id ?? null, cursor: c.cursor, event_id: c.event_id, seq: c.seq, op: c.op });
  });
  relay.on("open", () => {
    h.opens += 1;
  });
  relay.on("close", (info) => h.closes.push(info));
  relay.on("checkpoint", (cursor) => h.checkpoints.push(cursor));
  relay.on("error", (e) => h.errors.push({ code: e.code, message: e.message }));
  relay.on("resync", (m) => h.resyncs.push(m));
  for (const { label, identifier, delayMs = 0 } of loaders) {
    const key = identifier ? `${label}/${identifier}` : label;
    h.runs[key] = [];
    h.active[key] = 0;
    h.maxActive[key] = 0;
    const load = async (version) => {
      h.active[key] += 1;
      h.maxActive[key] = Math.max(h.maxActive[key], h.active[key]);
      const run = { v: version.v, started: Date.now(), ended: null };
      h.runs[key].push(run);
      await sleep(delayMs);
      run.ended = Date.now();
      h.active[key] -= 1;
      return version.v;
    };
    if (identifier) relay.loader(label, identifier, load);
    else relay.loader(label, load);
  }
  relay.start();
  return {
    relay,
    ready: () => relay.ready(),
    close: () => relay.close(),
    state: () =>
      JSON.parse(JSON.stringify({ ...h, cursor: relay.cursor, state: relay.state, connections: relay.connections })),
  };
}
