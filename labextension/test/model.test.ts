import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  appendHistory,
  applyEvent,
  emptyState,
  parseEvent,
  summarize,
  withError
} from '../src/model';
import { ICapacity } from '../src/types';
import { job, node, telemetry } from './fixtures';

const capacity: ICapacity = {
  nodes_online: 2,
  nodes_total: 3,
  cores_total: 24,
  cores_free: 16,
  gpus_total: 1,
  gpus_free: 1,
  memory_total: 48e9,
  memory_free: 30e9,
  tasks_running: 3
};

function loaded() {
  return applyEvent(emptyState(), {
    type: 'snapshot',
    version: 5,
    nodes: [node('a'), node('b'), node('c', { state: 'offline' })],
    jobs: [job('j1'), job('j2', { state: 'done', finished: 200 })],
    capacity
  });
}

describe('applyEvent', () => {
  it('a snapshot replaces everything and marks the state loaded', () => {
    const s = loaded();
    assert.equal(s.loaded, true);
    assert.equal(s.version, 5);
    assert.deepEqual([...s.nodes.keys()], ['a', 'b', 'c']);
    assert.deepEqual([...s.jobs.keys()], ['j1', 'j2']);
    assert.equal(s.capacity, capacity);
    const again = applyEvent(s, {
      type: 'snapshot',
      version: 1,
      nodes: [node('z')],
      jobs: [],
      capacity
    });
    assert.deepEqual([...again.nodes.keys()], ['z'], 'a lower version after reconnect still wins');
    assert.equal(again.jobs.size, 0);
  });

  it('a nodes delta replaces changed nodes and removes gone ones', () => {
    const s = loaded();
    const next = applyEvent(s, {
      type: 'nodes',
      version: 6,
      nodes: [node('a', { state: 'busy' }), node('d')],
      removed: ['b']
    });
    assert.deepEqual([...next.nodes.keys()].sort(), ['a', 'c', 'd']);
    assert.equal(next.nodes.get('a')?.state, 'busy');
    assert.equal(next.version, 6);
    assert.equal(s.nodes.get('a')?.state, 'online', 'the old state is untouched');
    assert.equal(s.nodes.has('b'), true);
  });

  it('a node sent without its capacity keeps the capacity it had', () => {
    const s = loaded();
    const { capacity: _, ...slim } = node('a', { state: 'busy' });
    const next = applyEvent(s, { type: 'nodes', version: 6, nodes: [slim] });
    assert.equal(next.nodes.get('a')?.state, 'busy');
    assert.equal(next.nodes.get('a')?.capacity, s.nodes.get('a')?.capacity);
    const changed = node('a', { capacity: { ...node('a').capacity, memory_total: 64e9 } });
    const after = applyEvent(next, { type: 'nodes', version: 7, nodes: [changed] });
    assert.equal(after.nodes.get('a')?.capacity.memory_total, 64e9, 'a new capacity wins');
  });

  it('ignores a nodes delta older than the state', () => {
    const s = loaded();
    const next = applyEvent(s, { type: 'nodes', version: 4, nodes: [node('x')], removed: [] });
    assert.equal(next, s);
  });

  it('applies a delta of the same version twice without harm', () => {
    const s = loaded();
    const delta = { type: 'nodes' as const, version: 6, nodes: [node('a', { state: 'paused' })] };
    const once = applyEvent(s, delta);
    const twice = applyEvent(once, delta);
    assert.deepEqual([...twice.nodes.entries()], [...once.nodes.entries()]);
  });

  it('a jobs delta upserts and removes jobs', () => {
    const next = applyEvent(loaded(), {
      type: 'jobs',
      jobs: [job('j1', { tasks_done: 10, state: 'done' }), job('j3')],
      removed: ['j2']
    });
    assert.deepEqual([...next.jobs.keys()].sort(), ['j1', 'j3']);
    assert.equal(next.jobs.get('j1')?.state, 'done');
  });

  it('a capacity delta replaces the totals', () => {
    const cap2 = { ...capacity, cores_free: 2 };
    const next = applyEvent(loaded(), { type: 'capacity', capacity: cap2 });
    assert.equal(next.capacity?.cores_free, 2);
  });

  it('an error event sets the message; the next data clears it', () => {
    const failed = applyEvent(loaded(), { type: 'error', message: 'portal unreachable' });
    assert.equal(failed.error, 'portal unreachable');
    assert.equal(failed.nodes.size, 3, 'the last known nodes stay');
    const back = applyEvent(failed, { type: 'capacity', capacity });
    assert.equal(back.error, null);
  });

  it('an error event without a message still says something', () => {
    const failed = applyEvent(loaded(), { type: 'error', message: '' });
    assert.ok(failed.error && failed.error.length > 0);
  });

  it('unknown message types leave the state alone', () => {
    const s = loaded();
    assert.equal(applyEvent(s, { type: 'future' } as any), s);
  });
});

describe('parseEvent', () => {
  it('accepts the known message types', () => {
    assert.deepEqual(parseEvent('{"type": "capacity", "capacity": {}}'), {
      type: 'capacity',
      capacity: {}
    });
  });
  it('rejects junk', () => {
    assert.equal(parseEvent('not json'), null);
    assert.equal(parseEvent('[1, 2]'), null);
    assert.equal(parseEvent('{"type": "bogus"}'), null);
    assert.equal(parseEvent('null'), null);
    assert.equal(parseEvent(42), null);
  });
});

describe('withError', () => {
  it('returns the same object when nothing changes', () => {
    const s = loaded();
    assert.equal(withError(s, null), s);
    assert.equal(withError(s, 'x').error, 'x');
  });
});

describe('appendHistory', () => {
  it('appends newer samples and drops those outside the window', () => {
    const history = [telemetry(0), telemetry(300), telemetry(600)];
    const out = appendHistory(history, telemetry(700), 600);
    assert.deepEqual(
      out.map(t => t.time),
      [300, 600, 700]
    );
    assert.equal(history.length, 3, 'input untouched');
  });
  it('ignores a sample that is not newer', () => {
    const history = [telemetry(10), telemetry(20)];
    assert.deepEqual(
      appendHistory(history, telemetry(20)).map(t => t.time),
      [10, 20]
    );
    assert.deepEqual(
      appendHistory(history, null).map(t => t.time),
      [10, 20]
    );
  });
  it('starts a history from nothing', () => {
    assert.deepEqual(
      appendHistory([], telemetry(5)).map(t => t.time),
      [5]
    );
    assert.deepEqual(appendHistory([], null), []);
  });
});

describe('summarize', () => {
  it('counts nodes online from capacity and running jobs', () => {
    assert.deepEqual(summarize(loaded()), { nodesOnline: 2, jobsRunning: 1 });
  });
  it('falls back to counting nodes without capacity', () => {
    const s = { ...loaded(), capacity: null };
    assert.equal(summarize(s).nodesOnline, 2);
  });
});
