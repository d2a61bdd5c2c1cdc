import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { cpuSeries, gpuIndices, gpuSeries, sparklinePath } from '../src/sparkline';
import { telemetry } from './fixtures';

const box = { width: 100, height: 10, t0: 0, t1: 100, min: 0, max: 100 };

describe('sparklinePath', () => {
  it('maps time to x and value to y (0 at the bottom)', () => {
    const d = sparklinePath(
      [
        { t: 0, v: 0 },
        { t: 5, v: 50 },
        { t: 10, v: 100 }
      ],
      box
    );
    assert.equal(d, 'M0 10 L5 5 L10 0');
  });

  it('clamps values to the range', () => {
    assert.equal(
      sparklinePath(
        [
          { t: 0, v: -20 },
          { t: 10, v: 250 }
        ],
        box
      ),
      'M0 10 L10 0'
    );
  });

  it('breaks the line at gaps and at missing values', () => {
    const d = sparklinePath(
      [
        { t: 0, v: 10 },
        { t: 2, v: 10 },
        { t: 50, v: 20 },
        { t: 52, v: 20 },
        { t: 54, v: null },
        { t: 56, v: 30 },
        { t: 58, v: 30 }
      ],
      { ...box, maxGap: 10 }
    );
    assert.equal(d, 'M0 9 L2 9 M50 8 L52 8 M56 7 L58 7');
  });

  it('draws a lone sample as a one-pixel dash', () => {
    assert.equal(sparklinePath([{ t: 50, v: 50 }], box), 'M50 5 L51 5');
  });

  it('skips samples outside the time window', () => {
    assert.equal(
      sparklinePath(
        [
          { t: -10, v: 50 },
          { t: 10, v: 50 },
          { t: 12, v: 50 }
        ],
        box
      ),
      'M10 5 L12 5'
    );
  });

  it('is empty for no data or a degenerate box', () => {
    assert.equal(sparklinePath([], box), '');
    assert.equal(sparklinePath([{ t: 1, v: 1 }], { ...box, t1: 0 }), '');
    assert.equal(sparklinePath([{ t: 1, v: 1 }], { ...box, max: 0 }), '');
  });

  it('rounds to two decimals', () => {
    const d = sparklinePath(
      [
        { t: 1, v: 33.3333 },
        { t: 2, v: 66.6666 }
      ],
      { ...box, t1: 3, width: 1 }
    );
    assert.equal(d, 'M0.33 6.67 L0.67 3.33');
  });
});

describe('series from telemetry', () => {
  const history = [
    telemetry(10, { cpu_percent: 20, gpus: [{ index: 0, utilization: 70, memory_used: 1, temperature: 50 }] }),
    telemetry(12, {
      cpu_percent: 30,
      gpus: [
        { index: 1, utilization: 10, memory_used: 1, temperature: 50 },
        { index: 0, utilization: 80, memory_used: 1, temperature: 50 }
      ]
    })
  ];

  it('picks CPU values with their times', () => {
    assert.deepEqual(cpuSeries(history), [
      { t: 10, v: 20 },
      { t: 12, v: 30 }
    ]);
  });

  it('picks one GPU by index, null where it is absent', () => {
    assert.deepEqual(gpuSeries(history, 1), [
      { t: 10, v: null },
      { t: 12, v: 10 }
    ]);
    assert.deepEqual(gpuIndices(history), [0, 1]);
  });
});
