import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { backoffDelay, visibleRange } from '../src/timing';

describe('backoffDelay', () => {
  const noJitter = () => 0;
  it('doubles from the base up to the ceiling', () => {
    const delays = [0, 1, 2, 3, 4, 5, 6].map(a => backoffDelay(a, {}, noJitter));
    assert.deepEqual(delays, [1000, 2000, 4000, 8000, 16000, 30000, 30000]);
  });
  it('takes off at most the jitter fraction', () => {
    assert.equal(backoffDelay(2, { jitter: 0.5 }, () => 1), 2000);
    assert.equal(backoffDelay(2, { jitter: 0.5 }, () => 0.5), 3000);
  });
  it('honours the options and never goes negative', () => {
    assert.equal(backoffDelay(3, { base: 100, factor: 3, max: 1e6, jitter: 0 }), 2700);
    assert.equal(backoffDelay(-4, { base: 100, jitter: 0 }), 100);
    assert.ok(backoffDelay(100, { jitter: 5 }, () => 1) >= 0);
  });
});

describe('visibleRange', () => {
  it('renders only the rows in view plus overscan', () => {
    assert.deepEqual(visibleRange(0, 640, 64, 1000, 4), { start: 0, end: 14 });
    assert.deepEqual(visibleRange(64 * 500, 640, 64, 1000, 4), { start: 496, end: 514 });
  });
  it('stays within the list at the end', () => {
    assert.deepEqual(visibleRange(64 * 995, 640, 64, 1000, 4), { start: 991, end: 1000 });
    assert.deepEqual(visibleRange(1e9, 640, 64, 1000, 4), { start: 1000, end: 1000 });
  });
  it('covers a partly visible row', () => {
    assert.deepEqual(visibleRange(32, 64, 64, 10, 0), { start: 0, end: 2 });
  });
  it('is empty for an empty list', () => {
    assert.deepEqual(visibleRange(0, 640, 64, 0), { start: 0, end: 0 });
    assert.deepEqual(visibleRange(0, 640, 0, 10), { start: 0, end: 0 });
  });
  it('keeps a thousand-node list to a few dozen rows', () => {
    for (const top of [0, 12345, 40000, 63999]) {
      const { start, end } = visibleRange(top, 900, 64, 1000);
      assert.ok(end - start <= Math.ceil(900 / 64) + 1 + 8, `top=${top}: ${end - start} rows`);
    }
  });
});
