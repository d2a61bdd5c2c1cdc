/**
 * A job's own dashboard in the sidebar: progress per stage and a live task stream
 * (each task a bar on its node's lane, over time, coloured by stage), as Dask's dashboard
 * shows them but limited to the user's own job. From `GET grid/api/jobs/{id}/tasks`, polled
 * every second while the view is open and the job runs.
 * The layout is `streamlayout.ts` (pure, tested without a DOM).
 */

import { ServerConnection } from '@jupyterlab/services';

import { requestAPI } from './api';
import { h, replaceChildren, setText, svg } from './dom';
import { formatDuration } from './format';
import { Poller } from './poller';
import { IStreamLayout, ITaskRecord, PALETTE_SIZE, layoutTaskStream } from './streamlayout';
import { IJob } from './types';

export interface IStageSummary {
  stage: string;
  tasks: number;
  queued?: number;
  running?: number;
  done?: number;
  failed?: number;
  cancelled?: number;
  nodes: string[];
}

/** One step of a pipeline item's path: its task in one stage. */
export interface IItemStep {
  stage: string;
  state: string;
  node: string | null;
  started?: number | null;
  finished?: number | null;
  moved?: number | null;
}

/** A pipeline's item: the stage it is in now, where, and its path through the stages. */
export interface IPipelineItem {
  item: number;
  stage: string;
  state: string;
  node: string | null;
  path: IItemStep[];
}

export interface IJobTaskStream {
  job: IJob;
  now: number;
  stages: IStageSummary[];
  tasks: ITaskRecord[];
  truncated: boolean;
  /** Absent from an older server extension. */
  items?: IPipelineItem[];
  items_truncated?: boolean;
}

const POLL_MS = 1000;
const LANE_HEIGHT = 18;
const LABEL_WIDTH = 70;
const WIDTH = 300; // the SVG's own units; it scales to the sidebar's width
const ITEM_ROWS = 100; // a sidebar list longer than this is not read; the REST answer has more

const isActive = (job: IJob) => job.state === 'queued' || job.state === 'running';

/** The job view that replaces the job list while open. */
export class JobDetail {
  readonly node = h('div', { class: 'gp-job-detail', hidden: true });

  constructor(
    onBack: () => void,
    settings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {
    this._settings = settings;
    const back = h('button', { class: 'gp-job-back jp-Button', type: 'button' }, '← My jobs');
    back.addEventListener('click', () => onBack());
    this.node.append(
      h('div', { class: 'gp-detail-head' }, back, this._title),
      this._error,
      h('div', { class: 'gp-subtitle gp-small' }, 'Progress per stage'),
      this._stages,
      h('div', { class: 'gp-subtitle gp-small' }, 'Task stream'),
      this._stream,
      this._legend,
      this._axis,
      this._items
    );
    this._error.hidden = true;
    this._items.hidden = true;
  }

  get jobId(): string | null {
    return this._jobId;
  }

  open(jobId: string): void {
    this._jobId = jobId;
    this.node.hidden = false;
    this.node.dataset.job = jobId;
    setText(this._title, jobId);
    replaceChildren(this._stages);
    replaceChildren(this._items);
    this._items.hidden = true;
    replaceChildren(this._stream, h('div', { class: 'gp-empty' }, 'Loading…'));
    replaceChildren(this._legend);
    this.pause(); // another job may have been open: fetch this one now, not at the next tick
    this.resume();
  }

  close(): void {
    this._jobId = null;
    this.node.hidden = true;
    this.pause();
  }

  /** Poll again (the sidebar is shown). */
  resume(): void {
    if (this._jobId !== null) {
      this._poller.start();
    }
  }

  /** Stop polling (the sidebar is hidden, or the job ended). */
  pause(): void {
    this._poller.stop();
  }

  private async _fetch(): Promise<void> {
    const id = this._jobId;
    if (id === null) {
      return;
    }
    let data: IJobTaskStream;
    try {
      data = await requestAPI<IJobTaskStream>(['jobs', id, 'tasks'], {}, this._settings);
    } catch (error) {
      if (id === this._jobId) {
        this._error.hidden = false;
        setText(this._error, (error as Error).message);
      }
      return;
    }
    if (id !== this._jobId) {
      return; // another job was opened meanwhile
    }
    this._error.hidden = true;
    this._render(data);
    if (!isActive(data.job)) {
      this.pause(); // a finished job does not change: one last picture is enough
    }
  }

  private _render(data: IJobTaskStream): void {
    const job = data.job;
    setText(this._title, `${job.name || job.id} · ${job.state}`);
    this.node.dataset.state = job.state;
    replaceChildren(this._stages, ...data.stages.map(s => stageRow(s)));
    const layout = layoutTaskStream(
      data.tasks,
      data.stages.map(s => s.stage),
      data.now
    );
    this._renderStream(layout, data);
    this._renderItems(data);
  }

  /** A pipeline's items: which stage each is in and on which node (none for other jobs). */
  private _renderItems(data: IJobTaskStream): void {
    const items = data.items ?? [];
    this._items.hidden = !items.length;
    if (!items.length) {
      replaceChildren(this._items);
      return;
    }
    const rows = items.slice(0, ITEM_ROWS).map(itemRow);
    const more = items.length - rows.length;
    replaceChildren(
      this._items,
      h('div', { class: 'gp-subtitle gp-small' }, 'Items: the stage each is in, and where'),
      ...rows,
      more > 0 || data.items_truncated
        ? h('div', { class: 'gp-items-more gp-small' }, `More items: grid-portal job ${data.job.id} lists them all.`)
        : null
    );
  }

  private _renderStream(layout: IStreamLayout, data: IJobTaskStream): void {
    if (!layout.lanes.length) {
      replaceChildren(this._stream, h('div', { class: 'gp-empty' }, 'No task has reached a node yet.'));
      replaceChildren(this._legend);
      setText(this._axis, '');
      return;
    }
    const height = layout.lanes.length * LANE_HEIGHT;
    const plot = WIDTH - LABEL_WIDTH;
    const chart = svg('svg', {
      class: 'gp-taskstream',
      viewBox: `0 0 ${WIDTH} ${height}`,
      preserveAspectRatio: 'none',
      role: 'img',
      'aria-label': `Task stream of ${data.job.name || data.job.id}`
    });
    layout.lanes.forEach(({ node, slot }, i) => {
      const lane = svg('g', { class: 'gp-ts-lane', 'data-node': node, 'data-slot': slot });
      lane.append(
        svg('rect', { class: 'gp-ts-lane-bg', x: LABEL_WIDTH, y: i * LANE_HEIGHT, width: plot, height: LANE_HEIGHT - 2 })
      );
      if (slot === 0) {
        lane.append(svg('text', { class: 'gp-ts-label', x: 2, y: i * LANE_HEIGHT + LANE_HEIGHT / 2 + 3 }, node));
      }
      chart.appendChild(lane);
    });
    for (const bar of layout.bars) {
      const t = bar.task;
      const took = (t.finished ?? data.now) - (t.started as number);
      const rect = svg(
        'rect',
        {
          class: `gp-ts-bar gp-ts-c${bar.colour}`,
          'data-state': t.state,
          'data-stage': t.stage,
          'data-node': t.node,
          x: LABEL_WIDTH + bar.x0 * plot,
          y: bar.lane * LANE_HEIGHT + 1,
          width: Math.max((bar.x1 - bar.x0) * plot, 0.8),
          height: LANE_HEIGHT - 4
        },
        svg('title', {}, `${t.stage}${t.item !== null ? ` #${t.item}` : ''} on ${t.node}: ${t.state}, ${formatDuration(took)}`)
      );
      chart.appendChild(rect);
    }
    replaceChildren(this._stream, chart);
    replaceChildren(
      this._legend,
      ...layout.stages.map((stage, i) =>
        h(
          'span',
          { class: 'gp-ts-key', 'data-stage': stage },
          h('span', { class: `gp-ts-swatch gp-ts-c${i % PALETTE_SIZE}` }),
          stage
        )
      )
    );
    setText(
      this._axis,
      `${formatDuration(layout.end - layout.start)} shown` + (data.truncated ? ' (latest tasks only)' : '')
    );
  }

  private _settings: ServerConnection.ISettings;
  private _jobId: string | null = null;
  private _poller = new Poller(() => this._fetch(), POLL_MS);
  private _title = h('h3', { class: 'gp-job-detail-name' });
  private _error = h('div', { class: 'gp-job-error gp-job-detail-error' });
  private _stages = h('div', { class: 'gp-stages' });
  private _stream = h('div', { class: 'gp-taskstream-box' });
  private _legend = h('div', { class: 'gp-ts-legend' });
  private _axis = h('div', { class: 'gp-ts-axis' });
  private _items = h('div', { class: 'gp-items' });
}

function itemRow(item: IPipelineItem): HTMLElement {
  const where = item.node ? `on ${item.node}` : 'waiting for a node';
  const path = item.path
    .map(step => `${step.stage}@${step.node ?? '-'}${step.state === 'done' ? '' : ` (${step.state})`}`)
    .join(' → ');
  return h(
    'div',
    {
      class: 'gp-item-row gp-row-line',
      'data-item': item.item,
      'data-stage': item.stage,
      'data-state': item.state,
      'data-node': item.node ?? '',
      title: path
    },
    h('span', { class: 'gp-item-index' }, `#${item.item}`),
    h('span', { class: 'gp-item-where' }, `${item.stage} ${where}`),
    h('span', { class: 'gp-item-state' }, item.state)
  );
}

function stageRow(s: IStageSummary): HTMLElement {
  const total = Math.max(s.tasks, 1);
  const pct = (n: number | undefined) => `${(((n ?? 0) * 100) / total).toFixed(1)}%`;
  const parts = [`${s.done ?? 0}/${s.tasks} done`];
  if (s.running) {
    parts.push(`${s.running} running`);
  }
  if (s.queued) {
    parts.push(`${s.queued} queued`);
  }
  if (s.failed) {
    parts.push(`${s.failed} failed`);
  }
  return h(
    'div',
    { class: 'gp-stage-row', 'data-stage': s.stage },
    h('div', { class: 'gp-row-line' }, h('span', { class: 'gp-stage-name' }, s.stage), h('span', { class: 'gp-stage-count' }, parts.join(', '))),
    h(
      'div',
      { class: 'gp-progress' },
      h('div', { class: 'gp-progress-done', style: `width: ${pct(s.done)}` }),
      h('div', { class: 'gp-progress-running', style: `width: ${pct(s.running)}` }),
      h('div', { class: 'gp-progress-failed', style: `width: ${pct(s.failed)}` })
    )
  );
}
