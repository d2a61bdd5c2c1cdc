/**
 * Small pure helpers for timing and scrolling: reconnect back-off and the visible window of
 * the virtualised node list.
 */

export interface IBackoffOptions {
  /** First delay, ms. */
  base?: number;
  /** Ceiling, ms. */
  max?: number;
  factor?: number;
  /** Fraction of the delay taken off at random, 0..1, so that many tabs do not retry in step. */
  jitter?: number;
}

/**
 * The delay before reconnect attempt number `attempt` (0 for the first retry):
 * base * factor^attempt, capped at max, less up to `jitter` of itself.
 */
export function backoffDelay(
  attempt: number,
  options: IBackoffOptions = {},
  random: () => number = Math.random
): number {
  const base = options.base ?? 1000;
  const max = options.max ?? 30000;
  const factor = options.factor ?? 2;
  const jitter = Math.min(1, Math.max(0, options.jitter ?? 0.2));
  const exp = Math.min(max, base * Math.pow(factor, Math.max(0, attempt)));
  return Math.round(exp * (1 - jitter * random()));
}

export interface IRange {
  /** First row index to render. */
  start: number;
  /** One past the last row index to render. */
  end: number;
}

/**
 * Rows to render for a list with fixed row height: those in the viewport plus `overscan`
 * on each side, so that fast scrolling does not show blank space for a frame.
 */
export function visibleRange(
  scrollTop: number,
  viewportHeight: number,
  rowHeight: number,
  count: number,
  overscan = 4
): IRange {
  if (count <= 0 || !(rowHeight > 0)) {
    return { start: 0, end: 0 };
  }
  const top = Math.max(0, scrollTop);
  const first = Math.floor(top / rowHeight);
  const last = Math.ceil((top + Math.max(0, viewportHeight)) / rowHeight);
  const start = Math.max(0, Math.min(count, first - overscan));
  const end = Math.max(start, Math.min(count, last + overscan));
  return { start, end };
}
