// The cache pattern: a loader for one key (a label's `all` version, or one row identifier's version) that runs
// once when the first version is known and again whenever that version increases: never for a repeat or an
// older version, never twice at once, and always with the newest version known when it starts (versions that
// arrive during a run are coalesced into one more run). A failed run is retried with backoff.

import { Backoff, type BackoffOptions } from "./backoff.js";
import type { Version } from "./protocol.js";

export interface LoadContext {
  label: string;
  /** `null`: the label's `all` version. */
  identifier: string | null;
}

/** Loads what a cache holds for this version; may return a promise. */
export type Loader<T> = (version: Version, context: LoadContext) => T | Promise<T>;

export interface LoaderOptions {
  /** Delays between retries of a failing loader (default 250 ms doubling to 10 s). */
  retry?: BackoffOptions;
}

/** What `ChangeRelay.loader()` returns: the newest value loaded, and when it changes. */
export class Cached<T> {
  readonly label: string;
  readonly identifier: string | null;
  private readonly load: Loader<T>;
  private readonly failures: Backoff;
  private readonly report: (error: unknown) => void;
  private readonly detach: () => void;
  private latestVersion: Version | undefined;
  private loadedVersion: Version | undefined;
  private current: T | undefined;
  private running = false;
  private closed = false;
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly listeners = new Set<(value: T, version: Version) => void>();
  private waiters: Array<(value: T) => void> = [];

  /** @internal Made by `ChangeRelay.loader()`. */
  constructor(
    label: string,
    identifier: string | null,
    load: Loader<T>,
    options: LoaderOptions,
    hooks: { report: (error: unknown) => void; detach: () => void },
  ) {
    this.label = label;
    this.identifier = identifier;
    this.load = load;
    this.failures = new Backoff(options.retry);
    this.report = hooks.report;
    this.detach = hooks.detach;
  }

  /** The value of the last successful load (undefined before the first). */
  get value(): T | undefined {
    return this.current;
  }

  /** The version the current value was loaded for. */
  get version(): Version | undefined {
    return this.loadedVersion;
  }

  /** The newest version known for this key (the value may still be loading it). */
  get latest(): Version | undefined {
    return this.latestVersion;
  }

  /** Whether a load is running now. */
  get loading(): boolean {
    return this.running;
  }

  /** Resolves with the value once the first load succeeded (at once when it has). */
  ready(): Promise<T> {
    if (this.loadedVersion !== undefined) return Promise.resolve(this.current as T);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Calls `listener` after every successful load; returns the function that removes it. */
  onLoad(listener: (value: T, version: Version) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Stops: no further loads (one running finishes, its value is dropped). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.listeners.clear();
    this.detach();
  }

  /** @internal The relay offers every version it learns for this key; only an increase leads to a load. */
  offer(version: Version): void {
    if (this.closed) return;
    if (this.latestVersion !== undefined && version.v <= this.latestVersion.v) return;
    this.latestVersion = version;
    this.kick();
  }

  private kick(): void {
    if (this.running || this.closed || this.retryTimer !== undefined) return;
    const version = this.latestVersion;
    if (version === undefined) return;
    if (this.loadedVersion !== undefined && this.loadedVersion.v >= version.v) return;
    this.running = true;
    void this.run(version);
  }

  private async run(version: Version): Promise<void> {
    try {
      const value = await this.load(version, { label: this.label, identifier: this.identifier });
      if (this.closed) return;
      this.current = value;
      this.loadedVersion = version;
      this.failures.reset();
      const waiters = this.waiters;
      this.waiters = [];
      for (const w of waiters) w(value);
      for (const l of [...this.listeners]) {
        try {
          l(value, version);
        } catch (e) {
          this.report(e);
        }
      }
    } catch (e) {
      if (this.closed) return;
      this.report(e);
      this.retryTimer = setTimeout(() => {
        this.retryTimer = undefined;
        this.kick();
      }, this.failures.next());
    } finally {
      this.running = false;
    }
    this.kick();
  }
}
