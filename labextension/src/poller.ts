/**
 * A section's refresh while the sidebar is shown: `tick` at once on `start`, then every
 * `ms` until `stop`. Starting twice keeps one timer.
 */
export class Poller {
  constructor(
    private readonly _tick: () => Promise<void>,
    private readonly _ms: number
  ) {}

  start(): void {
    if (this._timer !== null) {
      return;
    }
    void this._tick();
    this._timer = window.setInterval(() => void this._tick(), this._ms);
  }

  stop(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  private _timer: number | null = null;
}
