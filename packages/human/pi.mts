import { FileSegmentStore, GrassLog, Rng } from '@pasture/grass';
import { Pool } from './src/pool.ts';
import { importImage } from './src/transfer.ts';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
const dir = mkdtempSync('/tmp/cw/pi-');
const rnd = new Rng(3); const parts: Uint8Array[] = [];
const words = new TextEncoder().encode('the quick brown fox jumps over the lazy dog; storage engineers measure write amplification. ');
for (let i = 0; i < 256; i++) { let b: Uint8Array; if (i % 4 === 0) b = rnd.bytes(1 << 20); else if (i % 4 === 1) { b = new Uint8Array(1 << 20); for (let k = 0; k < b.length; k++) b[k] = words[(k * 7 + (k >> 9)) % words.length]!; } else if (i % 4 === 2) { b = new Uint8Array(1 << 20); for (let o = 0; o < b.length; o += 4096) { new DataView(b.buffer).setFloat64(o, i * 256 + o, true); b.fill(i & 255, o + 8, o + 64); } } else b = new Uint8Array(1 << 20); parts.push(b); }
writeFileSync(dir + '/img', Buffer.concat(parts));
const pool = await Pool.create(await GrassLog.create(await FileSegmentStore.create(dir + '/p', { segmentBytes: 8 << 20, segmentCount: 128 }), {}));
const r = await importImage(pool, dir + '/img', 'd');
console.log(256 * 1.048576 / r.seconds, 'MB/s');
await pool.close(); rmSync(dir, { recursive: true });
