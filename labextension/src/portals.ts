/**
 * "Portals" (`.gp-portals`): for a researcher logged in to several portals (`grid-portal
 * login` to each), every portal's nodes grouped under it, with its nodes online, free cores
 * and which one is the default (the portal the rest of the sidebar shows). Hidden while
 * fewer than two portals are saved: the sidebar then shows its one portal as before.
 *
 * It polls `GET grid/api/portals` only while the sidebar is shown; the server lists the
 * saved portals and asks each through the Grid client (docs/rest-api.md).
 */

import { ServerConnection } from '@jupyterlab/services';

import { requestAPI } from './api';
import { h, replaceChildren } from './dom';
import { plural } from './format';
import { Poller } from './poller';
import { siteOf } from './site';
import { ICapacity, IGridNode } from './types';

/** How often the sidebar's sections about portals refresh while it is shown. */
export const PORTALS_POLL_MS = 5000;
/** Rows listed per portal; the rest are counted (the main list shows the default's all). */
const NODES_PER_PORTAL = 50;

/** One saved portal, as `GET grid/api/portals` lists it. */
export interface ISavedPortal {
  name: string;
  default: boolean;
  scheduler: string | null;
  capacity: ICapacity | null;
  nodes: IGridNode[];
  problem: string | null;
  /** The server is connecting to it now; its nodes follow. */
  connecting: boolean;
}

interface ISavedPortals {
  default: string | null;
  portals: ISavedPortal[];
}

export class PortalsSection {
  readonly node = h('section', { class: 'gp-portals', hidden: true });

  constructor(settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {
    this._settings = settings;
    this.node.append(h('h3', { class: 'gp-subtitle' }, 'Portals'), this._list);
  }

  start(): void {
    this._poller.start();
  }

  stop(): void {
    this._poller.stop();
  }

  private async _fetch(): Promise<void> {
    let answer: ISavedPortals;
    try {
      answer = await requestAPI<ISavedPortals>(['portals'], {}, this._settings);
    } catch {
      return; // the main feed's banner says what is wrong with the server or the portal
    }
    this.node.hidden = answer.portals.length < 2;
    const note =
      answer.default &&
      h('div', { class: 'gp-empty gp-portals-note' }, `The totals, nodes and jobs below are ${answer.default}'s.`);
    replaceChildren(this._list, ...answer.portals.map(portalGroup), note);
  }

  private _settings: ServerConnection.ISettings;
  private _poller = new Poller(() => this._fetch(), PORTALS_POLL_MS);
  private _list = h('div', { class: 'gp-portal-list' });
}

function portalGroup(p: ISavedPortal): HTMLElement {
  const c = p.capacity;
  const counts = c
    ? [
        h('span', { class: 'gp-portal-nodes' }, `${c.nodes_online} of ${plural(c.nodes_total, 'node')} online`),
        h('span', { class: 'gp-portal-cores' }, `${plural(c.cores_free, 'core')} free of ${c.cores_total}`)
      ]
    : [];
  const shown = p.nodes.slice(0, NODES_PER_PORTAL);
  const more = p.nodes.length - shown.length;
  return h(
    'div',
    { class: 'gp-portal-group', 'data-portal': p.name, 'data-default': p.default ? 'true' : 'false' },
    h(
      'div',
      { class: 'gp-row-line gp-row-head' },
      h('span', { class: 'gp-portal-name', title: p.scheduler ?? '' }, p.name),
      p.default &&
        h(
          'span',
          { class: 'gp-portal-default', title: 'The portal the rest of this sidebar shows' },
          'default'
        )
    ),
    h('div', { class: 'gp-row-line gp-job-meta' }, ...counts),
    p.problem && h('div', { class: 'gp-portal-problem gp-job-error' }, p.problem),
    p.connecting && !c && h('div', { class: 'gp-empty gp-portal-connecting' }, 'connecting…'),
    ...shown.map(portalNode),
    more > 0 && h('div', { class: 'gp-empty' }, `and ${plural(more, 'more node')}`)
  );
}

function portalNode(node: IGridNode): HTMLElement {
  const site = siteOf(node);
  return h(
    'div',
    { class: 'gp-portal-node gp-row-line', 'data-node': node.name, 'data-state': node.state },
    h('span', { class: `gp-dot gp-state-${node.state}` }),
    h('span', { class: 'gp-node-name' }, node.name),
    h('span', { class: `gp-node-state gp-state-${node.state}` }, node.state),
    site && siteBadge(site)
  );
}

/** "site school" beside a node lent by the peer portal `school`. */
export function siteBadge(site: string): HTMLElement {
  return h('span', { class: 'gp-node-site', title: `Lent by the peer portal ${site}` }, `site ${site}`);
}
