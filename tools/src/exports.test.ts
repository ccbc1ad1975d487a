/** PoolExports: which of a pool's images are NBD exports. */
import test from 'ava';
import { GrassLog, MemorySegmentStore } from '@pasture/grass';
import { Pool } from '@pasture/human';
import { PoolExports } from './exports.ts';

test('exports: volumes read-write and snapshots read-only; a volume still being imported is neither listed nor opened', async (t) => {
  const pool = await Pool.create(await GrassLog.create(new MemorySegmentStore(1 << 20, 64), {}));
  await pool.createVolume('whole', 1 << 20);
  await pool.createSnapshot('whole', 's');
  await pool.createVolume('half', 1 << 20, { incomplete: true });
  const exports = new PoolExports(pool);
  t.deepEqual(exports.list().map((e) => e.name), ['whole', 'whole@s']);
  t.is(await exports.open('half'), undefined, 'a partial image is not served');
  const open = await exports.open('whole@s');
  t.true(open?.device.readOnly);
  await open?.close();
  const rw = await exports.open('whole');
  t.false(rw?.device.readOnly);
  await rw?.close();
  t.is(exports.defaultExport, 'whole', 'the one whole volume is the default');
  await pool.close();
});
