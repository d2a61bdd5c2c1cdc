/**
 * A section's refresh while the sidebar is shown: `tick` at once on `start` (unless the caller
 * has just fetched itself: `start(false)`), then every `ms` until `stop`. Starting twice keeps
 * one timer.
 */
export class Poller {
  constructor(
    private readonly _tick: () => Promise<void>,
    private readonly _ms: number
  ) {}

  /** Whether it is polling (started and not stopped since). */
  get running(): boolean {
    return this._timer !== null;
  }

  start(now = true): void {
    if (this._timer !== null) {
      return;
    }
    if (now) {
      void this._tick();
    }
    this._timer = setInterval(() => void this._tick(), this._ms);
  }

  stop(): void {
    if (this._timer !== null) {
      clearInterval(this._timer);
      this._timer = null;
    }
  }

  // The browser's timer (a number) or Node's (an object, in the unit tests).
  private _timer: ReturnType<typeof setInterval> | null = null;
}
