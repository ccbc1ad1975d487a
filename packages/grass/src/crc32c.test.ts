import test from 'ava';
import { crc32c, crc32cTable } from './crc32c.ts';
import { Rng } from './rng.ts';

test('CRC-32C matches the standard check value', (t) => {
  const check = new TextEncoder().encode('123456789');
  t.is(crc32c(check), 0xe3069283);
  t.is(crc32cTable(check), 0xe3069283);
});

test('native and table implementations agree, including continuation', (t) => {
  const rng = new Rng(7);
  for (const n of [0, 1, 7, 8, 127, 128, 129, 4096, 65536 + 3]) {
    const b = rng.bytes(n);
    t.is(crc32c(b), crc32cTable(b), `length ${n}`);
    const cut = Math.floor(n / 3);
    t.is(crc32c(b.subarray(cut), crc32c(b.subarray(0, cut))), crc32cTable(b), `continued, length ${n}`);
  }
});
