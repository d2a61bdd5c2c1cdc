/**
 * Filtering and sorting of the node list, and ordering and timing of jobs. Pure: the
 * sidebar calls these on every update (1,000 nodes take well under a millisecond).
 */

import { IGridNode, IJob, JobState, NodeState } from './types';

export interface INodeFilter {
  /** Only nodes that offer at least one GPU. */
  gpuOnly: boolean;
  /** Only nodes that are up and running nothing. */
  idleOnly: boolean;
  /** Whitespace-separated terms; a node must match all of them (case-insensitive). */
  text: string;
}

export type NodeSortKey = 'name' | 'state' | 'cpu' | 'memory' | 'gpu' | 'free';

export const NODE_SORT_KEYS: readonly NodeSortKey[] = [
  'name',
  'state',
  'cpu',
  'memory',
  'gpu',
  'free'
];

export interface INodeSort {
  key: NodeSortKey;
  descending: boolean;
}

/** Display order of states: usable first, gone last. */
const STATE_ORDER: { [S in NodeState]: number } = {
  online: 0,
  busy: 1,
  paused: 2,
  draining: 3,
  offline: 4
};

export function gpuCount(node: IGridNode): number {
  return node.capacity?.gpus?.length ?? 0;
}

export function isIdle(node: IGridNode): boolean {
  if (node.state !== 'online') {
    return false;
  }
  const running = node.telemetry?.running_tasks ?? 0;
  return running === 0 && (node.cpus_in_use ?? 0) === 0 && (node.gpus_in_use ?? 0) === 0;
}

/** Cores offered and not in use. */
export function coresFree(node: IGridNode): number {
  if (node.state === 'offline') {
    return 0;
  }
  return Math.max(0, (node.offer?.cpus ?? 0) - (node.cpus_in_use ?? 0));
}

/** Mean GPU utilisation in percent, or -1 without GPUs (so they sort below idle GPUs). */
export function gpuUtilization(node: IGridNode): number {
  const gpus = node.telemetry?.gpus ?? [];
  if (!gpus.length) {
    return gpuCount(node) ? 0 : -1;
  }
  return gpus.reduce((sum, g) => sum + (g.utilization ?? 0), 0) / gpus.length;
}

/** The text a search term is matched against: what a person may type to find a node. */
function haystack(node: IGridNode): string {
  const parts: string[] = [node.name, node.state, node.address ?? ''];
  const cap = node.capacity;
  if (cap) {
    parts.push(cap.cpu_model ?? '', cap.os ?? '', cap.arch ?? '');
    for (const gpu of cap.gpus ?? []) {
      parts.push(gpu.name ?? '');
    }
  }
  for (const [key, value] of Object.entries(node.labels ?? {})) {
    parts.push(`${key}=${value}`);
  }
  if (node.reason) {
    parts.push(node.reason);
  }
  return parts.join('\n').toLowerCase();
}

function searchTerms(filter: INodeFilter): string[] {
  return filter.text.toLowerCase().split(/\s+/).filter(Boolean);
}

export function nodeMatches(
  node: IGridNode,
  filter: INodeFilter,
  terms: readonly string[] = searchTerms(filter)
): boolean {
  if (filter.gpuOnly && gpuCount(node) === 0) {
    return false;
  }
  if (filter.idleOnly && !isIdle(node)) {
    return false;
  }
  if (!terms.length) {
    return true;
  }
  const text = haystack(node);
  return terms.every(term => text.includes(term));
}

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: 'base' });

function sortValue(node: IGridNode, key: NodeSortKey): number {
  switch (key) {
    case 'state':
      return STATE_ORDER[node.state] ?? 5;
    case 'cpu':
      return node.telemetry?.cpu_percent ?? -1;
    case 'memory':
      return node.telemetry?.memory_percent ?? -1;
    case 'gpu':
      return gpuUtilization(node);
    case 'free':
      return coresFree(node);
    default:
      return 0;
  }
}

/**
 * The natural order of node names (node2 before node10) as numbers, kept between updates:
 * comparing two numbers is far cheaper than comparing two strings with a collator, and the
 * names change much less often than the telemetry that makes the list re-sort.
 */
export class NameOrder {
  /** Each name's rank; recomputed only when a name not seen before shows up. */
  ranks(nodes: readonly IGridNode[]): ReadonlyMap<string, number> {
    // Names of nodes that left keep their rank (harmless) until they outnumber the rest.
    let stale = this._ranks.size > 2 * nodes.length + 64;
    for (let i = 0; !stale && i < nodes.length; i++) {
      stale = !this._ranks.has(nodes[i].name);
    }
    if (stale) {
      const names = nodes.map(n => n.name).sort(collator.compare);
      this._ranks = new Map(names.map((name, i) => [name, i]));
    }
    return this._ranks;
  }

  private _ranks = new Map<string, number>();
}

/**
 * The nodes to show, in order. Names compare "naturally" (node2 before node10) and break
 * every tie, so the order is stable while telemetry changes. Pass a `NameOrder` kept between
 * calls to skip comparing names as strings.
 */
export function filterAndSortNodes(
  nodes: Iterable<IGridNode>,
  filter: INodeFilter,
  sort: INodeSort,
  order: NameOrder = new NameOrder()
): IGridNode[] {
  const all = Array.isArray(nodes) ? (nodes as IGridNode[]) : Array.from(nodes);
  const ranks = order.ranks(all);
  const terms = searchTerms(filter);
  const out: { node: IGridNode; rank: number; value: number }[] = [];
  for (const node of all) {
    if (nodeMatches(node, filter, terms)) {
      out.push({
        node,
        rank: ranks.get(node.name) ?? 0,
        value: sort.key === 'name' ? 0 : sortValue(node, sort.key)
      });
    }
  }
  const sign = sort.descending ? -1 : 1;
  out.sort((a, b) => {
    if (sort.key !== 'name') {
      const d = a.value - b.value;
      if (d !== 0) {
        return sign * d;
      }
      return a.rank - b.rank;
    }
    return sign * (a.rank - b.rank);
  });
  return out.map(item => item.node);
}

export const ACTIVE_JOB_STATES: readonly JobState[] = ['queued', 'running'];

export function isActive(job: IJob): boolean {
  return job.state === 'queued' || job.state === 'running';
}

/** Active jobs first (newest first), then finished ones, most recently finished first. */
export function sortJobs(jobs: Iterable<IJob>): IJob[] {
  return Array.from(jobs).sort((a, b) => {
    const activeA = isActive(a);
    const activeB = isActive(b);
    if (activeA !== activeB) {
      return activeA ? -1 : 1;
    }
    const timeA = activeA ? a.submitted : (a.finished ?? a.submitted);
    const timeB = activeB ? b.submitted : (b.finished ?? b.submitted);
    return timeB - timeA || collator.compare(a.id, b.id);
  });
}

export interface IJobTiming {
  /** `queued for`, `running for`, or the finished outcome (`done in`, `failed after`...). */
  label: string;
  seconds: number | null;
}

/** What the elapsed-time column says for a job at time `now` (unix seconds). */
export function jobTiming(job: IJob, now: number): IJobTiming {
  switch (job.state) {
    case 'queued':
      return { label: 'queued for', seconds: Math.max(0, now - job.submitted) };
    case 'running':
      return {
        label: 'running for',
        seconds: Math.max(0, now - (job.started ?? job.submitted))
      };
    default: {
      const start = job.started ?? job.submitted;
      const seconds = job.finished !== null ? Math.max(0, job.finished - start) : null;
      const label =
        job.state === 'done'
          ? 'done in'
          : job.state === 'failed'
            ? 'failed after'
            : `${job.state} after`;
      return { label, seconds };
    }
  }
}

/** Progress for the bar: done and failed as fractions of the total, each 0..1. */
export function jobProgress(job: IJob): { done: number; failed: number } {
  const total = job.tasks_total ?? 0;
  if (!(total > 0)) {
    return { done: job.state === 'done' ? 1 : 0, failed: 0 };
  }
  const done = Math.min(1, Math.max(0, (job.tasks_done ?? 0) / total));
  const failed = Math.min(1 - done, Math.max(0, (job.tasks_failed ?? 0) / total));
  return { done, failed };
}

/** `a, b, c +4 more` for a compact nodes column. */
export function shortList(names: readonly string[], max = 3): string {
  if (names.length <= max) {
    return names.join(', ');
  }
  return `${names.slice(0, max).join(', ')} +${names.length - max} more`;
}
