import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  INodeFilter,
  NameOrder,
  coresFree,
  filterAndSortNodes,
  isIdle,
  jobProgress,
  jobTiming,
  nodeMatches,
  shortList,
  sortJobs
} from '../src/filter';
import { gpuNode, job, node, telemetry } from './fixtures';

const all: INodeFilter = { gpuOnly: false, idleOnly: false, text: '' };
const names = (nodes: { name: string }[]) => nodes.map(n => n.name);

describe('node filters', () => {
  const busy = node('busy1', { cpus_in_use: 4, telemetry: telemetry(1000, { running_tasks: 2 }) });
  const gpu = gpuNode('gpu1', { labels: { lab: 'physics', room: 'B12' } });
  const off = node('off1', { state: 'offline', reason: 'owner is using the machine' });
  const idle = node('idle1');
  const nodes = [busy, gpu, off, idle];

  it('GPU nodes only', () => {
    assert.deepEqual(names(nodes.filter(n => nodeMatches(n, { ...all, gpuOnly: true }))), ['gpu1']);
  });

  it('idle nodes: up and running nothing', () => {
    assert.equal(isIdle(idle), true);
    assert.equal(isIdle(busy), false);
    assert.equal(isIdle(off), false, 'offline is not idle');
    assert.equal(isIdle(node('p', { state: 'paused' })), false);
  });

  it('text search matches name, GPU model, labels, reason; all terms must match', () => {
    const find = (text: string) => names(nodes.filter(n => nodeMatches(n, { ...all, text })));
    assert.deepEqual(find('rtx'), ['gpu1']);
    assert.deepEqual(find('lab=physics'), ['gpu1']);
    assert.deepEqual(find('OWNER'), ['off1']);
    assert.deepEqual(find('gpu1 b12'), ['gpu1']);
    assert.deepEqual(find('gpu1 nosuch'), []);
    assert.deepEqual(find('   '), ['busy1', 'gpu1', 'off1', 'idle1']);
  });

  it('free cores: offered minus in use, none when offline', () => {
    assert.equal(coresFree(busy), 4);
    assert.equal(coresFree(off), 0);
    assert.equal(coresFree(node('x', { cpus_in_use: 12 })), 0);
  });
});

describe('filterAndSortNodes', () => {
  it('sorts the same with a NameOrder kept between calls, as names come and go', () => {
    const order = new NameOrder();
    const sort = { key: 'name' as const, descending: false };
    const all = { gpuOnly: false, idleOnly: false, text: '' };
    const names = (list: { name: string }[]) => list.map(n => n.name);
    const first = [node('n10'), node('n2'), node('n1')];
    assert.deepEqual(names(filterAndSortNodes(first, all, sort, order)), ['n1', 'n2', 'n10']);
    const more = [...first, node('n3'), node('N4')];
    assert.deepEqual(
      names(filterAndSortNodes(more, all, sort, order)),
      ['n1', 'n2', 'n3', 'N4', 'n10'],
      'a new name is ranked among the known ones'
    );
    const cpu = { key: 'cpu' as const, descending: true };
    assert.deepEqual(
      names(filterAndSortNodes(more.slice(3), all, cpu, order)),
      ['n3', 'N4'],
      'ties on the value fall back to the name'
    );
  });

  const nodes = [
    node('node10', { telemetry: telemetry(1, { cpu_percent: 5 }) }),
    node('node2', { telemetry: telemetry(1, { cpu_percent: 90 }) }),
    node('node1', { state: 'offline', telemetry: null }),
    gpuNode('node3', { state: 'busy', telemetry: telemetry(1, { cpu_percent: 5 }) })
  ];

  it('sorts names naturally (node2 before node10)', () => {
    const out = filterAndSortNodes(nodes, all, { key: 'name', descending: false });
    assert.deepEqual(names(out), ['node1', 'node2', 'node3', 'node10']);
    const rev = filterAndSortNodes(nodes, all, { key: 'name', descending: true });
    assert.deepEqual(names(rev), ['node10', 'node3', 'node2', 'node1']);
  });

  it('sorts by CPU use, ties broken by name, nodes without telemetry last', () => {
    const out = filterAndSortNodes(nodes, all, { key: 'cpu', descending: true });
    assert.deepEqual(names(out), ['node2', 'node3', 'node10', 'node1']);
  });

  it('sorts by state: usable first', () => {
    const out = filterAndSortNodes(nodes, all, { key: 'state', descending: false });
    assert.deepEqual(names(out), ['node2', 'node10', 'node3', 'node1']);
  });

  it('sorts by free cores', () => {
    const list = [node('a', { cpus_in_use: 6 }), node('b', { cpus_in_use: 1 })];
    const out = filterAndSortNodes(list, all, { key: 'free', descending: true });
    assert.deepEqual(names(out), ['b', 'a']);
  });

  it('filters and sorts 1,000 nodes, leaving the input alone', () => {
    const many = Array.from({ length: 1000 }, (_, i) =>
      i % 10 === 0 ? gpuNode(`n${i}`) : node(`n${i}`)
    );
    const before = names(many);
    const out = filterAndSortNodes(many, { ...all, gpuOnly: true }, { key: 'name', descending: false });
    assert.equal(out.length, 100);
    assert.equal(out[0].name, 'n0');
    assert.equal(out[1].name, 'n10');
    assert.deepEqual(names(many), before);
  });
});

describe('jobs', () => {
  it('orders active jobs first, newest first, then finished by finish time', () => {
    const jobs = [
      job('old-done', { state: 'done', submitted: 10, finished: 50 }),
      job('run-old', { state: 'running', submitted: 20 }),
      job('queued-new', { state: 'queued', submitted: 40, started: null }),
      job('failed-late', { state: 'failed', submitted: 5, finished: 90 })
    ];
    assert.deepEqual(
      sortJobs(jobs).map(j => j.id),
      ['queued-new', 'run-old', 'failed-late', 'old-done']
    );
  });

  it('timing: queued, running, and finished with outcome and duration', () => {
    assert.deepEqual(jobTiming(job('q', { state: 'queued', started: null, submitted: 100 }), 130), {
      label: 'queued for',
      seconds: 30
    });
    assert.deepEqual(jobTiming(job('r', { started: 110 }), 170), {
      label: 'running for',
      seconds: 60
    });
    assert.deepEqual(jobTiming(job('d', { state: 'done', started: 110, finished: 200 }), 999), {
      label: 'done in',
      seconds: 90
    });
    assert.deepEqual(jobTiming(job('f', { state: 'failed', started: 110, finished: 115 }), 999), {
      label: 'failed after',
      seconds: 5
    });
    assert.equal(jobTiming(job('c', { state: 'cancelled', finished: 120 }), 999).label, 'cancelled after');
    assert.equal(jobTiming(job('i', { state: 'interrupted', finished: null }), 999).seconds, null);
  });

  it('progress: fractions of the total, clamped', () => {
    assert.deepEqual(jobProgress(job('a', { tasks_total: 10, tasks_done: 4, tasks_failed: 1 })), {
      done: 0.4,
      failed: 0.1
    });
    assert.deepEqual(jobProgress(job('b', { tasks_total: 0, tasks_done: 0, state: 'done' })), {
      done: 1,
      failed: 0
    });
    assert.deepEqual(jobProgress(job('c', { tasks_total: 2, tasks_done: 5, tasks_failed: 3 })), {
      done: 1,
      failed: 0
    });
  });

  it('shortList names a few nodes and counts the rest', () => {
    assert.equal(shortList(['a', 'b']), 'a, b');
    assert.equal(shortList(['a', 'b', 'c', 'd', 'e']), 'a, b, c +2 more');
  });
});
