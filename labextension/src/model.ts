/**
 * The client-side copy of the grid that the sidebar draws: a snapshot from the `events`
 * websocket, then deltas applied in order. Pure functions over plain data (no DOM, no
 * JupyterLab), so the rules are unit-tested and the widgets stay thin.
 *
 * Every function returns a new state object and leaves its input untouched; the maps are
 * copied only when a message changes them. Copying 1,000 map entries every couple of seconds
 * costs well under a millisecond, and in return a renderer can compare references.
 */

import { GridEvent, ICapacity, IGridNode, IJob, ITelemetry } from './types';

export interface IGridState {
  /** The nodes version of the last snapshot or `nodes` delta applied; -1 before any. */
  readonly version: number;
  readonly nodes: ReadonlyMap<string, IGridNode>;
  readonly jobs: ReadonlyMap<string, IJob>;
  readonly capacity: ICapacity | null;
  /** Why the portal cannot be reached, as the server said it; null while all is well. */
  readonly error: string | null;
  /** True once a snapshot has arrived: before that, "0 nodes" would be a lie. */
  readonly loaded: boolean;
}

export function emptyState(): IGridState {
  return {
    version: -1,
    nodes: new Map(),
    jobs: new Map(),
    capacity: null,
    error: null,
    loaded: false
  };
}

function byName(nodes: IGridNode[]): Map<string, IGridNode> {
  return new Map(nodes.map(n => [n.name, n]));
}

function byId(jobs: IJob[]): Map<string, IJob> {
  return new Map(jobs.map(j => [j.id, j]));
}

/**
 * Apply one websocket message. Unknown message types are ignored so that a newer server can
 * add kinds of message without breaking an older sidebar.
 */
export function applyEvent(state: IGridState, event: GridEvent): IGridState {
  switch (event.type) {
    case 'snapshot':
      // A snapshot replaces everything, whatever version we had: it follows a (re)connect.
      return {
        version: event.version,
        nodes: byName(event.nodes ?? []),
        jobs: byId(event.jobs ?? []),
        capacity: event.capacity ?? null,
        error: null,
        loaded: true
      };
    case 'nodes': {
      // Only a delta older than what we hold is stale. Applying the same delta twice is
      // harmless (each node is replaced by name), so an equal version is applied.
      if (state.loaded && event.version < state.version) {
        return state;
      }
      const nodes = new Map(state.nodes);
      for (const node of event.nodes ?? []) {
        // Static capacity is sent only when it changed (a new node, a re-probe): a delta
        // without it keeps the capacity already known.
        const known = nodes.get(node.name);
        nodes.set(
          node.name,
          node.capacity === undefined && known ? { ...node, capacity: known.capacity } : (node as IGridNode)
        );
      }
      for (const name of event.removed ?? []) {
        nodes.delete(name);
      }
      return { ...state, version: event.version, nodes, error: null };
    }
    case 'jobs': {
      const jobs = new Map(state.jobs);
      for (const job of event.jobs ?? []) {
        jobs.set(job.id, job);
      }
      for (const id of event.removed ?? []) {
        jobs.delete(id);
      }
      return { ...state, jobs, error: null };
    }
    case 'capacity':
      return { ...state, capacity: event.capacity, error: null };
    case 'error':
      return { ...state, error: event.message || 'The grid portal reported an error.' };
    default:
      return state;
  }
}

/** Record an error found outside the websocket (a failed REST call, say). */
export function withError(state: IGridState, message: string | null): IGridState {
  return state.error === message ? state : { ...state, error: message };
}

/** Replace one node (after `GET nodes/{name}`), keeping the rest. */
export function withNode(state: IGridState, node: IGridNode): IGridState {
  const nodes = new Map(state.nodes);
  nodes.set(node.name, node);
  return { ...state, nodes };
}

/** Replace the jobs map (after `GET jobs`). */
export function withJobs(state: IGridState, jobs: IJob[]): IGridState {
  return { ...state, jobs: byId(jobs) };
}

/** Parse one websocket frame; null for anything that is not a message we understand. */
export function parseEvent(data: unknown): GridEvent | null {
  if (typeof data !== 'string') {
    return null;
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(data);
  } catch {
    return null;
  }
  if (parsed === null || typeof parsed !== 'object') {
    return null;
  }
  const type = (parsed as { type?: unknown }).type;
  if (
    type === 'snapshot' ||
    type === 'nodes' ||
    type === 'jobs' ||
    type === 'capacity' ||
    type === 'error'
  ) {
    return parsed as GridEvent;
  }
  return null;
}

/**
 * Add a live telemetry sample to a node's history and drop samples older than the window.
 * Lets the detail view's sparklines move with the websocket instead of polling.
 */
export function appendHistory(
  history: readonly ITelemetry[],
  sample: ITelemetry | null,
  windowSeconds = 600
): ITelemetry[] {
  const out = history.slice();
  const last = out.length ? out[out.length - 1].time : -Infinity;
  if (sample && sample.time > last) {
    out.push(sample);
  }
  if (!out.length) {
    return out;
  }
  const cutoff = out[out.length - 1].time - windowSeconds;
  let first = 0;
  while (first < out.length && out[first].time < cutoff) {
    first++;
  }
  return first ? out.slice(first) : out;
}

/** The numbers the status bar shows. */
export interface ISummary {
  nodesOnline: number;
  jobsRunning: number;
}

export function summarize(state: IGridState): ISummary {
  let nodesOnline = 0;
  if (state.capacity) {
    nodesOnline = state.capacity.nodes_online;
  } else {
    for (const node of state.nodes.values()) {
      if (node.state !== 'offline') {
        nodesOnline++;
      }
    }
  }
  let jobsRunning = 0;
  for (const job of state.jobs.values()) {
    if (job.state === 'running') {
      jobsRunning++;
    }
  }
  return { nodesOnline, jobsRunning };
}
