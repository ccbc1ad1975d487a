import test from 'ava';
import { AddressMap, MapPage } from './address-map.ts';
import { MAP_PAGE_ENTRIES, NO_SLOT } from './format.ts';

test('set, get, delete and counts', (t) => {
  const m = new AddressMap();
  const prev = { slot: 0, offset: 0, length: 0 };
  t.false(m.set(5, 1, 100, 4096, prev));
  t.true(m.set(5, 2, 200, 10, prev));
  t.deepEqual(prev, { slot: 1, offset: 100, length: 4096 });
  t.deepEqual(m.get(5), { slot: 2, offset: 200, length: 10 });
  t.true(m.isAt(5, 2, 200));
  t.false(m.isAt(5, 1, 100));
  m.set(2 ** 40, 3, 0, 1);
  t.is(m.size, 2);
  t.is(m.pageCount, 2);
  t.is(m.payloadBytes, 11, 'the overwrite replaced 4096 bytes with 10');
  t.true(m.delete(5));
  t.false(m.delete(5));
  t.is(m.get(5), undefined);
  t.is(m.slotOf(6), NO_SLOT);
  t.is(m.size, 1);
  t.is(m.payloadBytes, 1);
  const p = new MapPage();
  p.slot[3] = 1;
  p.length[3] = 700;
  p.mapped = 1;
  m.installPage(7, p);
  t.is(m.payloadBytes, 701, 'an installed page counts its records');
});

test('a page round-trips through its checkpoint encoding', (t) => {
  const p = new MapPage();
  p.slot[0] = 9;
  p.offset[0] = 64;
  p.length[0] = 4096;
  p.slot[MAP_PAGE_ENTRIES - 1] = 1;
  p.offset[MAP_PAGE_ENTRIES - 1] = 123456;
  p.length[MAP_PAGE_ENTRIES - 1] = 0;
  p.mapped = 2;
  const q = MapPage.decode(p.encode());
  t.is(q.mapped, 2);
  t.deepEqual([...q.slot], [...p.slot]);
  t.deepEqual([...q.offset], [...p.offset]);
  t.deepEqual([...q.length], [...p.length]);
  t.false(q.dirty);
});
