import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import { siteOf } from '../src/site';

test('a node lent by a peer shows its site', () => {
  assert.equal(siteOf({ name: 'pc1@school', labels: { site: 'school', room: 'b12' } }), 'school');
});

test('a node of this portal has no site, whatever label its volunteer set', () => {
  assert.equal(siteOf({ name: 'pc1', labels: {} }), null);
  assert.equal(siteOf({ name: 'pc1', labels: { site: 'school' } }), null);
  assert.equal(siteOf({ name: 'pc1@school', labels: { site: 'uni' } }), null);
  assert.equal(siteOf({ name: 'pc1@school', labels: { site: '' } }), null);
});
