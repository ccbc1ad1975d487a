/**
 * The catalog: names, sizes, parentage and creation times of a pool's images, stored in the
 * pool's own Cow space (slot 0, see layout.ts) and validated with zod every time it is read.
 * See FORMAT.md.
 */
import { z } from 'zod';
import { CatalogError, InvalidArgumentError } from './errors.ts';
import { BLOCK_BYTES, CATALOG_BLOCKS_MAX, MAX_IMAGE_ID, MAX_VOLUME_BYTES } from './layout.ts';

export const CATALOG_MAGIC = 'PCAT';
export const CATALOG_VERSION = 1;
/** Header in block 0: magic (4 bytes), version u32, JSON length u32, reserved u32. */
const HEADER_BYTES = 16;
export const CATALOG_BYTES_MAX = CATALOG_BLOCKS_MAX * BLOCK_BYTES - HEADER_BYTES;

/** Names: what a shell, an NBD export name and `VOLUME@SNAPSHOT` can all carry unquoted. */
export const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

const id = z.number().int().min(1).max(MAX_IMAGE_ID);
const size = z.number().int().min(0).max(MAX_VOLUME_BYTES).refine((n) => n % BLOCK_BYTES === 0, 'a multiple of 4096');
const when = z.string().datetime();

export const VolumeEntry = z.object({
  kind: z.literal('volume'),
  id,
  name: z.string().regex(NAME_RE),
  size,
  created: when,
  /** The snapshot this volume was cloned from, until flattened. */
  parent: id.nullable(),
  /** Being imported: until the import completes it is not a whole image; removed when the pool opens. */
  incomplete: z.literal(true).optional(),
});

export const SnapshotEntry = z.object({
  kind: z.literal('snapshot'),
  id,
  name: z.string().regex(NAME_RE),
  /** The volume it is a snapshot of. */
  volume: id,
  size,
  created: when,
  protected: z.boolean(),
});

/** Space an unfinished atomic write used; reclaimed when the pool opens. */
export const ScratchEntry = z.object({
  kind: z.literal('scratch'),
  id,
  volume: id,
  created: when,
});

export const Entry = z.discriminatedUnion('kind', [VolumeEntry, SnapshotEntry, ScratchEntry]);

export const Catalog = z
  .object({
    format: z.literal('pasture-catalog'),
    version: z.literal(CATALOG_VERSION),
    nextId: z.number().int().min(1).max(MAX_IMAGE_ID + 1),
    entries: z.array(Entry),
  })
  .superRefine((c, ctx) => {
    const ids = new Set<number>();
    const volumeNames = new Set<string>();
    const snapNames = new Set<string>();
    for (const e of c.entries) {
      if (ids.has(e.id)) ctx.addIssue({ code: 'custom', message: `id ${e.id} appears twice` });
      ids.add(e.id);
      if (e.id >= c.nextId) ctx.addIssue({ code: 'custom', message: `id ${e.id} is not below nextId ${c.nextId}` });
      if (e.kind === 'volume') {
        if (volumeNames.has(e.name)) ctx.addIssue({ code: 'custom', message: `volume name ${e.name} appears twice` });
        volumeNames.add(e.name);
      }
      if (e.kind === 'snapshot') {
        const key = `${e.volume}@${e.name}`;
        if (snapNames.has(key)) ctx.addIssue({ code: 'custom', message: `snapshot ${key} appears twice` });
        snapNames.add(key);
      }
    }
    for (const e of c.entries) {
      if ((e.kind === 'snapshot' || e.kind === 'scratch') && !c.entries.some((v) => v.kind === 'volume' && v.id === e.volume)) {
        ctx.addIssue({ code: 'custom', message: `${e.kind} ${e.id} belongs to missing volume ${e.volume}` });
      }
      if (e.kind === 'volume' && e.parent !== null && !c.entries.some((s) => s.kind === 'snapshot' && s.id === e.parent)) {
        ctx.addIssue({ code: 'custom', message: `volume ${e.name} has missing parent snapshot ${e.parent}` });
      }
    }
  });

export type Catalog = z.infer<typeof Catalog>;
export type Entry = z.infer<typeof Entry>;
export type VolumeEntry = z.infer<typeof VolumeEntry>;
export type SnapshotEntry = z.infer<typeof SnapshotEntry>;

export function emptyCatalog(): Catalog {
  return { format: 'pasture-catalog', version: CATALOG_VERSION, nextId: 1, entries: [] };
}

/** The catalog as whole blocks (block 0 starts with the header). */
export function encodeCatalog(c: Catalog): Uint8Array[] {
  const json = new TextEncoder().encode(JSON.stringify(c));
  if (json.length > CATALOG_BYTES_MAX) throw new InvalidArgumentError(`the catalog would be ${json.length} bytes; the limit is ${CATALOG_BYTES_MAX} (too many volumes and snapshots)`);
  const total = HEADER_BYTES + json.length;
  const blocks = Math.ceil(total / BLOCK_BYTES);
  const buf = new Uint8Array(blocks * BLOCK_BYTES);
  buf.set(new TextEncoder().encode(CATALOG_MAGIC), 0);
  const v = new DataView(buf.buffer);
  v.setUint32(4, CATALOG_VERSION, true);
  v.setUint32(8, json.length, true);
  buf.set(json, HEADER_BYTES);
  return Array.from({ length: blocks }, (_, i) => buf.subarray(i * BLOCK_BYTES, (i + 1) * BLOCK_BYTES));
}

/** Check a catalog before it is written (the rules decodeCatalog enforces when it is read). */
export function checkCatalog(c: Catalog): void {
  const r = Catalog.safeParse(c);
  if (!r.success) throw new CatalogError(`catalog change refused, it would be invalid: ${issues(r.error)}`);
}

function issues(e: z.ZodError): string {
  return e.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
}

/** Read the catalog with `readBlock` (undefined: unmapped, i.e. zeros) and validate it. */
export async function decodeCatalog(readBlock: (i: number) => Promise<Uint8Array | undefined>): Promise<Catalog> {
  const first = await readBlock(0);
  if (first === undefined) throw new CatalogError('no catalog: this store holds no Human pool (create one with pasture init)');
  const magic = new TextDecoder().decode(first.subarray(0, 4));
  if (magic !== CATALOG_MAGIC) throw new CatalogError(`catalog block has magic '${magic}', expected '${CATALOG_MAGIC}'`);
  const v = new DataView(first.buffer, first.byteOffset, first.byteLength);
  const version = v.getUint32(4, true);
  if (version !== CATALOG_VERSION) throw new CatalogError(`catalog version ${version}; this build reads ${CATALOG_VERSION}`);
  const length = v.getUint32(8, true);
  if (length > CATALOG_BYTES_MAX) throw new CatalogError(`catalog claims ${length} bytes; the limit is ${CATALOG_BYTES_MAX}`);
  const total = HEADER_BYTES + length;
  const buf = new Uint8Array(Math.ceil(total / BLOCK_BYTES) * BLOCK_BYTES);
  buf.set(first, 0);
  for (let i = 1; i * BLOCK_BYTES < total; i++) buf.set((await readBlock(i)) ?? new Uint8Array(BLOCK_BYTES), i * BLOCK_BYTES);
  let parsed: unknown;
  try {
    parsed = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(HEADER_BYTES, total)));
  } catch (e) {
    throw new CatalogError(`catalog is not valid JSON: ${(e as Error).message}`);
  }
  const r = Catalog.safeParse(parsed);
  if (!r.success) throw new CatalogError(`catalog is invalid: ${issues(r.error)}`);
  return r.data;
}
