/**
 * The shapes of the Grid Portal server API under `{base_url}grid/api/`.
 *
 * These mirror the JSON the Jupyter server extension sends (grid_portal/model.py is the
 * source of truth); nothing here holds behaviour, so the pure modules and the tests can
 * import it without pulling in JupyterLab.
 */

export type NodeState = 'online' | 'busy' | 'paused' | 'draining' | 'offline';

export type JobState =
  | 'queued'
  | 'running'
  | 'done'
  | 'failed'
  | 'cancelled'
  | 'interrupted';

export type JobKind = 'cell' | 'workflow' | 'graph' | 'task';

export interface IGpuInfo {
  index: number;
  name: string;
  memory_total: number;
  capability?: string | null;
  driver?: string | null;
  uuid?: string | null;
}

export interface INetworkInfo {
  bandwidth: number | null;
  rtt: number | null;
  measured_at: number | null;
}

export interface IStaticCapacity {
  cpu_model: string;
  cores_physical: number;
  cores_logical: number;
  cpu_freq_mhz: number | null;
  memory_total: number;
  disk_free: number | null;
  os: string;
  os_release: string;
  arch: string;
  python: string;
  gpus: IGpuInfo[];
  network?: INetworkInfo | null;
  packages?: { [name: string]: string };
}

export interface IOffer {
  cpus: number;
  memory: number;
  gpus: number[];
}

export interface IGpuTelemetry {
  index: number;
  /** Percent, 0..100. */
  utilization: number;
  memory_used: number;
  temperature: number | null;
}

export interface ITelemetry {
  /** Unix seconds. */
  time: number;
  cpu_percent: number;
  grid_cpu_percent: number;
  memory_used: number;
  memory_percent: number;
  running_tasks: number;
  gpus: IGpuTelemetry[];
}

export interface IGridNode {
  name: string;
  state: NodeState;
  reason: string | null;
  address: string;
  capacity: IStaticCapacity;
  offer: IOffer;
  labels: { [key: string]: string };
  telemetry: ITelemetry | null;
  /** Unix seconds. */
  joined: number;
  /** Unix seconds. */
  last_seen: number;
  cpus_in_use: number;
  gpus_in_use: number;
  /** Filled only by `GET nodes/{name}`: the last 10 minutes of telemetry. */
  history?: ITelemetry[];
}

/** A node in a `nodes` delta: static capacity only when it changed. */
export type INodeDelta = Omit<IGridNode, 'capacity'> & { capacity?: IStaticCapacity };

export interface ICapacity {
  nodes_online: number;
  nodes_total: number;
  cores_total: number;
  cores_free: number;
  gpus_total: number;
  gpus_free: number;
  memory_total: number;
  memory_free: number;
  tasks_running: number;
}

export interface IJob {
  id: string;
  name: string;
  owner: string;
  kind: JobKind;
  state: JobState;
  /** Unix seconds. */
  submitted: number;
  started: number | null;
  finished: number | null;
  tasks_total: number;
  tasks_done: number;
  tasks_failed: number;
  nodes: string[];
  error: string | null;
}

export interface IOthers {
  running: number;
  queued: number;
}

/** Messages on the `grid/api/events` websocket. */
export type GridEvent =
  | {
      type: 'snapshot';
      version: number;
      nodes: IGridNode[];
      jobs: IJob[];
      capacity: ICapacity;
    }
  | {
      type: 'nodes';
      version: number;
      /** Changed nodes; `capacity` is left out when it is the same as already sent. */
      nodes: INodeDelta[];
      removed?: string[];
    }
  | { type: 'jobs'; jobs: IJob[]; removed?: string[] }
  | { type: 'capacity'; capacity: ICapacity }
  | { type: 'error'; message: string };
