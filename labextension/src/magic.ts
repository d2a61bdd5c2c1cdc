/**
 * The `%%grid` line that "Run cell on grid" puts on top of a cell, built from the dialog's
 * values. Pure: validation messages name the problem and the fix, like the Python side's
 * UsageError, and the size rules match grid_portal/units.py `parse_size`.
 */

export interface IRunOptions {
  cpus: number;
  gpus: number;
  /** A size like `4GB` or `512MiB`, without spaces; '' for no memory requirement. */
  memory: string;
  background: boolean;
}

/** What the dialog hands over: its fields as typed. */
export interface IRawRunOptions {
  cpus: string;
  gpus: string;
  memory: string;
  background: boolean;
}

/** A value the user typed is wrong; the message says what and how to fix it. */
export class RunOptionsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RunOptionsError';
  }
}

const SIZE_UNITS = new Set([
  '',
  'b',
  'k',
  'kb',
  'm',
  'mb',
  'g',
  'gb',
  't',
  'tb',
  'p',
  'pb',
  'kib',
  'mib',
  'gib',
  'tib',
  'pib'
]);
const SIZE_RE = /^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)$/;

function parseCount(text: string, what: string, min: number): number {
  const trimmed = text.trim();
  if (trimmed === '' && min === 0) {
    return 0;
  }
  if (!/^[0-9]+$/.test(trimmed)) {
    throw new RunOptionsError(
      `invalid number of ${what} ${JSON.stringify(text)}: write a whole number of ${min} or more, like ${min + 1}`
    );
  }
  const value = Number(trimmed);
  if (value < min) {
    throw new RunOptionsError(
      `invalid number of ${what} ${JSON.stringify(text)}: it must be at least ${min}`
    );
  }
  return value;
}

/** `' 4 GB '` -> `'4GB'`; `''` -> `''`. Throws RunOptionsError for anything else. */
export function normalizeSize(text: string): string {
  const trimmed = text.trim();
  if (trimmed === '') {
    return '';
  }
  const match = SIZE_RE.exec(trimmed);
  if (!match) {
    throw new RunOptionsError(
      `invalid memory ${JSON.stringify(text)}: write a number and a unit, like 512MB, 4GB or 1.5GiB`
    );
  }
  const [, number, unit] = match;
  if (!SIZE_UNITS.has(unit.toLowerCase())) {
    throw new RunOptionsError(
      `invalid memory ${JSON.stringify(text)}: unknown unit ${JSON.stringify(unit)}; ` +
        'use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)'
    );
  }
  return `${number}${unit}`;
}

/** Check the dialog's values; throws RunOptionsError with a message for the user. */
export function parseRunOptions(raw: IRawRunOptions): IRunOptions {
  return {
    cpus: parseCount(raw.cpus, 'CPUs', 1),
    gpus: parseCount(raw.gpus, 'GPUs', 0),
    memory: normalizeSize(raw.memory),
    background: raw.background
  };
}

/** `%%grid --cpus 2 --gpus 1 --memory 8GB --bg`; options at their defaults are left out. */
export function buildGridMagic(options: IRunOptions): string {
  const parts = ['%%grid', '--cpus', String(options.cpus)];
  if (options.gpus > 0) {
    parts.push('--gpus', String(options.gpus));
  }
  if (options.memory) {
    parts.push('--memory', options.memory);
  }
  if (options.background) {
    parts.push('--bg');
  }
  return parts.join(' ');
}

/**
 * Whether the cell is already a `%%grid` cell. IPython drops leading blank lines before it
 * looks for a cell magic, so they are skipped here too; `%%gridfoo` is another magic.
 */
export function hasGridMagic(source: string): boolean {
  return /^(?:[ \t]*\r?\n)*%%grid(?:[ \t]|\r?\n|$)/.test(source);
}

/** The cell source to run: unchanged if it already is a `%%grid` cell, else with the line on top. */
export function withGridMagic(source: string, options: IRunOptions): string {
  if (hasGridMagic(source)) {
    return source;
  }
  return `${buildGridMagic(options)}\n${source}`;
}
