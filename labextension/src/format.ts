/**
 * Short human strings for sizes, durations and ages.
 *
 * The rules match grid_portal/units.py (`format_size`, `format_duration`) so that the sidebar,
 * the CLI and the notebook widgets print the same numbers the same way. No DOM here.
 */

const SIZE_UNITS = ['B', 'KB', 'MB', 'GB', 'TB'];

/** Bytes as a short string in powers of 1000: `formatSize(16e9) === '16.0 GB'`. */
export function formatSize(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) {
    return '-';
  }
  let value = bytes;
  for (const unit of SIZE_UNITS) {
    if (Math.abs(value) < 1000 || unit === 'TB') {
      return unit === 'B' ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1000;
  }
  return '-'; // unreachable: the loop always returns at 'TB'
}

function pad2(n: number): string {
  return n < 10 ? `0${n}` : `${n}`;
}

/** Seconds as `850 ms`, `12.5 s`, `4m 05s`, `1h 02m`, `3d 4h`. */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) {
    return '-';
  }
  const s = Math.max(0, seconds);
  if (s < 1) {
    return `${(s * 1000).toFixed(0)} ms`;
  }
  if (s < 60) {
    return `${s.toFixed(1)} s`;
  }
  const whole = Math.floor(s);
  const minutes = Math.floor(whole / 60);
  if (minutes < 60) {
    return `${minutes}m ${pad2(whole % 60)}s`;
  }
  const hours = Math.floor(minutes / 60);
  if (hours < 48) {
    return `${hours}h ${pad2(minutes % 60)}m`;
  }
  return `${Math.floor(hours / 24)}d ${hours % 24}h`;
}

/**
 * How long ago `then` was, both in unix seconds: `just now`, `45 s ago`, `1 min ago`,
 * `12 min ago`, `3 h ago`, `2 days ago`. Coarse on purpose: it labels offline nodes.
 */
export function formatAgo(then: number | null | undefined, now: number): string {
  if (then === null || then === undefined || !Number.isFinite(then)) {
    return 'never';
  }
  const s = Math.max(0, now - then);
  if (s < 5) {
    return 'just now';
  }
  if (s < 60) {
    return `${Math.floor(s)} s ago`;
  }
  const minutes = Math.floor(s / 60);
  if (minutes < 60) {
    return `${minutes} min ago`;
  }
  const hours = Math.floor(minutes / 60);
  if (hours < 48) {
    return `${hours} h ago`;
  }
  return `${Math.floor(hours / 24)} days ago`;
}

/** A percentage for a bar: clamped to 0..100 so that bad telemetry cannot break the layout. */
export function clampPercent(value: number | null | undefined): number {
  if (value === null || value === undefined || !Number.isFinite(value)) {
    return 0;
  }
  return Math.min(100, Math.max(0, value));
}

/** `used / total` as a clamped percentage; 0 when the total is unknown. */
export function ratioPercent(used: number, total: number): number {
  if (!(total > 0)) {
    return 0;
  }
  return clampPercent((used / total) * 100);
}

/** `1 node`, `2 nodes`. */
export function plural(n: number, word: string, many = `${word}s`): string {
  return `${n} ${n === 1 ? word : many}`;
}

/**
 * A GPU model without the vendor words that fill a narrow row: `NVIDIA GeForce RTX 4090`
 * -> `RTX 4090`, `NVIDIA A100-SXM4-80GB` -> `A100-SXM4-80GB`. The full name stays in tooltips.
 */
export function shortGpuName(name: string): string {
  const short = name.replace(/^(NVIDIA|AMD|Intel)\s+/i, '').replace(/^(GeForce|Radeon)\s+/i, '');
  return short.trim() || name;
}
