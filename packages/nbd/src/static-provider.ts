/**
 * A fixed set of named exports, each a device shared by every connection that opens it. For
 * tests, research and small tools; the devices belong to the caller (closing a connection does
 * not close them).
 */
import type { BlockDevice, ExportInfo, ExportProvider, OpenExport } from './device.ts';

export interface StaticExport {
  device: BlockDevice;
  description?: string;
}

export class StaticExportProvider implements ExportProvider {
  readonly defaultExport?: string;
  /** Connections currently holding each export open. */
  readonly openCount = new Map<string, number>();

  constructor(private readonly exports: ReadonlyMap<string, StaticExport> | Record<string, StaticExport>, defaultExport?: string) {
    if (defaultExport !== undefined) this.defaultExport = defaultExport;
  }

  private entries(): [string, StaticExport][] {
    return this.exports instanceof Map ? [...this.exports] : Object.entries(this.exports);
  }

  list(): ExportInfo[] {
    return this.entries().map(([name, e]) => ({ name, description: e.description ?? '' }));
  }

  async open(name: string): Promise<OpenExport | undefined> {
    const e = this.entries().find(([n]) => n === name)?.[1];
    if (e === undefined) return undefined;
    this.openCount.set(name, (this.openCount.get(name) ?? 0) + 1);
    return {
      device: e.device,
      close: async () => {
        this.openCount.set(name, (this.openCount.get(name) ?? 1) - 1);
      },
    };
  }
}
