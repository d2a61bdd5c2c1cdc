import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it, mock } from 'node:test';

import { Poller } from '../src/poller';

describe('Poller', () => {
  beforeEach(() => mock.timers.enable({ apis: ['setInterval'] }));
  afterEach(() => mock.timers.reset());

  const counting = () => {
    const poller = { ticks: 0 };
    return { counter: poller, tick: async () => void (poller.ticks += 1) };
  };

  it('ticks at once, then every interval, until stopped', () => {
    const { counter, tick } = counting();
    const poller = new Poller(tick, 1000);
    assert.equal(poller.running, false);
    poller.start();
    assert.equal(counter.ticks, 1);
    assert.equal(poller.running, true);
    mock.timers.tick(2500);
    assert.equal(counter.ticks, 3);
    poller.stop();
    assert.equal(poller.running, false);
    mock.timers.tick(5000);
    assert.equal(counter.ticks, 3);
  });

  it('keeps one timer when started twice', () => {
    const { counter, tick } = counting();
    const poller = new Poller(tick, 1000);
    poller.start();
    poller.start();
    mock.timers.tick(1000);
    assert.equal(counter.ticks, 2);
    poller.stop();
  });

  it('start(false) leaves the first tick to the interval (the caller has just fetched)', () => {
    const { counter, tick } = counting();
    const poller = new Poller(tick, 1000);
    poller.start(false);
    assert.equal(counter.ticks, 0);
    mock.timers.tick(1000);
    assert.equal(counter.ticks, 1);
    poller.stop();
  });
});
