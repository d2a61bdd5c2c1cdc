import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { ITaskRecord, MAX_SLOTS, layoutTaskStream } from '../src/streamlayout';

const task = (over: Partial<ITaskRecord>): ITaskRecord => ({
  key: 'k',
  stage: 'run',
  item: null,
  node: 'alpha',
  state: 'done',
  started: 0,
  finished: 1,
  ...over
});

describe('layoutTaskStream', () => {
  it('gives tasks that ran side by side on a node a row each, and reuses free rows', () => {
    const layout = layoutTaskStream(
      [
        task({ key: 'a', started: 0, finished: 2 }),
        task({ key: 'b', started: 0, finished: 1 }),
        task({ key: 'c', started: 1, finished: 2 }),
        task({ key: 'd', node: 'beta', started: 0.5, finished: 1 })
      ],
      ['run'],
      2
    );
    assert.deepEqual(layout.lanes, [
      { node: 'alpha', slot: 0 },
      { node: 'alpha', slot: 1 },
      { node: 'beta', slot: 0 }
    ]);
    const lane = (key: string) => layout.bars.find(b => b.task.key === key)!.lane;
    assert.deepEqual(['a', 'b', 'c', 'd'].map(lane), [0, 1, 1, 2]);
    const c = layout.bars.find(b => b.task.key === 'c')!;
    assert.deepEqual([c.x0, c.x1], [0.5, 1]);
  });

  it('draws running tasks up to now and queued ones not at all', () => {
    const layout = layoutTaskStream(
      [
        task({ key: 'r', state: 'running', started: 10, finished: null }),
        task({ key: 'q', state: 'queued', node: null, started: null, finished: null })
      ],
      [],
      14
    );
    assert.equal(layout.bars.length, 1);
    assert.deepEqual([layout.bars[0].x0, layout.bars[0].x1], [0, 1]);
    assert.equal(layout.end - layout.start, 4);
  });

  it('colours by stage in the order given, and caps the rows of one node', () => {
    const many = Array.from({ length: MAX_SLOTS + 3 }, (_, i) =>
      task({ key: `t${i}`, stage: i % 2 ? 'b' : 'a', started: 0, finished: 5 })
    );
    const layout = layoutTaskStream(many, ['b', 'a'], 5);
    assert.equal(layout.lanes.length, MAX_SLOTS);
    assert.deepEqual(layout.stages, ['b', 'a']);
    assert.equal(layout.bars.find(b => b.task.stage === 'b')!.colour, 0);
  });
});
