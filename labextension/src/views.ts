/**
 * DOM for one node row, the node detail view and one job row. The sidebar widget decides
 * what to show and when; these functions only turn data into elements.
 */

import { INodeDetail } from './connection';
import { Child, bar, h, replaceChildren, setText, svg } from './dom';
import { jobProgress, jobTiming, isActive, shortList } from './filter';
import {
  formatAgo,
  formatDuration,
  formatSize,
  plural,
  ratioPercent,
  shortGpuName
} from './format';
import { IPoint, cpuSeries, gpuIndices, gpuSeries, memorySeries, sparklinePath } from './sparkline';
import { siteBadge } from './portals';
import { siteOf } from './site';
import { IGridNode, IJob } from './types';

export type Column = 'state' | 'cpu' | 'memory' | 'gpu' | 'tasks';
export const ALL_COLUMNS: readonly Column[] = ['state', 'cpu', 'memory', 'gpu', 'tasks'];

/** Fixed row height (px) of the virtualised node list; style/base.css uses the same. */
export const NODE_ROW_HEIGHT = 64;

export function stateBadge(state: string): HTMLElement {
  // Colour AND word: the dot alone would fail colour-blind users.
  return h('span', { class: `gp-node-state gp-state-${state}` }, state);
}

/** `2× RTX 4090`, or `RTX 4090, A100` for mixed GPUs; `short` drops vendor words. */
export function gpuModels(node: IGridNode, short = false): string {
  const counts = new Map<string, number>();
  for (const gpu of node.capacity?.gpus ?? []) {
    const name = short ? shortGpuName(gpu.name) : gpu.name;
    counts.set(name, (counts.get(name) ?? 0) + 1);
  }
  return Array.from(counts)
    .map(([name, n]) => (n > 1 ? `${n}× ${name}` : name))
    .join(', ');
}

function gpuBars(node: IGridNode): Child[] {
  const gpus = node.capacity?.gpus ?? [];
  if (!gpus.length) {
    return [];
  }
  const live = node.telemetry?.gpus ?? [];
  const util = live.length ? live.reduce((s, g) => s + (g.utilization ?? 0), 0) / live.length : 0;
  const used = live.reduce((s, g) => s + (g.memory_used ?? 0), 0);
  const total = gpus.reduce((s, g) => s + (g.memory_total ?? 0), 0);
  return [
    h('span', { class: 'gp-gpu-model', title: gpuModels(node) }, gpuModels(node, true)),
    bar('gpu', util, `${util.toFixed(0)}%`, `GPU utilisation ${util.toFixed(0)}%`),
    bar(
      'gpumem',
      ratioPercent(used, total),
      formatSize(used),
      `GPU memory ${formatSize(used)} of ${formatSize(total)}`
    )
  ];
}

/** The children of a node row (the row element itself is kept by the list). */
export function nodeRowContent(
  node: IGridNode,
  columns: ReadonlySet<Column>,
  now: number
): Child[] {
  const t = node.telemetry;
  const tasks = t?.running_tasks ?? 0;
  const site = siteOf(node);
  const head = h(
    'div',
    { class: 'gp-row-line gp-row-head' },
    h('span', { class: `gp-dot gp-state-${node.state}` }),
    h('span', { class: 'gp-node-name', title: node.address ?? node.name }, node.name),
    site && siteBadge(site),
    columns.has('state') && stateBadge(node.state),
    columns.has('tasks') &&
      node.state !== 'offline' &&
      h('span', { class: 'gp-node-tasks' }, plural(tasks, 'task'))
  );
  if (node.state === 'offline') {
    return [
      head,
      h(
        'div',
        { class: 'gp-row-line gp-node-lastseen' },
        `last seen ${formatAgo(node.last_seen, now)}`,
        node.reason ? ` · ${node.reason}` : ''
      )
    ];
  }
  const cap = node.capacity;
  const memTotal = cap?.memory_total ?? 0;
  const memUsed = t?.memory_used ?? 0;
  const cpu = t?.cpu_percent ?? 0;
  const resources = h(
    'div',
    { class: 'gp-row-line gp-row-bars' },
    columns.has('cpu') &&
      bar(
        'cpu',
        cpu,
        `CPU ${cpu.toFixed(0)}%`,
        `CPU ${cpu.toFixed(0)}% of ${cap?.cores_logical ?? '?'} cores; ` +
          `${node.cpus_in_use ?? 0} of ${node.offer?.cpus ?? 0} offered cores in use`
      ),
    columns.has('memory') &&
      bar(
        'mem',
        ratioPercent(memUsed, memTotal),
        `RAM ${formatSize(memUsed)}`,
        `Memory ${formatSize(memUsed)} of ${formatSize(memTotal)}`
      )
  );
  const gpuLine =
    columns.has('gpu') && (cap?.gpus?.length ?? 0) > 0
      ? h('div', { class: 'gp-row-line gp-row-gpu' }, ...gpuBars(node))
      : node.reason
        ? h('div', { class: 'gp-row-line gp-node-reason' }, node.reason)
        : null;
  return [head, resources, gpuLine];
}

/**
 * One row of the virtualised node list, kept while its node stays near the viewport. An
 * update that did not change its node (the model replaces a node's object only when a delta
 * brings it) and did not move it costs nothing; a changed node rebuilds only this row.
 */
export class NodeRow {
  readonly node: HTMLElement;

  constructor(name: string) {
    this.node = h('div', { class: 'gp-node-row', 'data-node': name, tabindex: 0, role: 'button' });
  }

  update(node: IGridNode, index: number, columns: ReadonlySet<Column>, now: number): void {
    if (index !== this._index) {
      this._index = index;
      this.node.style.transform = `translateY(${index * NODE_ROW_HEIGHT}px)`;
    }
    // Only offline rows read the clock ("last seen 3 min ago").
    const ago = node.state === 'offline' ? formatAgo(node.last_seen, now) : '';
    if (node === this._data && ago === this._ago) {
      return;
    }
    this._data = node;
    this._ago = ago;
    if (this.node.dataset.state !== node.state) {
      this.node.dataset.state = node.state;
      this.node.setAttribute('aria-label', `${node.name}, ${node.state}`);
    }
    replaceChildren(this.node, ...nodeRowContent(node, columns, now));
  }

  private _index = -1;
  private _data: IGridNode | null = null;
  private _ago = '';
}

function setAttr(el: Element, name: string, value: string): void {
  if (el.getAttribute(name) !== value) {
    el.setAttribute(name, value);
  }
}

/** The width last written to each bar (the browser reads `50.0%` back as `50%`). */
const lastWidth = new WeakMap<HTMLElement, string>();

function setStyle(el: HTMLElement, name: 'width', value: string): void {
  if (lastWidth.get(el) !== value) {
    lastWidth.set(el, value);
    el.style[name] = value;
  }
}

const SPARK_W = 200;
const SPARK_H = 32;

function sparkline(
  title: string,
  points: IPoint[],
  now: number,
  current: string,
  kind: string
): HTMLElement {
  const d = sparklinePath(points, {
    width: SPARK_W,
    height: SPARK_H,
    t0: now - 600,
    t1: now,
    min: 0,
    max: 100
  });
  return h(
    'div',
    { class: `gp-spark gp-spark-${kind}`, 'data-series': kind },
    h('div', { class: 'gp-spark-title' }, h('span', {}, title), h('span', {}, current)),
    svg(
      'svg',
      {
        class: 'gp-spark-svg',
        viewBox: `0 0 ${SPARK_W} ${SPARK_H}`,
        preserveAspectRatio: 'none',
        role: 'img',
        'aria-label': `${title} over the last 10 minutes`
      },
      svg('path', { d, 'vector-effect': 'non-scaling-stroke' })
    )
  );
}

function dl(rows: [string, string | null | undefined][]): HTMLElement {
  const items: Child[] = [];
  for (const [k, v] of rows) {
    if (v === null || v === undefined || v === '') {
      continue;
    }
    items.push(h('dt', {}, k), h('dd', {}, v));
  }
  return h('dl', { class: 'gp-kv' }, ...items);
}

/** The body of the detail view for one node (the header with its Back button is kept). */
export function nodeDetailContent(
  node: IGridNode | undefined,
  detail: INodeDetail,
  now: number
): Child[] {
  if (!node) {
    return [h('div', { class: 'gp-empty' }, `Node ${detail.name} has left the grid.`)];
  }
  const cap = node.capacity;
  const t = node.telemetry;
  const history = detail.history;
  const charts: Child[] = [];
  if (detail.loading) {
    charts.push(h('div', { class: 'gp-empty' }, 'Loading history…'));
  } else if (detail.error) {
    charts.push(h('div', { class: 'gp-error gp-error-inline' }, detail.error));
  } else {
    charts.push(
      sparkline('CPU', cpuSeries(history), now, t ? `${t.cpu_percent.toFixed(0)}%` : '-', 'cpu'),
      sparkline(
        'Memory',
        memorySeries(history),
        now,
        t ? `${t.memory_percent.toFixed(0)}%` : '-',
        'memory'
      )
    );
    for (const index of gpuIndices(history)) {
      const live = t?.gpus?.find(g => g.index === index);
      charts.push(
        sparkline(
          `GPU ${index}`,
          gpuSeries(history, index),
          now,
          live ? `${live.utilization.toFixed(0)}%` : '-',
          `gpu${index}`
        )
      );
    }
  }
  const gpus = (cap?.gpus ?? []).map(g =>
    h(
      'li',
      {},
      `#${g.index} ${g.name} · ${formatSize(g.memory_total)}`,
      g.capability ? ` · sm ${g.capability}` : '',
      g.driver ? ` · driver ${g.driver}` : ''
    )
  );
  const labels = Object.entries(node.labels ?? {}).map(([k, v]) =>
    h('span', { class: 'gp-label' }, `${k}=${v}`)
  );
  const net = cap?.network;
  return [
    h(
      'div',
      { class: 'gp-detail-state' },
      stateBadge(node.state),
      node.reason ? h('span', { class: 'gp-node-reason' }, node.reason) : null,
      node.state === 'offline'
        ? h('span', { class: 'gp-node-lastseen' }, `last seen ${formatAgo(node.last_seen, now)}`)
        : h('span', {}, plural(t?.running_tasks ?? 0, 'task'))
    ),
    h('div', { class: 'gp-sparks' }, ...charts),
    h('h3', { class: 'gp-subtitle' }, 'Capacity'),
    dl([
      ['Address', node.address],
      ['CPU', cap?.cpu_model],
      [
        'Cores',
        cap ? `${cap.cores_physical} physical, ${cap.cores_logical} logical` : null
      ],
      ['Frequency', cap?.cpu_freq_mhz ? `${Math.round(cap.cpu_freq_mhz)} MHz` : null],
      ['Memory', cap ? formatSize(cap.memory_total) : null],
      ['Disk free', cap?.disk_free ? formatSize(cap.disk_free) : null],
      ['System', cap ? `${cap.os} ${cap.os_release} (${cap.arch})` : null],
      ['Python', cap?.python],
      [
        'Network',
        net && net.bandwidth
          ? `${formatSize(net.bandwidth)}/s` + (net.rtt ? `, ${(net.rtt * 1000).toFixed(1)} ms` : '')
          : null
      ],
      [
        'Offers',
        node.offer
          ? `${plural(node.offer.cpus, 'core')}, ${formatSize(node.offer.memory)}` +
            (node.offer.gpus?.length ? `, GPUs ${node.offer.gpus.join(', ')}` : '')
          : null
      ],
      ['In use', `${plural(node.cpus_in_use ?? 0, 'core')}, ${plural(node.gpus_in_use ?? 0, 'GPU')}`],
      ['Joined', node.joined ? formatAgo(node.joined, now) : null]
    ]),
    gpus.length ? h('h3', { class: 'gp-subtitle' }, 'GPUs') : null,
    gpus.length ? h('ul', { class: 'gp-gpu-list' }, ...gpus) : null,
    h('h3', { class: 'gp-subtitle' }, 'Labels'),
    labels.length
      ? h('div', { class: 'gp-labels' }, ...labels)
      : h('div', { class: 'gp-empty' }, 'No labels.')
  ];
}

/**
 * One row of the jobs list. Its elements live as long as the job is listed and are updated
 * in place, so that a click on Cancel is never lost to a re-render between press and release.
 */
export class JobRow {
  readonly node: HTMLElement;

  constructor(job: IJob, onCancel: (id: string) => void) {
    this._id = job.id;
    this._cancel = h(
      'button',
      { class: 'gp-job-cancel jp-Button', type: 'button', title: 'Cancel this job' },
      'Cancel'
    );
    this._cancel.addEventListener('click', () => {
      this._cancel.disabled = true;
      onCancel(this._id);
    });
    this.node = h(
      'div',
      { class: 'gp-job-row', 'data-job': job.id },
      h('div', { class: 'gp-row-line gp-row-head' }, this._name, this._state, this._cancel),
      h('div', { class: 'gp-row-line' }, this._progress, this._count),
      h('div', { class: 'gp-row-line gp-job-meta' }, this._time, this._nodes),
      this._error
    );
    this._progress.append(this._doneFill, this._failedFill);
  }

  update(job: IJob, now: number, mine = true): void {
    // Called every render and every second: write only what changed.
    // Someone else's job (a teacher's "everyone" list) shows its owner and cannot be cancelled.
    setText(this._name, mine ? job.name || job.id : `${job.name || job.id} (${job.owner})`);
    setAttr(this._name, 'title', `${job.kind} ${job.id}`);
    setAttr(this._state, 'class', `gp-job-state gp-state-${job.state}`);
    setText(this._state, job.state);
    if (this.node.dataset.state !== job.state) {
      this.node.dataset.state = job.state;
    }
    if (this.node.dataset.mine !== String(mine)) {
      this.node.dataset.mine = String(mine); // only your own jobs open their task stream
    }
    const active = isActive(job) && mine;
    if (this._cancel.hidden !== !active) {
      this._cancel.hidden = !active;
    }
    if (!active && this._cancel.disabled) {
      this._cancel.disabled = false;
    }
    const { done, failed } = jobProgress(job);
    setStyle(this._doneFill, 'width', `${(done * 100).toFixed(1)}%`);
    setStyle(this._failedFill, 'width', `${(failed * 100).toFixed(1)}%`);
    setText(
      this._count,
      `${job.tasks_done}/${job.tasks_total}` + (job.tasks_failed ? ` (${job.tasks_failed} failed)` : '')
    );
    const timing = jobTiming(job, now);
    setText(this._time, `${timing.label} ${formatDuration(timing.seconds)}`);
    setText(this._nodes, job.nodes?.length ? `on ${shortList(job.nodes)}` : '');
    setAttr(this._nodes, 'title', (job.nodes ?? []).join(', '));
    if (this._error.hidden !== !job.error) {
      this._error.hidden = !job.error;
    }
    setText(this._error, job.error ?? '');
  }

  /** Let the Cancel button be pressed again (after a failed cancel). */
  enableCancel(): void {
    this._cancel.disabled = false;
  }

  private _id: string;
  private _name = h('span', { class: 'gp-job-name' });
  private _state = h('span', { class: 'gp-job-state' });
  private _cancel: HTMLButtonElement;
  private _progress = h('div', { class: 'gp-progress' });
  private _doneFill = h('div', { class: 'gp-progress-done' });
  private _failedFill = h('div', { class: 'gp-progress-failed' });
  private _count = h('span', { class: 'gp-job-count' });
  private _time = h('span', { class: 'gp-job-time' });
  private _nodes = h('span', { class: 'gp-job-nodes' });
  private _error = h('div', { class: 'gp-job-error' });
}
