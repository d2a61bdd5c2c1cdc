/**
 * The "Grid" sidebar: totals, the node list (virtualised), a node detail view and the
 * user's jobs. Plain DOM inside a Lumino widget; all decisions about data live in the pure
 * modules (filter, format, model, sparkline, timing).
 *
 * Rendering happens at most once per animation frame and only while the panel is visible,
 * so a burst of websocket deltas or a hidden sidebar costs next to nothing. A render touches
 * only what changed: the totals when the capacity did, the rows in view whose node did (rows
 * are kept by node name and moved, not rebuilt, as the list scrolls), the jobs when they or
 * the clock's second did. At 1,000 nodes that keeps a render to a few milliseconds
 * (docs/benchmarks.md, "The sidebar at 1,000 nodes").
 */

import { showErrorMessage } from '@jupyterlab/apputils';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { GridApiError } from './api';
import { GridConnection } from './connection';
import { h, replaceChildren, setText } from './dom';
import {
  INodeFilter,
  INodeSort,
  NameOrder,
  NodeSortKey,
  filterAndSortNodes,
  sortJobs
} from './filter';
import { formatSize, plural } from './format';
import { gridIcon } from './icon';
import { LanSection, RequestsSection } from './lan';
import { MachineSection } from './machine';
import { Poller } from './poller';
import { PortalsSection } from './portals';
import { JobDetail } from './taskstream';
import { visibleRange } from './timing';
import { IGridNode, IJob } from './types';
import { ALL_COLUMNS, Column, JobRow, NODE_ROW_HEIGHT, NodeRow, nodeDetailContent } from './views';

export const SIDEBAR_ID = 'grid-portal:sidebar';

/** How often everyone's jobs are fetched while the sidebar shows them. */
const EVERYONE_POLL_MS = 2000;

/** Finished jobs kept in the list; older ones drop off (the CLI has the full history). */
const MAX_FINISHED_JOBS = 30;

const SORT_LABELS: { [K in NodeSortKey]: string } = {
  name: 'Name',
  state: 'State',
  cpu: 'CPU use',
  memory: 'Memory use',
  gpu: 'GPU use',
  free: 'Free cores'
};

const nowSeconds = () => Date.now() / 1000;

interface ITile {
  el: HTMLElement;
  num: HTMLElement;
  of: HTMLElement;
  label: HTMLElement;
}

interface ITiles {
  nodes: ITile;
  cores: ITile;
  gpus: ITile;
  memory: ITile;
}

export class GridSidebar extends Widget {
  constructor(connection: GridConnection) {
    super();
    this._connection = connection;
    this.id = SIDEBAR_ID;
    this.addClass('gp-sidebar');
    this.title.icon = gridIcon;
    this.title.caption = 'Grid';
    this._buildLayout();
    connection.changed.connect(this._scheduleRender, this);
  }

  /** Which parts of a node row to show (from the settings). */
  setColumns(columns: readonly string[]): void {
    const known = columns.filter((c): c is Column => (ALL_COLUMNS as string[]).includes(c));
    this._columns = new Set(known);
    this._rows.clear(); // rows are keyed by node only: rebuild them all
    replaceChildren(this._spacer);
    this._lastNodes = null;
    this._scheduleRender();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._connection.changed.disconnect(this._scheduleRender, this);
    this._stopTick();
    this._stopPoll();
    this._lan.stop();
    this._requests.pause();
    this._portals.stop();
    this._machine.stop();
    this._jobDetail.pause();
    if (this._frame !== null) {
      cancelAnimationFrame(this._frame);
    }
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    this._startTick();
    this._lan.start();
    this._requests.start();
    this._portals.start();
    this._machine.start();
    this._jobDetail.resume();
    if (this._everyone) {
      this._startPoll();
    }
    this._scheduleRender();
  }

  protected onAfterHide(msg: Message): void {
    this._stopTick();
    this._lan.stop();
    this._requests.pause();
    this._portals.stop();
    this._machine.stop();
    this._jobDetail.pause();
    this._stopPoll();
  }

  protected onResize(msg: Widget.ResizeMessage): void {
    this._scheduleRender();
  }

  private _buildLayout(): void {
    const search = h('input', {
      class: 'gp-search jp-mod-styled',
      type: 'search',
      placeholder: 'Search nodes, GPUs, labels…',
      'aria-label': 'Search nodes'
    });
    search.addEventListener('input', () => {
      this._filter = { ...this._filter, text: search.value };
      this._list.scrollTop = 0;
      this._scheduleRender();
    });
    const check = (cls: string, label: string, key: 'gpuOnly' | 'idleOnly') => {
      const box = h('input', { type: 'checkbox', class: cls });
      box.addEventListener('change', () => {
        this._filter = { ...this._filter, [key]: box.checked };
        this._list.scrollTop = 0;
        this._scheduleRender();
      });
      return h('label', { class: 'gp-check' }, box, label);
    };
    const sort = h('select', { class: 'gp-sort', 'aria-label': 'Sort nodes by', title: 'Sort nodes by' });
    for (const [key, label] of Object.entries(SORT_LABELS)) {
      sort.appendChild(h('option', { value: key }, label));
    }
    sort.addEventListener('change', () => {
      const key = sort.value as NodeSortKey;
      // Names read best A to Z; every measure reads best largest first.
      this._sort = { key, descending: key !== 'name' && key !== 'state' };
      dir.textContent = this._sort.descending ? '↓' : '↑';
      this._scheduleRender();
    });
    const dir = h('button', {
      class: 'gp-sort-dir jp-Button',
      type: 'button',
      title: 'Reverse the order'
    }, '↑');
    dir.addEventListener('click', () => {
      this._sort = { ...this._sort, descending: !this._sort.descending };
      dir.textContent = this._sort.descending ? '↓' : '↑';
      this._scheduleRender();
    });

    this._list.addEventListener('scroll', () => this._scheduleRender(), { passive: true });
    this._list.appendChild(this._spacer);
    // One listener for all rows: rows come and go as the list scrolls.
    this._list.addEventListener('click', event => {
      const row = (event.target as Element).closest<HTMLElement>('.gp-node-row');
      if (row?.dataset.node) {
        this._openNode(row.dataset.node);
      }
    });
    this._list.addEventListener('keydown', event => {
      const row = (event.target as Element).closest<HTMLElement>('.gp-node-row');
      if (row?.dataset.node && (event.key === 'Enter' || event.key === ' ')) {
        event.preventDefault();
        this._openNode(row.dataset.node);
      }
    });

    const back = h('button', { class: 'gp-back jp-Button', type: 'button' }, '← All nodes');
    back.addEventListener('click', () => this._closeNode());
    this._detail.append(
      h('div', { class: 'gp-detail-head' }, back, this._detailTitle),
      this._detailBody
    );
    this._detail.hidden = true;

    this._toolbar.append(
      search,
      h(
        'div',
        { class: 'gp-toolbar-row' },
        check('gp-filter-gpu', 'GPU nodes', 'gpuOnly'),
        check('gp-filter-idle', 'Idle', 'idleOnly'),
        h('span', { class: 'gp-spacer' }),
        sort,
        dir
      ),
      this._nodeCount
    );

    this._everyoneBox.addEventListener('change', () => this._setEveryone(this._everyoneBox.checked));
    // A click on one of your jobs (not on its Cancel button) opens its task stream.
    this._jobList.addEventListener('click', event => {
      const target = event.target as Element;
      const row = target.closest<HTMLElement>('.gp-job-row');
      if (row?.dataset.job && !target.closest('button') && row.dataset.mine !== 'false') {
        this._jobList.hidden = true;
        this._jobDetail.open(row.dataset.job);
      }
    });

    const retry = this._retry;
    retry.addEventListener('click', () => this._connection.reconnectNow());

    this.node.append(
      h(
        'header',
        { class: 'gp-header' },
        h('h2', { class: 'gp-title' }, 'Grid'),
        this._connStatus
      ),
      h('div', { class: 'gp-error', role: 'alert', hidden: true }, this._errorText, retry),
      this._lan.node,
      this._requests.node,
      this._portals.node,
      this._machine.node,
      this._totals,
      h(
        'section',
        { class: 'gp-nodes' },
        this._toolbar,
        this._list,
        this._detail
      ),
      h(
        'section',
        { class: 'gp-jobs' },
        h('h3', { class: 'gp-subtitle' }, this._jobsTitle, this._others, this._everyoneToggle),
        this._jobList,
        this._jobDetail.node
      )
    );
  }

  private _openNode(name: string): void {
    this._listScroll = this._list.scrollTop;
    void this._connection.watchNode(name);
  }

  private _closeNode(): void {
    this._connection.unwatchNode();
  }

  private _scheduleRender(): void {
    if (this._frame !== null || this.isDisposed) {
      return;
    }
    this._frame = requestAnimationFrame(() => {
      this._frame = null;
      if (this.isVisible) {
        this._render();
      }
    });
  }

  private _render(): void {
    const now = nowSeconds();
    const second = Math.floor(now);
    const ticked = second !== this._lastSecond;
    this._lastSecond = second;
    this._renderStatus(now);
    this._renderTotals();
    const state = this._connection.state;
    const detail = this._connection.detail;
    const showDetail = detail !== null;
    if (this._list.hidden !== showDetail) {
      this._list.hidden = showDetail;
      this._toolbar.hidden = showDetail;
      this._detail.hidden = !showDetail;
      if (!showDetail) {
        this._list.scrollTop = this._listScroll;
      }
    }
    if (detail) {
      const node = state.nodes.get(detail.name);
      if (ticked || detail !== this._lastDetail || node !== this._lastDetailNode) {
        this._lastDetail = detail;
        this._lastDetailNode = node;
        setText(this._detailTitle, detail.name);
        replaceChildren(this._detailBody, ...nodeDetailContent(node, detail, now));
      }
    } else {
      this._lastDetail = null;
      this._renderNodes(now);
    }
    if (this._role === 'unknown' && state.loaded && !state.error) {
      void this._loadRole();
    }
    const others = this._connection.others;
    if (ticked || state.jobs !== this._lastJobs || others !== this._lastOthers) {
      this._lastJobs = state.jobs;
      this._lastOthers = others;
      this._renderJobs(now);
    }
  }

  private _renderStatus(now: number): void {
    const conn = this._connection;
    const state = conn.state;
    let text: string;
    switch (conn.status) {
      case 'open':
        // The link to the Jupyter server is up, but the server may have lost the portal:
        // then what is shown is the last known state, not live.
        text = !state.loaded ? 'connecting…' : state.error ? 'stale' : 'live';
        break;
      case 'connecting':
        text = 'connecting…';
        break;
      case 'waiting': {
        const secs = Math.max(0, Math.ceil(((conn.retryAt ?? 0) - Date.now()) / 1000));
        text = `reconnecting in ${secs} s`;
        break;
      }
      case 'standby':
        text = 'paused while hidden';
        break;
      default:
        text = 'stopped';
    }
    setText(this._connStatus, text);
    const stale = state.error ? 'true' : 'false';
    if (this._connStatus.dataset.status !== conn.status) {
      this._connStatus.dataset.status = conn.status;
    }
    if (this._connStatus.dataset.stale !== stale) {
      this._connStatus.dataset.stale = stale;
    }
    const banner = this._errorText.parentElement as HTMLElement;
    if (banner.hidden !== !state.error) {
      banner.hidden = !state.error;
    }
    setText(this._errorText, state.error ?? '');
    // "Retry now" skips the sidebar's own wait to reconnect; while the socket is up the
    // server retries the portal by itself, and the button would do nothing.
    const noRetry = conn.status === 'open' || conn.status === 'connecting';
    if (this._retry.hidden !== noRetry) {
      this._retry.hidden = noRetry;
    }
  }

  private _renderTotals(): void {
    const c = this._connection.state.capacity;
    if (c === this._lastCapacity && this._totals.firstChild) {
      return;
    }
    this._lastCapacity = c;
    if (!c) {
      this._tiles = null;
      replaceChildren(this._totals, h('div', { class: 'gp-empty' }, 'Waiting for the grid…'));
      return;
    }
    if (!this._tiles) {
      const tile = (key: string): ITile => {
        const num = h('span', { class: 'gp-total-num' });
        const of = h('span', { class: 'gp-total-of' });
        const label = h('div', { class: 'gp-total-label' });
        // The space is a break opportunity: narrow sidebars wrap "/ total" under the value.
        const value = h('div', { class: 'gp-total-value' }, num, ' ', of);
        const el = h('div', { class: 'gp-total', 'data-total': key }, value, label);
        return { el, num, of, label };
      };
      this._tiles = {
        nodes: tile('nodes'),
        cores: tile('cores'),
        gpus: tile('gpus'),
        memory: tile('memory')
      };
      const t = this._tiles;
      replaceChildren(this._totals, t.nodes.el, t.cores.el, t.gpus.el, t.memory.el);
    }
    const tiles = this._tiles;
    const fill = (t: ITile, label: string, value: string, of: string) => {
      setText(t.num, value);
      setText(t.of, `/ ${of}`);
      setText(t.label, label);
      const title = `${value} ${label} of ${of}`;
      if (t.el.title !== title) {
        t.el.title = title;
      }
    };
    fill(tiles.nodes, 'nodes online', `${c.nodes_online}`, `${c.nodes_total}`);
    fill(tiles.cores, 'cores free', `${c.cores_free}`, `${c.cores_total}`);
    fill(tiles.gpus, 'GPUs free', `${c.gpus_free}`, `${c.gpus_total}`);
    fill(tiles.memory, 'memory free', formatSize(c.memory_free), formatSize(c.memory_total));
  }

  private _renderNodes(now: number): void {
    const state = this._connection.state;
    if (state.nodes !== this._lastNodes || this._filter !== this._lastFilter || this._sort !== this._lastSort) {
      this._visible = filterAndSortNodes(state.nodes.values(), this._filter, this._sort, this._order);
      this._lastNodes = state.nodes;
      this._lastFilter = this._filter;
      this._lastSort = this._sort;
    }
    const nodes = this._visible;
    const total = state.nodes.size;
    setText(
      this._nodeCount,
      !state.loaded
        ? ''
        : total === 0
          ? 'No nodes have joined the grid yet.'
          : nodes.length === total
            ? plural(total, 'node')
            : `${nodes.length} of ${plural(total, 'node')} match`
    );

    const height = nodes.length * NODE_ROW_HEIGHT;
    if (height !== this._spacerHeight) {
      this._spacerHeight = height;
      this._spacer.style.height = `${height}px`;
    }
    const { start, end } = visibleRange(
      this._list.scrollTop,
      this._list.clientHeight,
      NODE_ROW_HEIGHT,
      nodes.length
    );
    // Keep the rows of nodes still in view (a click between press and release must land on
    // the same element, and an unchanged row costs nothing); drop the rest.
    const keep = new Map<string, NodeRow>();
    for (let i = start; i < end; i++) {
      const node = nodes[i];
      let row = this._rows.get(node.name);
      if (row) {
        this._rows.delete(node.name);
      } else {
        row = new NodeRow(node.name);
        this._spacer.appendChild(row.node);
      }
      keep.set(node.name, row);
      row.update(node, i, this._columns, now);
    }
    for (const row of this._rows.values()) {
      row.node.remove();
    }
    this._rows = keep;
  }

  /** Staff (a class's teachers, the portal's admin) get the "everyone" toggle. */
  private async _loadRole(): Promise<void> {
    this._role = 'loading';
    try {
      const who = await this._connection.whoami();
      this._me = who.user;
      this._role = who.staff ? 'staff' : 'other';
      this._everyoneToggle.hidden = !who.staff;
      this._admin = who.role === 'admin';
      this._updateRequests();
    } catch {
      this._role = 'unknown'; // asked again once the portal answers
    }
  }

  /** Join requests are the admin's, of a portal this server is configured for. */
  private _updateRequests(): void {
    this._requests.setAdmin(this._admin && this._lan.configured === true);
  }

  private _setEveryone(on: boolean): void {
    this._everyone = on;
    this._everyoneJobs = null;
    setText(this._jobsTitle, on ? 'Everyone’s jobs' : 'My jobs');
    this._stopPoll();
    if (on && this.isVisible) {
      this._startPoll();
    }
    this._lastJobs = null;
    this._scheduleRender();
  }

  /** Everyone's jobs are not on the events feed (it carries the user's own): poll them. */
  private _startPoll(): void {
    this._everyonePoller.start();
  }

  private _stopPoll(): void {
    this._everyonePoller.stop();
  }

  private async _fetchEveryone(): Promise<void> {
    try {
      this._everyoneJobs = await this._connection.everyoneJobs();
    } catch (error) {
      if ((error as GridApiError).status === 403) {
        this._everyoneBox.checked = false;
        this._everyoneToggle.hidden = true;
        this._setEveryone(false);
      }
      return;
    }
    this._lastJobs = null;
    this._scheduleRender();
  }

  private _renderJobs(now: number): void {
    const source: Iterable<IJob> =
      this._everyone && this._everyoneJobs
        ? this._everyoneJobs
        : this._connection.state.jobs.values();
    const all = sortJobs(source);
    let finished = 0;
    const jobs = all.filter(j =>
      j.state === 'queued' || j.state === 'running' ? true : finished++ < MAX_FINISHED_JOBS
    );
    const others = this._connection.others;
    setText(
      this._others,
      others ? ` · others: ${others.running} running, ${others.queued} queued` : ''
    );
    if (!jobs.length) {
      this._jobRows.clear();
      if (!this._jobList.firstElementChild?.classList.contains('gp-empty')) {
        replaceChildren(
          this._jobList,
          h('div', { class: 'gp-empty' }, 'No jobs yet. Use “Run cell on grid” or %%grid in a notebook.')
        );
      }
      return;
    }
    const rows = new Map<string, JobRow>();
    const ordered: HTMLElement[] = [];
    for (const job of jobs) {
      let row = this._jobRows.get(job.id);
      if (!row) {
        row = new JobRow(job, id => void this._cancel(id));
      }
      row.update(job, now, !this._everyone || job.owner === this._me);
      rows.set(job.id, row);
      ordered.push(row.node);
    }
    this._jobRows = rows;
    // Reorder without detaching rows that are already in place.
    const list = this._jobList;
    for (let i = 0; i < ordered.length; i++) {
      if (list.children[i] !== ordered[i]) {
        list.insertBefore(ordered[i], list.children[i] ?? null);
      }
    }
    while (list.children.length > ordered.length) {
      list.lastElementChild?.remove();
    }
  }

  private async _cancel(id: string): Promise<void> {
    try {
      await this._connection.cancelJob(id);
    } catch (error) {
      this._jobRows.get(id)?.enableCancel();
      void showErrorMessage('Cancel job', (error as Error).message);
    }
  }

  /** A 1 s tick while shown: elapsed times, "last seen" and the retry countdown move on. */
  private _startTick(): void {
    if (this._tick === null) {
      this._tick = window.setInterval(() => this._scheduleRender(), 1000);
    }
  }

  private _stopTick(): void {
    if (this._tick !== null) {
      window.clearInterval(this._tick);
      this._tick = null;
    }
  }

  private _connection: GridConnection;
  private _lan = new LanSection(() => {
    this._role = 'unknown'; // asked again: a join changes who this server is at the portal
    this._admin = false;
    this._updateRequests();
    this._scheduleRender();
  });
  private _admin = false;
  private _jobDetail = new JobDetail(() => {
    this._jobDetail.close();
    this._jobList.hidden = false;
  });
  private _requests = new RequestsSection();
  private _portals = new PortalsSection();
  private _machine = new MachineSection();
  private _columns: ReadonlySet<Column> = new Set(ALL_COLUMNS);
  private _filter: INodeFilter = { gpuOnly: false, idleOnly: false, text: '' };
  private _sort: INodeSort = { key: 'name', descending: false };
  private _visible: IGridNode[] = [];
  private _lastNodes: unknown = null;
  private _lastFilter: INodeFilter | null = null;
  private _lastSort: INodeSort | null = null;
  private _order = new NameOrder();
  private _rows = new Map<string, NodeRow>();
  private _spacerHeight = -1;
  private _lastSecond = -1;
  private _lastCapacity: unknown = undefined;
  private _tiles: ITiles | null = null;
  private _lastJobs: unknown = null;
  private _lastOthers: unknown = undefined;
  private _lastDetail: unknown = null;
  private _lastDetailNode: unknown = undefined;
  private _jobRows = new Map<string, JobRow>();
  private _frame: number | null = null;
  private _tick: number | null = null;
  private _listScroll = 0;

  private _connStatus = h('span', { class: 'gp-conn' });
  private _errorText = h('span', { class: 'gp-error-text' });
  private _retry = h('button', { class: 'gp-retry jp-Button', type: 'button' }, 'Retry now');
  private _totals = h('div', { class: 'gp-totals' });
  private _nodeCount = h('div', { class: 'gp-node-count' });
  private _toolbar = h('div', { class: 'gp-toolbar' });
  private _list = h('div', { class: 'gp-node-list', role: 'list' });
  private _spacer = h('div', { class: 'gp-node-spacer' });
  private _detail = h('div', { class: 'gp-node-detail' });
  private _detailTitle = h('h3', { class: 'gp-detail-name' });
  private _detailBody = h('div', { class: 'gp-detail-body' });
  private _others = h('span', { class: 'gp-others' });
  private _jobList = h('div', { class: 'gp-job-list' });
  private _jobsTitle = h('span', { class: 'gp-jobs-title' }, 'My jobs');
  private _everyoneBox = h('input', { type: 'checkbox', class: 'gp-everyone-input' });
  private _everyoneToggle = h(
    'label',
    { class: 'gp-everyone', hidden: true, title: 'Show every user’s jobs (staff only)' },
    this._everyoneBox,
    ' Everyone'
  );
  private _role: 'unknown' | 'loading' | 'staff' | 'other' = 'unknown';
  private _me = '';
  private _everyone = false;
  private _everyoneJobs: IJob[] | null = null;
  private _everyonePoller = new Poller(() => this._fetchEveryone(), EVERYONE_POLL_MS);
}
