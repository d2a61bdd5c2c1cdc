/**
 * Where a job's task stream draws each task: pure, so that it is tested without a DOM
 * (test/streamlayout.test.ts). Drawn by taskstream.ts.
 */

export interface ITaskRecord {
  key: string;
  stage: string;
  item: number | null;
  node: string | null;
  state: 'queued' | 'running' | 'done' | 'failed' | 'cancelled';
  started: number | null;
  finished: number | null;
  attempts?: number;
}

/** One bar of the stream, in lane and fraction-of-window coordinates. */
export interface IBar {
  task: ITaskRecord;
  lane: number;
  x0: number; // 0..1 of the window
  x1: number;
  colour: number; // the stage's index in the palette
}

/** One row of the stream: a node's slot (tasks that ran side by side on it get a slot each). */
export interface ILane {
  node: string;
  slot: number;
}

export interface IStreamLayout {
  lanes: ILane[]; // top to bottom: by node name, then slot
  bars: IBar[];
  start: number; // the window, epoch seconds
  end: number;
  stages: string[]; // in the order of their colours
}

/** Colours available (CSS classes `gp-ts-c0`... from JupyterLab's theme variables). */
export const PALETTE_SIZE = 6;

/** Rows per node at most: tasks beyond share the last one (a sweep given all at once). */
export const MAX_SLOTS = 8;

/**
 * Lanes (for each node that ran a task, by name, one row per task it ran side by side, as
 * Dask's task stream has one per thread), and each task that has run or runs as a bar from
 * when it started to when it finished (or `now`), over the window from the earliest start to
 * `now`. Queued tasks have no node yet and no bar.
 */
export function layoutTaskStream(
  tasks: readonly ITaskRecord[],
  stageOrder: readonly string[],
  now: number
): IStreamLayout {
  const stages = [...stageOrder];
  for (const t of tasks) {
    if (!stages.includes(t.stage)) {
      stages.push(t.stage);
    }
  }
  const drawn = tasks
    .filter(t => t.node && t.started !== null)
    .sort((a, b) => (a.started as number) - (b.started as number));
  const start = drawn.length ? (drawn[0].started as number) : now;
  const end = Math.max(now, ...drawn.map(t => t.finished ?? now));
  const span = Math.max(end - start, 1e-3);
  // Each node's tasks go to the first of its rows that is free when they start.
  const busyUntil = new Map<string, number[]>();
  const placed = drawn.map(t => {
    const node = t.node as string;
    const from = t.started as number;
    const to = Math.max(t.finished ?? end, from);
    const rows = busyUntil.get(node) ?? [];
    busyUntil.set(node, rows);
    let slot = rows.findIndex(until => until <= from);
    if (slot < 0) {
      slot = Math.min(rows.length, MAX_SLOTS - 1);
    }
    rows[slot] = Math.max(rows[slot] ?? 0, to);
    return { task: t, node, slot, from, to };
  });
  const lanes: ILane[] = [...busyUntil.keys()]
    .sort()
    .flatMap(node => busyUntil.get(node)!.map((_, slot) => ({ node, slot })));
  const row = (node: string, slot: number) => lanes.findIndex(l => l.node === node && l.slot === slot);
  const bars = placed.map(p => ({
    task: p.task,
    lane: row(p.node, p.slot),
    x0: (p.from - start) / span,
    x1: (p.to - start) / span,
    colour: stages.indexOf(p.task.stage) % PALETTE_SIZE
  }));
  return { lanes, bars, start, end, stages };
}

