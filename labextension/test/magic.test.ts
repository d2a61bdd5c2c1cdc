import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  RunOptionsError,
  buildGridMagic,
  hasGridMagic,
  normalizeSize,
  parseRunOptions,
  withGridMagic
} from '../src/magic';

const raw = { cpus: '2', gpus: '0', memory: '', background: false };

describe('buildGridMagic', () => {
  it('always names the CPUs and leaves defaults out', () => {
    assert.equal(buildGridMagic({ cpus: 1, gpus: 0, memory: '', background: false }), '%%grid --cpus 1');
  });
  it('adds GPUs, memory and --bg when asked', () => {
    assert.equal(
      buildGridMagic({ cpus: 4, gpus: 2, memory: '8GB', background: true }),
      '%%grid --cpus 4 --gpus 2 --memory 8GB --bg'
    );
  });
});

describe('parseRunOptions', () => {
  it('parses the dialog fields', () => {
    assert.deepEqual(parseRunOptions({ cpus: ' 4 ', gpus: '1', memory: ' 1.5 GiB ', background: true }), {
      cpus: 4,
      gpus: 1,
      memory: '1.5GiB',
      background: true
    });
  });
  it('takes an empty GPU field as none', () => {
    assert.equal(parseRunOptions({ ...raw, gpus: '' }).gpus, 0);
  });
  it('rejects bad CPUs with a message that says how to fix it', () => {
    for (const cpus of ['0', '', '1.5', '-1', 'two']) {
      assert.throws(
        () => parseRunOptions({ ...raw, cpus }),
        (e: Error) => e instanceof RunOptionsError && /CPUs/.test(e.message) && /1 or more|at least 1/.test(e.message),
        `cpus=${JSON.stringify(cpus)}`
      );
    }
  });
  it('rejects bad GPUs', () => {
    assert.throws(() => parseRunOptions({ ...raw, gpus: '-1' }), RunOptionsError);
    assert.throws(() => parseRunOptions({ ...raw, gpus: 'x' }), /GPUs/);
  });
});

describe('normalizeSize (the rules of grid_portal.units.parse_size)', () => {
  it('accepts sizes in any case and removes the spaces argv would split on', () => {
    assert.equal(normalizeSize('4GB'), '4GB');
    assert.equal(normalizeSize(' 512 mib '), '512mib');
    assert.equal(normalizeSize('.5TB'), '.5TB');
    assert.equal(normalizeSize('1024'), '1024');
    assert.equal(normalizeSize(''), '');
  });
  it('names an unknown unit and the ones that work', () => {
    assert.throws(() => normalizeSize('4 parsecs'), /unknown unit "parsecs".*GB.*GiB/);
  });
  it('asks for a number and a unit for anything else', () => {
    assert.throws(() => normalizeSize('lots'), /like 512MB, 4GB/);
    assert.throws(() => normalizeSize('4 G B'), RunOptionsError);
    assert.throws(() => normalizeSize('-4GB'), RunOptionsError);
  });
});

describe('withGridMagic', () => {
  const opts = { cpus: 2, gpus: 0, memory: '', background: false };
  it('prepends the line', () => {
    assert.equal(withGridMagic('x = 1\nprint(x)', opts), '%%grid --cpus 2\nx = 1\nprint(x)');
    assert.equal(withGridMagic('', opts), '%%grid --cpus 2\n');
  });
  it('leaves a %%grid cell as it is, even after blank lines', () => {
    for (const src of ['%%grid\nx', '%%grid --gpus 1\nx', '\n\n%%grid\nx', '%%grid']) {
      assert.equal(hasGridMagic(src), true, JSON.stringify(src));
      assert.equal(withGridMagic(src, opts), src);
    }
  });
  it('does not mistake other magics or text for %%grid', () => {
    for (const src of ['%%gridx\n', '%%time\n%%grid\n', '# %%grid\n', 'x\n%%grid']) {
      assert.equal(hasGridMagic(src), false, JSON.stringify(src));
    }
  });
});
