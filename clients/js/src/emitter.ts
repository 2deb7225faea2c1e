// A small typed event emitter: listeners per event name, each removable by the function `on` returns.

type Listener = (...args: never[]) => unknown;

export class Emitter<Events extends { [E in keyof Events]: Listener }> {
  private readonly listeners = new Map<keyof Events, Set<Listener>>();

  /** Adds a listener; returns the function that removes it. */
  on<E extends keyof Events>(event: E, listener: Events[E]): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener);
    return () => set.delete(listener);
  }

  /**
   * Calls every listener of `event` in order, awaiting those that return a promise. A listener that throws
   * is reported to `onError` and the others still run.
   */
  protected async emit<E extends keyof Events>(
    event: E,
    onError: (e: unknown) => void,
    ...args: Parameters<Events[E]>
  ): Promise<void> {
    for (const l of [...(this.listeners.get(event) ?? [])]) {
      try {
        await (l as (...a: unknown[]) => unknown)(...args);
      } catch (e) {
        onError(e);
      }
    }
  }

  protected has(event: keyof Events): boolean {
    return (this.listeners.get(event)?.size ?? 0) > 0;
  }
}
