import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  IMachinePortal,
  receivedText,
  runningText,
  shareText,
  volunteerStateText
} from '../src/volunteer';

function portal(fields: Partial<IMachinePortal> = {}): IMachinePortal {
  return {
    portal: 'lab:8788',
    state: 'running',
    share: 2,
    share_percent: 66.7,
    lent_by: null,
    tasks: 3,
    core_seconds: 1.234,
    running_tasks: 0,
    problem: null,
    ...fields
  };
}

describe('"This machine" (the words of `grid-portal volunteer status`)', () => {
  it('gives a portal its share and its percent of the machine', () => {
    assert.equal(shareText(portal()), 'share 2 (67%)');
    assert.equal(shareText(portal({ share: 0.5, share_percent: 20 })), 'share 0.5 (20%)');
    assert.equal(shareText(portal({ share_percent: null })), 'share 2');
  });
  it('says which home portal lends the machine to a peer, with no share', () => {
    assert.equal(shareText(portal({ lent_by: 'home:8788', share_percent: null })), 'lent by home:8788');
  });
  it('counts tasks and core-seconds received', () => {
    assert.equal(receivedText(portal()), 'received 3 tasks, 1.2 core-s');
    assert.equal(receivedText(portal({ tasks: 1, core_seconds: 0.46 })), 'received 1 task, 0.5 core-s');
    assert.equal(receivedText(portal({ tasks: null, core_seconds: null })), 'received 0 tasks, 0.0 core-s');
  });
  it('shows running tasks only when there are some', () => {
    assert.equal(runningText(portal({ running_tasks: 2 })), '2 running');
    assert.equal(runningText(portal({ running_tasks: 0 })), null);
    assert.equal(runningText(portal({ running_tasks: null })), null);
  });
  it('gives the volunteer state with its reason', () => {
    const v = { name: 'pc', state: 'paused', reason: 'owner busy', problem: null, portals: [] };
    assert.equal(volunteerStateText(v), 'paused (owner busy)');
    assert.equal(volunteerStateText({ ...v, state: 'running', reason: null }), 'running');
    assert.equal(volunteerStateText({ ...v, state: null }), null);
  });
});
