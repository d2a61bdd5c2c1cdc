/**
 * Which peer portal lent a node. The portal names a lent node `NAME@PEER` and labels it
 * `site=PEER` (from how it enrolled, whatever the node says); its own nodes never have an `@`
 * in their names (enrolment cleans them), but their volunteers may set a `site` label of
 * their own. So a node is shown as lent only when both agree.
 */

import { IGridNode } from './types';

export function siteOf(node: Pick<IGridNode, 'name' | 'labels'>): string | null {
  const site = node.labels?.site;
  if (typeof site !== 'string' || !site) {
    return null;
  }
  return node.name.endsWith(`@${site}`) ? site : null;
}

