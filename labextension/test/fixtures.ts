/** Plain test data shaped like the server's JSON (see src/types.ts). */

import { IGridNode, IJob, ITelemetry } from '../src/types';

export function telemetry(time: number, overrides: Partial<ITelemetry> = {}): ITelemetry {
  return {
    time,
    cpu_percent: 10,
    grid_cpu_percent: 5,
    memory_used: 4e9,
    memory_percent: 25,
    running_tasks: 0,
    gpus: [],
    ...overrides
  };
}

export function node(name: string, overrides: Partial<IGridNode> = {}): IGridNode {
  return {
    name,
    state: 'online',
    reason: null,
    address: `tls://10.0.0.1:${name.length + 4000}`,
    capacity: {
      cpu_model: 'AMD Ryzen 7 5800X',
      cores_physical: 8,
      cores_logical: 16,
      cpu_freq_mhz: 3800,
      memory_total: 16e9,
      disk_free: 100e9,
      os: 'Linux',
      os_release: '6.8',
      arch: 'x86_64',
      python: '3.11.7',
      gpus: [],
      network: { bandwidth: 1.25e8, rtt: 0.0004, measured_at: 1000 },
      packages: {}
    },
    offer: { cpus: 8, memory: 8e9, gpus: [] },
    labels: {},
    telemetry: telemetry(1000),
    joined: 900,
    last_seen: 1000,
    cpus_in_use: 0,
    gpus_in_use: 0,
    ...overrides
  };
}

export function gpuNode(name: string, overrides: Partial<IGridNode> = {}): IGridNode {
  const base = node(name);
  return {
    ...base,
    capacity: {
      ...base.capacity,
      gpus: [
        {
          index: 0,
          name: 'NVIDIA GeForce RTX 4090',
          memory_total: 24e9,
          capability: '8.9',
          driver: '550.54',
          uuid: 'GPU-1'
        }
      ]
    },
    offer: { cpus: 8, memory: 8e9, gpus: [0] },
    telemetry: telemetry(1000, {
      gpus: [{ index: 0, utilization: 50, memory_used: 2e9, temperature: 60 }]
    }),
    ...overrides
  };
}

export function job(id: string, overrides: Partial<IJob> = {}): IJob {
  return {
    id,
    name: `job ${id}`,
    owner: 'ada',
    kind: 'cell',
    state: 'running',
    submitted: 100,
    started: 110,
    finished: null,
    tasks_total: 10,
    tasks_done: 4,
    tasks_failed: 0,
    nodes: ['n1'],
    error: null,
    ...overrides
  };
}
