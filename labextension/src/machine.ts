/**
 * "This machine" (`.gp-machine`): shown only while a volunteer of this Jupyter server's user
 * runs on its machine. Per portal it serves: its state, share (percent), the home portal that
 * lends it when it is a peer's, tasks and core-seconds received, running tasks and its
 * problem; what `grid-portal volunteer status` prints. Collapsible (a `<details>`: it stays
 * as the user left it while the sidebar refreshes it).
 *
 * It polls `GET grid/api/volunteer` only while the sidebar is shown, as "Portals" polls
 * `GET grid/api/portals`; the server asks the volunteer over its control socket.
 */

import { ServerConnection } from '@jupyterlab/services';

import { requestAPI } from './api';
import { h, replaceChildren } from './dom';
import { Poller } from './poller';
import { PORTALS_POLL_MS } from './portals';
import {
  IMachinePortal,
  IMachineVolunteer,
  IThisMachine,
  receivedText,
  runningText,
  shareText,
  volunteerStateText
} from './volunteer';

export class MachineSection {
  readonly node = h('details', { class: 'gp-machine', hidden: true, open: true });

  constructor(settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {
    this._settings = settings;
    this.node.append(h('summary', { class: 'gp-subtitle gp-machine-title' }, 'This machine'), this._list);
  }

  start(): void {
    this._poller.start();
  }

  stop(): void {
    this._poller.stop();
  }

  private async _fetch(): Promise<void> {
    let answer: IThisMachine;
    try {
      answer = await requestAPI<IThisMachine>(['volunteer'], {}, this._settings);
    } catch {
      return; // the main feed's banner says what is wrong with the server
    }
    const volunteers = answer.running ? (answer.volunteers ?? []) : [];
    this.node.hidden = volunteers.length === 0;
    const text = JSON.stringify(volunteers);
    if (text !== this._last) {
      this._last = text; // rebuilt only when it changed: a text selection survives a poll
      replaceChildren(this._list, ...volunteers.map(volunteerGroup));
    }
  }

  private _settings: ServerConnection.ISettings;
  private _poller = new Poller(() => this._fetch(), PORTALS_POLL_MS);
  private _last = '';
  private _list = h('div', { class: 'gp-machine-list' });
}

function volunteerGroup(v: IMachineVolunteer): HTMLElement {
  const state = volunteerStateText(v);
  return h(
    'div',
    { class: 'gp-machine-volunteer', 'data-volunteer': v.name, 'data-state': v.state ?? 'unknown' },
    h(
      'div',
      { class: 'gp-row-line gp-row-head' },
      h('span', { class: 'gp-machine-name' }, v.name),
      state && h('span', { class: 'gp-machine-state' }, state)
    ),
    v.problem && h('div', { class: 'gp-machine-problem gp-job-error' }, v.problem),
    ...v.portals.map(portalRow)
  );
}

function portalRow(p: IMachinePortal): HTMLElement {
  const running = runningText(p);
  return h(
    'div',
    { class: 'gp-machine-portal', 'data-portal': p.portal, 'data-state': p.state ?? 'unknown' },
    h(
      'div',
      { class: 'gp-row-line' },
      h('span', { class: 'gp-machine-portal-name' }, p.portal),
      h('span', { class: `gp-machine-portal-state gp-state-${p.state ?? 'unknown'}` }, p.state ?? '')
    ),
    h(
      'div',
      { class: 'gp-row-line gp-job-meta' },
      h(
        'span',
        {
          class: 'gp-machine-share',
          title: p.lent_by
            ? `Served while ${p.lent_by} has no work for this machine`
            : 'Its part of this machine when several portals have work'
        },
        shareText(p)
      ),
      h('span', { class: 'gp-machine-received' }, receivedText(p)),
      running && h('span', { class: 'gp-machine-running' }, running)
    ),
    p.problem && h('div', { class: 'gp-machine-problem gp-job-error' }, p.problem)
  );
}
