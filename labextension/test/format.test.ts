import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import {
  clampPercent,
  formatAgo,
  formatDuration,
  formatSize,
  plural,
  ratioPercent,
  shortGpuName
} from '../src/format';

describe('formatSize (same rules as grid_portal.units.format_size)', () => {
  it('uses powers of 1000 with one decimal', () => {
    assert.equal(formatSize(16e9), '16.0 GB');
    assert.equal(formatSize(1500), '1.5 KB');
    assert.equal(formatSize(999), '999 B');
    assert.equal(formatSize(0), '0 B');
    assert.equal(formatSize(2.5e12), '2.5 TB');
  });
  it('stops at TB', () => {
    assert.equal(formatSize(3e15), '3000.0 TB');
  });
  it('prints a dash for unknown sizes', () => {
    assert.equal(formatSize(null), '-');
    assert.equal(formatSize(undefined), '-');
    assert.equal(formatSize(NaN), '-');
  });
});

describe('formatDuration (same rules as grid_portal.units.format_duration)', () => {
  it('formats each range', () => {
    assert.equal(formatDuration(0.25), '250 ms');
    assert.equal(formatDuration(12.5), '12.5 s');
    assert.equal(formatDuration(245), '4m 05s');
    assert.equal(formatDuration(3725), '1h 02m');
    assert.equal(formatDuration(50 * 3600), '2d 2h');
  });
  it('clamps negatives and handles null', () => {
    assert.equal(formatDuration(-5), '0 ms');
    assert.equal(formatDuration(null), '-');
  });
});

describe('formatAgo', () => {
  it('says how long ago, coarsely', () => {
    assert.equal(formatAgo(1000, 1002), 'just now');
    assert.equal(formatAgo(1000, 1045), '45 s ago');
    assert.equal(formatAgo(1000, 1000 + 60), '1 min ago');
    assert.equal(formatAgo(1000, 1000 + 12 * 60 + 30), '12 min ago');
    assert.equal(formatAgo(1000, 1000 + 3 * 3600), '3 h ago');
    assert.equal(formatAgo(1000, 1000 + 3 * 86400), '3 days ago');
  });
  it('does not go negative when clocks disagree', () => {
    assert.equal(formatAgo(2000, 1000), 'just now');
  });
  it('says never without a time', () => {
    assert.equal(formatAgo(null, 1000), 'never');
  });
});

describe('percentages and words', () => {
  it('clamps to 0..100', () => {
    assert.equal(clampPercent(150), 100);
    assert.equal(clampPercent(-3), 0);
    assert.equal(clampPercent(NaN), 0);
    assert.equal(clampPercent(42), 42);
  });
  it('ratio is 0 for an unknown total', () => {
    assert.equal(ratioPercent(5, 0), 0);
    assert.equal(ratioPercent(4e9, 16e9), 25);
  });
  it('pluralises', () => {
    assert.equal(plural(1, 'node'), '1 node');
    assert.equal(plural(0, 'node'), '0 nodes');
    assert.equal(plural(3, 'GPU'), '3 GPUs');
  });
});

describe('shortGpuName', () => {
  it('drops vendor and brand words, keeps the model', () => {
    assert.equal(shortGpuName('NVIDIA GeForce RTX 4090'), 'RTX 4090');
    assert.equal(shortGpuName('NVIDIA A100-SXM4-80GB'), 'A100-SXM4-80GB');
    assert.equal(shortGpuName('AMD Radeon RX 7900 XTX'), 'RX 7900 XTX');
    assert.equal(shortGpuName('Tesla T4'), 'Tesla T4');
  });
  it('never returns an empty name', () => {
    assert.equal(shortGpuName('NVIDIA '), 'NVIDIA ');
  });
});
