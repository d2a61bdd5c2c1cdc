/**
 * The live link to the grid: the `grid/api/events` websocket, applied to a client-side model.
 *
 * - Reconnects with exponential back-off (with jitter, so many tabs do not retry in step).
 * - Stands by while the page is hidden: the socket is closed and reopened on return, when
 *   the fresh snapshot brings the model up to date. An idle background tab costs the
 *   portal nothing.
 * - When the socket fails, asks `GET grid/api/capacity` why: a websocket cannot report an
 *   HTTP status, the REST answer (`{"error": ...}` with 503, or a 404 without the server
 *   extension) can.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import {
  GridApiError,
  IWhoami,
  cancelJob,
  getCapacity,
  getJobs,
  getNode,
  getWhoami
} from './api';
import {
  IGridState,
  appendHistory,
  applyEvent,
  emptyState,
  parseEvent,
  withError
} from './model';
import { backoffDelay } from './timing';
import { IJob, IOthers, ITelemetry } from './types';

export type ConnectionStatus = 'connecting' | 'open' | 'waiting' | 'standby' | 'stopped';

/** The node shown in the detail view, with its telemetry history. */
export interface INodeDetail {
  name: string;
  history: ITelemetry[];
  loading: boolean;
  error: string | null;
}

/** How often, at most, to refresh the counts of other users' jobs (ms). */
const OTHERS_REFRESH_MS = 10000;

export class GridConnection implements IDisposable {
  constructor(options: { settings?: ServerConnection.ISettings } = {}) {
    this._settings = options.settings ?? ServerConnection.makeSettings();
  }

  /** Emitted after any change of state, status, detail or others. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get state(): IGridState {
    return this._state;
  }

  get status(): ConnectionStatus {
    return this._status;
  }

  /** When the next reconnect attempt is due (epoch ms), while waiting. */
  get retryAt(): number | null {
    return this._status === 'waiting' ? this._retryAt : null;
  }

  /** Other users' jobs on the grid, from `GET jobs`; null until known. */
  get others(): IOthers | null {
    return this._others;
  }

  get detail(): INodeDetail | null {
    return this._detail;
  }

  get isDisposed(): boolean {
    return this._isDisposed;
  }

  /** Open the socket (unless the page is hidden) and follow the page's visibility. */
  start(): void {
    if (this._started || this._isDisposed) {
      return;
    }
    this._started = true;
    document.addEventListener('visibilitychange', this._onVisibility);
    if (document.visibilityState === 'hidden') {
      this._setStatus('standby');
    } else {
      this._open();
    }
  }

  /** Skip the back-off wait and try again now (the "Retry" button). */
  reconnectNow(): void {
    if (this._isDisposed || this._status === 'open' || this._status === 'connecting') {
      return;
    }
    this._attempt = 0;
    this._open();
  }

  async cancelJob(id: string): Promise<void> {
    await cancelJob(id, this._settings);
  }

  /** Who this server is at the portal (its role decides the "everyone" toggle). */
  whoami(): Promise<IWhoami> {
    return getWhoami(this._settings);
  }

  /** Everyone's jobs (staff only: others get a 403). */
  async everyoneJobs(): Promise<IJob[]> {
    return (await getJobs(this._settings, true)).jobs ?? [];
  }

  /** Show one node in detail: fetch its history, then extend it from live deltas. */
  async watchNode(name: string): Promise<void> {
    this._detail = { name, history: [], loading: true, error: null };
    this._changed.emit();
    try {
      const node = await getNode(name, this._settings);
      if (this._detail?.name !== name) {
        return; // another node was opened meanwhile
      }
      this._detail = { name, history: node.history ?? [], loading: false, error: null };
    } catch (error) {
      if (this._detail?.name !== name) {
        return;
      }
      this._detail = {
        name,
        history: [],
        loading: false,
        error: (error as Error).message
      };
    }
    this._changed.emit();
  }

  unwatchNode(): void {
    if (this._detail) {
      this._detail = null;
      this._changed.emit();
    }
  }

  dispose(): void {
    if (this._isDisposed) {
      return;
    }
    this._isDisposed = true;
    document.removeEventListener('visibilitychange', this._onVisibility);
    this._closeSocket();
    this._clearTimer();
    this._status = 'stopped';
    Signal.clearData(this);
  }

  private _eventsUrl(): string {
    let url = URLExt.join(this._settings.wsUrl, 'grid', 'api', 'events');
    if (this._settings.appendToken && this._settings.token) {
      url += `?token=${encodeURIComponent(this._settings.token)}`;
    }
    return url;
  }

  private _open(): void {
    this._clearTimer();
    this._closeSocket();
    this._setStatus('connecting');
    let socket: WebSocket;
    try {
      socket = new this._settings.WebSocket(this._eventsUrl());
    } catch (error) {
      this._onSocketGone();
      return;
    }
    this._socket = socket;
    socket.onopen = () => {
      this._setStatus('open');
    };
    socket.onmessage = (msg: MessageEvent) => {
      const event = parseEvent(msg.data);
      if (!event) {
        return;
      }
      if (event.type === 'snapshot') {
        // Only a snapshot proves the link works end to end; a server that accepts and
        // then drops us at once must not be hammered, so the back-off resets only here.
        this._attempt = 0;
        void this._refreshOthers(true);
      }
      if (event.type === 'jobs') {
        void this._refreshOthers(false);
      }
      if (event.type === 'nodes' && this._detail) {
        const changed = event.nodes?.find(n => n.name === this._detail?.name);
        if (changed) {
          this._detail = {
            ...this._detail,
            history: appendHistory(this._detail.history, changed.telemetry)
          };
        }
      }
      this._state = applyEvent(this._state, event);
      this._changed.emit();
    };
    socket.onclose = () => {
      if (this._socket === socket) {
        this._socket = null;
        this._onSocketGone();
      }
    };
    // onerror is always followed by onclose, which does the work.
  }

  /** The socket closed or never opened: find out why, then schedule a retry. */
  private _onSocketGone(): void {
    if (this._isDisposed || this._status === 'standby') {
      return;
    }
    const delay = backoffDelay(this._attempt++);
    this._retryAt = Date.now() + delay;
    this._setStatus('waiting');
    this._timer = window.setTimeout(() => {
      this._timer = null;
      this._open();
    }, delay);
    void this._probe();
  }

  /** Ask the REST API for the reason the live link failed. */
  private async _probe(): Promise<void> {
    try {
      const capacity = await getCapacity(this._settings);
      if (this._status !== 'open') {
        // The portal answers over REST, so what failed is only the live link.
        this._state = withError({ ...this._state, capacity }, null);
      }
    } catch (error) {
      const message =
        error instanceof GridApiError ? error.message : `The grid cannot be reached: ${error}`;
      this._state = withError(this._state, message);
    }
    this._changed.emit();
  }

  private async _refreshOthers(force: boolean): Promise<void> {
    const now = Date.now();
    if (!force && now - this._othersFetchedAt < OTHERS_REFRESH_MS) {
      return;
    }
    this._othersFetchedAt = now;
    try {
      const data = await getJobs(this._settings);
      this._others = data.others ?? null;
      this._changed.emit();
    } catch {
      // Not worth a banner: the counts are extra, and the websocket reports real trouble.
    }
  }

  private _onVisibility = (): void => {
    if (this._isDisposed) {
      return;
    }
    if (document.visibilityState === 'hidden') {
      this._clearTimer();
      this._closeSocket();
      this._setStatus('standby');
    } else if (this._status === 'standby') {
      this._attempt = 0;
      this._open();
    }
  };

  private _closeSocket(): void {
    const socket = this._socket;
    this._socket = null;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      socket.close();
    }
  }

  private _clearTimer(): void {
    if (this._timer !== null) {
      window.clearTimeout(this._timer);
      this._timer = null;
    }
  }

  private _setStatus(status: ConnectionStatus): void {
    if (this._status !== status) {
      this._status = status;
      this._changed.emit();
    }
  }

  private _settings: ServerConnection.ISettings;
  private _state: IGridState = emptyState();
  private _status: ConnectionStatus = 'stopped';
  private _socket: WebSocket | null = null;
  private _timer: number | null = null;
  private _attempt = 0;
  private _retryAt = 0;
  private _started = false;
  private _isDisposed = false;
  private _others: IOthers | null = null;
  private _othersFetchedAt = 0;
  private _detail: INodeDetail | null = null;
  private _changed = new Signal<this, void>(this);
}
