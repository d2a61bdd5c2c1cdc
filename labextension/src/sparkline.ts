/**
 * SVG path data for the small line charts in the node detail view. Pure string maths: the
 * DOM code only sets the `d` attribute of a `<path>`.
 *
 * The x axis is time, not sample index, so a node that was away for three minutes shows a
 * gap instead of a line that silently joins before and after.
 */

import { ITelemetry } from './types';

export interface IPoint {
  /** Unix seconds. */
  t: number;
  /** The value, or null where the sample has none (the line breaks there). */
  v: number | null;
}

export interface ISparklineOptions {
  width: number;
  height: number;
  /** The time window shown, unix seconds. */
  t0: number;
  t1: number;
  /** Value range; values outside are clamped to the edges. */
  min?: number;
  max?: number;
  /** A gap between samples longer than this (seconds) breaks the line. */
  maxGap?: number;
}

function round(n: number): string {
  // Two decimals are far below a pixel and keep the path short.
  return String(Math.round(n * 100) / 100);
}

/**
 * The `d` attribute for a polyline through `points`; '' when there is nothing to draw.
 * A lone sample (between gaps) becomes a one-pixel dash so that it stays visible.
 */
export function sparklinePath(points: readonly IPoint[], options: ISparklineOptions): string {
  const { width, height, t0, t1 } = options;
  const min = options.min ?? 0;
  const max = options.max ?? 100;
  const maxGap = options.maxGap ?? 10;
  const span = t1 - t0;
  const range = max - min;
  if (!(span > 0) || !(range > 0) || !(width > 0) || !(height > 0)) {
    return '';
  }
  const x = (t: number) => ((t - t0) / span) * width;
  const y = (v: number) => height - ((Math.min(max, Math.max(min, v)) - min) / range) * height;

  const parts: string[] = [];
  let runLength = 0;
  let prevT = -Infinity;
  let runX = 0;
  let runY = 0;
  const closeRun = () => {
    if (runLength === 1) {
      parts.push(`L${round(Math.min(width, runX + 1))} ${round(runY)}`);
    }
    runLength = 0;
  };
  for (const p of points) {
    if (p.t < t0 || p.t > t1 || p.v === null || !Number.isFinite(p.v)) {
      closeRun();
      continue;
    }
    if (runLength && p.t - prevT > maxGap) {
      closeRun();
    }
    runX = x(p.t);
    runY = y(p.v);
    parts.push(`${runLength ? 'L' : 'M'}${round(runX)} ${round(runY)}`);
    runLength++;
    prevT = p.t;
  }
  closeRun();
  return parts.join(' ');
}

/** Telemetry history -> points, one series picked by `pick`. */
export function series(
  history: readonly ITelemetry[],
  pick: (sample: ITelemetry) => number | null | undefined
): IPoint[] {
  return history.map(sample => {
    const v = pick(sample);
    return { t: sample.time, v: v === undefined || v === null ? null : v };
  });
}

/** CPU use of the whole machine, in percent. */
export const cpuSeries = (h: readonly ITelemetry[]) => series(h, s => s.cpu_percent);

/** Memory use, in percent. */
export const memorySeries = (h: readonly ITelemetry[]) => series(h, s => s.memory_percent);

/** Utilisation of one GPU (by its index on the node), in percent. */
export function gpuSeries(history: readonly ITelemetry[], index: number): IPoint[] {
  return series(history, s => s.gpus?.find(g => g.index === index)?.utilization);
}

/** The indices of all GPUs seen in a history, sorted. */
export function gpuIndices(history: readonly ITelemetry[]): number[] {
  const seen = new Set<number>();
  for (const sample of history) {
    for (const gpu of sample.gpus ?? []) {
      seen.add(gpu.index);
    }
  }
  return Array.from(seen).sort((a, b) => a - b);
}
