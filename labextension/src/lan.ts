/**
 * Portals on this network, and join requests for the admin.
 *
 * - "On this network" (`.gp-lan`): while this Jupyter server has no portal configured, the
 *   portals it found on the LAN (browsers cannot do mDNS; the server browses), each with
 *   its nodes online, address and whether its CA matched the announcement. "Join" sends a
 *   join request as a researcher; the pairing code is shown until the portal's admin
 *   answers, and once approved the server switches to that portal by itself (the events
 *   feed then brings its nodes).
 * - "Join requests" (`.gp-requests`): for the portal's admin, the requests waiting, with
 *   their pairing codes, to approve or deny.
 *
 * Both poll only while the sidebar is shown (`start`/`stop`), and every call goes through
 * the server extension's REST API (docs/rest-api.md).
 */

import { ServerConnection } from '@jupyterlab/services';

import { GridApiError, requestAPI } from './api';
import { h, replaceChildren, setText } from './dom';
import { formatDuration } from './format';
import { Poller } from './poller';

/** A portal as `GET grid/api/discovered` lists it. */
export interface IDiscoveredPortal {
  id: string;
  name: string;
  url: string;
  addresses: string[];
  nodes_online: number | null;
  verified: boolean | null;
  problem: string | null;
  /** For a portal that is not trusted: the problem and the way to type its address. */
  message?: string | null;
  ca_fingerprint: string;
}

interface IDiscovered {
  configured: boolean;
  portals: IDiscoveredPortal[];
  message: string | null;
}

/** `GET grid/api/discovered/join`. */
export interface IJoinStatus {
  portal: string;
  url: string;
  name: string;
  state: 'pending' | 'connected' | 'refused' | 'failed';
  request: string | null;
  code: string | null;
  expires_at: number | null;
  message: string | null;
  started_at: number;
}

/** One join request, as the admin sees it. */
export interface IJoinRequest {
  id: string;
  name: string;
  role: 'node' | 'client';
  code: string;
  address: string;
  created_at: number;
  expires_at: number;
  state: string;
}

const DISCOVERED_POLL_MS = 15000;
const JOIN_POLL_MS = 1000;
const REQUESTS_POLL_MS = 3000;

const nowSeconds = () => Date.now() / 1000;

/** `123456` -> `123 456`, as the CLI shows it. */
export function formatCode(code: string): string {
  return code.length === 6 ? `${code.slice(0, 3)} ${code.slice(3)}` : code;
}

/** The sidebar's "On this network" section. */
export class LanSection {
  readonly node = h('section', { class: 'gp-lan', hidden: true });

  /** `onChange` runs when whether this server has a portal is learnt, and after a join. */
  constructor(
    onChange: () => void = () => undefined,
    settings: ServerConnection.ISettings = ServerConnection.makeSettings()
  ) {
    this._settings = settings;
    this._onChange = onChange;
    const refresh = h('button', { class: 'gp-lan-refresh jp-Button', type: 'button', title: 'Look again' }, '↻');
    refresh.addEventListener('click', () => void this._fetch(true));
    this.node.append(
      h('h3', { class: 'gp-subtitle' }, 'On this network', refresh),
      this._status,
      this._message,
      this._list
    );
    this._status.hidden = true;
  }

  start(): void {
    if (this._poller.running) {
      return;
    }
    void this._fetch(false).then(() => {
      if (this._configured === false || this._join !== null) {
        void this._fetchJoin(); // a request sent before the page was reloaded
      }
    });
    this._poller.start(false); // fetched just above, with the join request after it
  }

  stop(): void {
    this._poller.stop();
    this._stopJoinPoll();
  }

  private async _fetch(refresh: boolean): Promise<void> {
    let data: IDiscovered;
    try {
      data = await requestAPI<IDiscovered>(['discovered'], {}, this._settings, refresh ? 'refresh=true' : '');
    } catch (error) {
      // An older server extension (404) or a server going down: say nothing here; the
      // sidebar's banner already tells what is wrong with the server.
      return;
    }
    const changed = this._configured !== data.configured;
    this._configured = data.configured;
    this._render(data);
    if (changed) {
      this._onChange();
    }
  }

  private _render(data: IDiscovered): void {
    // Once joined, the section stays only to show the outcome.
    const showJoin = this._join !== null;
    this.node.hidden = data.configured && !showJoin;
    this._list.hidden = data.configured;
    this._message.hidden = data.configured || !data.message;
    setText(this._message, data.message ?? '');
    if (data.configured) {
      return;
    }
    if (!data.portals.length) {
      replaceChildren(this._list);
      return;
    }
    replaceChildren(this._list, ...data.portals.map(p => this._portalRow(p)));
  }

  private _portalRow(p: IDiscoveredPortal): HTMLElement {
    const nodes = p.nodes_online === null ? '? nodes online' : `${p.nodes_online} nodes online`;
    const trusted = p.verified === true;
    const ca = trusted
      ? h('span', { class: 'gp-lan-ca', 'data-verified': 'true', title: `CA ${p.ca_fingerprint}` }, '✓ CA checked')
      : h(
          'span',
          { class: 'gp-lan-ca', 'data-verified': 'false' },
          // The message names the problem and what to do instead (an older server
          // extension sends only the problem).
          p.message ? '✗ not trusted' : `✗ not trusted: ${p.problem ?? 'not checked'}`
        );
    const advice = trusted || !p.message ? null : h('div', { class: 'gp-lan-problem gp-job-error' }, p.message);
    const join = h(
      'button',
      {
        class: 'gp-lan-join jp-Button',
        type: 'button',
        title: trusted ? `Ask ${p.name} to let you join as a researcher` : 'Only a portal whose CA checked out can be joined'
      },
      'Join'
    );
    join.disabled = !trusted || (this._join !== null && this._join.state === 'pending');
    join.addEventListener('click', () => void this._ask(p, join));
    return h(
      'div',
      { class: 'gp-lan-portal', 'data-portal-id': p.id, 'data-portal': p.name },
      h('div', { class: 'gp-row-line gp-row-head' }, h('span', { class: 'gp-lan-name' }, p.name), join),
      h(
        'div',
        { class: 'gp-row-line gp-lan-meta' },
        h('span', { class: 'gp-lan-nodes' }, nodes),
        h('span', { class: 'gp-lan-url' }, p.url)
      ),
      h('div', { class: 'gp-row-line' }, ca),
      advice
    );
  }

  private async _ask(p: IDiscoveredPortal, button: HTMLButtonElement): Promise<void> {
    button.disabled = true;
    try {
      const status = await requestAPI<IJoinStatus>(
        ['discovered', p.id, 'join'],
        { method: 'POST', body: JSON.stringify({}) },
        this._settings
      );
      this._showJoin(status);
      this._startJoinPoll();
    } catch (error) {
      button.disabled = false;
      this._showJoin({
        portal: p.name,
        url: p.url,
        name: '',
        state: 'failed',
        request: null,
        code: null,
        expires_at: null,
        message: (error as Error).message,
        started_at: nowSeconds()
      });
    }
  }

  private async _fetchJoin(): Promise<void> {
    try {
      const status = (await requestAPI<{ join: IJoinStatus | null }>(['discovered', 'join'], {}, this._settings))
        .join;
      if (status === null) {
        this._stopJoinPoll();
        return;
      }
      this._showJoin(status);
      if (status.state === 'pending') {
        this._startJoinPoll();
      } else {
        this._stopJoinPoll();
        if (status.state === 'connected') {
          this._onChange(); // another portal, another role
          void this._fetch(false); // the server has its portal now: the list goes
        }
      }
    } catch (error) {
      // The server went away: keep asking while the request may still be answered.
    }
  }

  private _startJoinPoll(): void {
    this._joinPoller.start(false); // each caller has just read the request's state
  }

  private _stopJoinPoll(): void {
    this._joinPoller.stop();
  }

  private _showJoin(status: IJoinStatus): void {
    this._join = status;
    this.node.hidden = false;
    this._status.hidden = false;
    this._status.dataset.state = status.state;
    const parts: HTMLElement[] = [];
    if (status.state === 'pending') {
      const waited = Math.max(0, nowSeconds() - status.started_at);
      const left = status.expires_at ? Math.max(0, status.expires_at - nowSeconds()) : null;
      parts.push(
        h('div', { class: 'gp-lan-asked' }, `Asked ${status.portal} as “${status.name}”. Pairing code:`),
        h('div', { class: 'gp-lan-code', title: 'The portal’s admin sees this same code' }, status.code ?? ''),
        h('div', { class: 'gp-lan-progress' }, h('div', { class: 'gp-lan-progress-fill' })),
        h(
          'div',
          { class: 'gp-lan-wait' },
          `Waiting for the admin to approve request ${status.request ?? ''} (${formatDuration(waited)}` +
            (left !== null ? `; expires in ${formatDuration(left)})` : ')')
        ),
        h('div', { class: 'gp-lan-note' }, 'Tell the admin this code; they approve only when it matches.')
      );
    } else {
      parts.push(h('div', { class: `gp-lan-outcome gp-lan-${status.state}` }, status.message ?? status.state));
    }
    replaceChildren(this._status, ...parts);
    // Join buttons are off while a request waits.
    for (const b of Array.from(this._list.querySelectorAll<HTMLButtonElement>('.gp-lan-join'))) {
      const row = b.closest<HTMLElement>('.gp-lan-portal');
      const trusted = row?.querySelector('.gp-lan-ca')?.getAttribute('data-verified') === 'true';
      b.disabled = !trusted || status.state === 'pending';
    }
  }

  /** Whether this server has its portal (then nothing is shown but a join's outcome). */
  get configured(): boolean | null {
    return this._configured;
  }

  private _settings: ServerConnection.ISettings;
  private _onChange: () => void;
  private _poller = new Poller(() => this._fetch(false), DISCOVERED_POLL_MS);
  private _joinPoller = new Poller(() => this._fetchJoin(), JOIN_POLL_MS);
  private _configured: boolean | null = null;
  private _join: IJoinStatus | null = null;
  private _status = h('div', { class: 'gp-lan-status', role: 'status' });
  private _message = h('div', { class: 'gp-empty gp-lan-message' });
  private _list = h('div', { class: 'gp-lan-list' });
}

/**
 * The admin's "Join requests" section: only when this server is connected to a portal it is
 * configured for (not the embedded one, which takes no join requests) as that portal's admin,
 * and only while requests wait.
 */
export class RequestsSection {
  readonly node = h('section', { class: 'gp-requests', hidden: true });

  constructor(settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {
    this._settings = settings;
    this.node.append(h('h3', { class: 'gp-subtitle' }, 'Join requests'), this._list);
  }

  /** Called with this server's role at the portal once known. */
  setAdmin(admin: boolean): void {
    this._admin = admin;
    if (!admin) {
      this.node.hidden = true;
      this.stop();
    } else if (this._wanted) {
      this.start();
    }
  }

  start(): void {
    this._wanted = true;
    if (this._admin) {
      this._poller.start();
    }
  }

  stop(): void {
    this._poller.stop();
  }

  /** `stop` because the sidebar is hidden: start again when it is shown. */
  pause(): void {
    this._wanted = false;
    this.stop();
  }

  private async _fetch(): Promise<void> {
    let requests: IJoinRequest[];
    try {
      requests = (await requestAPI<{ requests: IJoinRequest[] }>(['requests'], {}, this._settings)).requests;
    } catch (error) {
      if ((error as GridApiError).status === 403) {
        this.setAdmin(false);
      }
      return;
    }
    this.node.hidden = !requests.length;
    replaceChildren(this._list, ...requests.map(r => this._row(r)));
  }

  private _row(r: IJoinRequest): HTMLElement {
    const approve = h('button', { class: 'gp-request-approve jp-Button', type: 'button' }, 'Approve');
    const deny = h('button', { class: 'gp-request-deny jp-Button', type: 'button' }, 'Deny');
    const error = h('div', { class: 'gp-request-error gp-job-error', hidden: true });
    const decide = async (action: 'approve' | 'deny') => {
      approve.disabled = deny.disabled = true;
      try {
        await requestAPI<IJoinRequest>(['requests', r.id, action], { method: 'POST' }, this._settings);
        await this._fetch();
      } catch (e) {
        approve.disabled = deny.disabled = false;
        error.hidden = false;
        setText(error, (e as Error).message);
      }
    };
    approve.addEventListener('click', () => void decide('approve'));
    deny.addEventListener('click', () => void decide('deny'));
    const age = formatDuration(Math.max(0, nowSeconds() - r.created_at));
    return h(
      'div',
      { class: 'gp-request-row', 'data-request': r.id },
      h(
        'div',
        { class: 'gp-row-line gp-row-head' },
        h('span', { class: 'gp-request-code', title: 'Approve only if the requester shows this code' }, formatCode(r.code)),
        approve,
        deny
      ),
      h(
        'div',
        { class: 'gp-row-line gp-job-meta' },
        h('span', { class: 'gp-request-name' }, `${r.name} as ${r.role === 'node' ? 'a volunteer' : 'a researcher'}`),
        h('span', { class: 'gp-request-from' }, `from ${r.address}, ${age} ago`)
      ),
      error
    );
  }

  private _settings: ServerConnection.ISettings;
  private _poller = new Poller(() => this._fetch(), REQUESTS_POLL_MS);
  private _admin = false;
  private _wanted = false;
  private _list = h('div', { class: 'gp-request-list' });
}
