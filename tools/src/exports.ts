/**
 * A pool's images as NBD exports: each volume read-write under its name, each snapshot
 * read-only as VOLUME@SNAPSHOT. The adapter maps nbd's BlockDevice calls onto Human's Image;
 * the nbd package itself knows nothing of Pasture's layers.
 */
import type { BlockDevice, ExportInfo, ExportProvider, OpenExport } from '@pasture/nbd';
import type { Image, Pool } from '@pasture/human';
import { MAX_IO_BYTES } from '@pasture/human';
import { formatBytes } from './io.ts';

export class ImageDevice implements BlockDevice {
  readonly readOnly: boolean;
  /** One pool, one Cow space: a flush on any connection covers every connection's writes. */
  readonly multiConn = true;
  /** Zeroing unmaps, or maps shared all-zero records (NO_HOLE): no data is written. */
  readonly fastZero = true;
  readonly blockSize = { minimum: 1, preferred: 4096, maximum: MAX_IO_BYTES };

  constructor(
    private readonly image: Image,
    private readonly pool: Pool,
  ) {
    this.readOnly = image.readOnly;
  }

  get size(): number {
    return this.image.size;
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    return this.image.read(offset, length);
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    await this.image.write(offset, data);
    if (fua) await this.pool.flush();
  }

  flush(): Promise<void> {
    return this.pool.flush();
  }

  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    await this.image.discard(offset, length);
    if (fua) await this.pool.flush();
  }

  /** NO_HOLE: the blocks stay allocated (stored zero blocks); without it, they become holes. */
  async zero(offset: number, length: number, flags: { fua: boolean; noHole: boolean }): Promise<void> {
    await this.image.writeZeroes(offset, length, { allocate: flags.noHole });
    if (flags.fua) await this.pool.flush();
  }

  async blockStatus(offset: number, length: number): Promise<{ length: number; hole: boolean; zero: boolean }[]> {
    const st = await this.image.blockStatus(offset, length);
    return st.map((s) => ({ length: s.length, hole: !s.allocated, zero: !s.allocated }));
  }

  async cache(): Promise<void> {
    // Reads come from Grass's segment files through the page cache; nothing to prefetch.
  }
}

export class PoolExports implements ExportProvider {
  constructor(
    private readonly pool: Pool,
    /** Serve only this export (and make it the default), if set. */
    private readonly only?: string,
  ) {}

  get defaultExport(): string | undefined {
    if (this.only !== undefined) return this.only;
    const vs = this.pool.listVolumes().filter((v) => !v.incomplete);
    return vs.length === 1 ? vs[0]!.name : undefined;
  }

  list(): ExportInfo[] {
    const out: ExportInfo[] = [];
    for (const v of this.pool.listVolumes()) {
      if (v.incomplete) continue; // an import under way, or one a crash stopped: not a whole image
      out.push({ name: v.name, description: `volume, ${formatBytes(v.size)}${v.parent ? `, clone of ${v.parent}` : ''}` });
      for (const s of this.pool.listSnapshots(v.name)) out.push({ name: s.spec, description: `snapshot of ${v.name}, ${formatBytes(s.size)}, read-only` });
    }
    return this.only === undefined ? out : out.filter((e) => e.name === this.only);
  }

  async open(name: string): Promise<OpenExport | undefined> {
    if (this.only !== undefined && name !== this.only) return undefined;
    if (this.pool.listVolumes().some((v) => v.incomplete && v.name === name)) return undefined;
    let image: Image;
    try {
      image = await this.pool.openImage(name);
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOENT' || (e as { code?: string }).code === 'EINVAL') return undefined;
      throw e;
    }
    return { device: new ImageDevice(image, this.pool), close: () => image.close() };
  }
}
