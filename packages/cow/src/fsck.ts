/**
 * Cow fsck: walk the whole tree (each shared node once) and the graveyard, recount every
 * reference, and compare with the refcount pages, the Grass records and the superblock's
 * counters. It reports, and never repairs:
 * - mismatch: a refcount that differs from the references found. More references than the
 *   count ("double reference") is the dangerous kind: the record could be freed while still
 *   in use. Fewer is a leak of the count.
 * - leak: a record with a refcount or a Grass record that nothing references.
 * - missing: a reference to an address Grass has no record for.
 * - structure: node heights, kinds (an address used both as node and data), decode errors.
 * - counters: the superblock's record and byte counts against what Grass holds.
 *
 * Its work follows what exists, not the allocator's high water: a refcount page Grass has no
 * record of counts nothing, so it is not walked address by address; the references into it
 * are checked from the other side, and Grass's record count catches records that nothing
 * accounts for there (or anywhere else fsck does not look).
 */
import type { CowStore } from './cow.ts';
import { decodeBlock } from './codec.ts';
import { CowNode, FIRST_ALLOC_GADDR, GRAVE_BASE_GADDR, GRAVE_PAGE_ENTRIES, RC_BASE_GADDR, RC_PAGE_ENTRIES, SUPERBLOCK_GADDR } from './format.ts';

export interface CowFsckReport {
  ok: boolean;
  /** Problems found, the first MAX_REPORTED of them. */
  problems: string[];
  problemCount: number;
  counts: { leaks: number; doubleReferences: number; refcountMismatches: number; missing: number; structure: number; counters: number };
  nodes: number;
  dataRecords: number;
  graveyard: number;
  checkedData: boolean;
}

const MAX_REPORTED = 100;

export interface CowFsckOptions {
  /** Also read and decode every data record (slower; catches codec damage). */
  data?: boolean;
}

export async function fsckCow(cow: CowStore, options: CowFsckOptions = {}): Promise<CowFsckReport> {
  const report: CowFsckReport = {
    ok: true,
    problems: [],
    problemCount: 0,
    counts: { leaks: 0, doubleReferences: 0, refcountMismatches: 0, missing: 0, structure: 0, counters: 0 },
    nodes: 0,
    dataRecords: 0,
    graveyard: cow.grave.length,
    checkedData: options.data === true,
  };
  const problem = (kind: keyof CowFsckReport['counts'], msg: string): void => {
    report.ok = false;
    report.counts[kind]++;
    report.problemCount++;
    if (report.problems.length < MAX_REPORTED) report.problems.push(msg);
  };
  const grass = cow.grass;
  const sb = cow.sb;
  const refs = new Map<number, number>();
  const kind = new Map<number, 'node' | 'data'>();
  const ref = (g: number): void => {
    refs.set(g, (refs.get(g) ?? 0) + 1);
  };
  const setKind = (g: number, k: 'node' | 'data'): boolean => {
    const was = kind.get(g);
    if (was !== undefined && was !== k) {
      problem('structure', `address ${g} is referenced both as a ${was} and as a ${k}`);
      return false;
    }
    kind.set(g, k);
    return was === undefined;
  };

  // Depth-first over distinct nodes; `stack` holds [address, expected height or -1 if unknown].
  const stack: [number, number][] = [];
  if (sb.root !== 0) {
    ref(sb.root);
    stack.push([sb.root, sb.rootHeight]);
  }
  for (const g of cow.grave) {
    if (refs.has(g)) problem('structure', `graveyard node ${g} is also referenced from the tree or twice from the graveyard`);
    ref(g); // the graveyard's own reference
    stack.push([g, -1]);
  }
  const visited = new Set<number>();
  while (stack.length > 0) {
    const [g, h] = stack.pop()!;
    if (visited.has(g)) continue;
    visited.add(g);
    if (!setKind(g, 'node')) continue;
    const rec = await grass.read(g).catch((e: unknown) => {
      problem('structure', `node ${g}: ${(e as Error).message}`);
      return null;
    });
    if (rec === null) continue;
    if (rec === undefined) {
      problem('missing', `node ${g} is referenced but Grass has no record for it`);
      continue;
    }
    let node: CowNode;
    try {
      node = CowNode.decode(rec, g);
    } catch (e) {
      problem('structure', (e as Error).message);
      continue;
    }
    if (h >= 0 && node.height !== h) {
      problem('structure', `node ${g} has height ${node.height}, its parent expects ${h}`);
      continue;
    }
    report.nodes++;
    for (let i = 0; i < 256; i++) {
      const c = node.get(i);
      if (c === 0) continue;
      ref(c);
      if (node.height > 0) stack.push([c, node.height - 1]);
      else if (setKind(c, 'data')) {
        report.dataRecords++;
        if (grass.size(c) === undefined) problem('missing', `data record ${c} is referenced but Grass has no record for it`);
        else if (options.data) {
          try {
            const d = await grass.read(c);
            if (d !== undefined) decodeBlock(d);
          } catch (e) {
            problem('structure', `data record ${c}: ${(e as Error).message}`);
          }
        }
      }
    }
  }

  // Every allocatable address with a refcount page: refcount against references, and Grass
  // record against both.
  let dataBytes = 0;
  let metaRecords = 0;
  let metaBytes = 0;
  /** Data records Grass holds at addresses Cow uses (metadata ones: metaRecords); see the end. */
  let dataFound = 0;
  const pageExists = (p: number): boolean => grass.size(RC_BASE_GADDR + p) !== undefined;
  for (let p = 0; p * RC_PAGE_ENTRIES < sb.nextGaddr; p++) {
    const rcSize = grass.size(RC_BASE_GADDR + p);
    if (rcSize === undefined) continue;
    metaRecords++;
    metaBytes += rcSize;
    let page: Uint32Array;
    try {
      page = await cow.loadRefcounts(p);
    } catch (e) {
      problem('structure', `refcount page ${p}: ${(e as Error).message}`);
      continue;
    }
    for (let i = 0; i < RC_PAGE_ENTRIES; i++) {
      const g = p * RC_PAGE_ENTRIES + i;
      if (g < FIRST_ALLOC_GADDR || g >= sb.nextGaddr) {
        if (page[i] !== 0) problem('structure', `address ${g} outside the allocated range has refcount ${page[i]}`);
        continue;
      }
      const want = refs.get(g) ?? 0;
      const have = page[i]!;
      const size = grass.size(g);
      const k = kind.get(g);
      if (size !== undefined) {
        if (k === 'data') {
          dataFound++;
          dataBytes += size;
        } else {
          metaRecords++;
          metaBytes += size;
        }
      }
      if (want !== have) {
        if (want > have) problem('doubleReferences', `address ${g} has ${want} references but refcount ${have}`);
        else if (want === 0) problem('leaks', `address ${g} has refcount ${have} but nothing references it`);
        else problem('refcountMismatches', `address ${g} has ${want} references but refcount ${have}`);
      }
      if (size !== undefined && want === 0 && have === 0) problem('leaks', `Grass holds a record at ${g} that nothing references (refcount 0)`);
    }
  }
  // References the walk above did not see: into refcount pages that do not exist (count 0),
  // or to addresses the allocator never handed out.
  for (const [g, want] of refs) {
    const allocated = g >= FIRST_ALLOC_GADDR && g < sb.nextGaddr;
    if (allocated && pageExists(Math.floor(g / RC_PAGE_ENTRIES))) continue;
    if (allocated) problem('doubleReferences', `address ${g} has ${want} references but refcount 0 (refcount page ${Math.floor(g / RC_PAGE_ENTRIES)} does not exist)`);
    else problem('structure', `address ${g} is referenced but lies at or above the allocator high water ${sb.nextGaddr}`);
    const size = grass.size(g);
    if (size === undefined) continue;
    if (kind.get(g) === 'data') {
      dataFound++;
      dataBytes += size;
    } else {
      metaRecords++;
      metaBytes += size;
    }
  }
  for (let i = 0; i * GRAVE_PAGE_ENTRIES < sb.graveCount; i++) {
    const size = grass.size(GRAVE_BASE_GADDR + i);
    if (size !== undefined) {
      metaRecords++;
      metaBytes += size;
    }
  }
  const sbSize = grass.size(SUPERBLOCK_GADDR);
  if (sbSize !== undefined) {
    metaRecords++;
    metaBytes += sbSize;
  }
  const checks: [string, number, number][] = [
    ['data records', sb.dataRecords, report.dataRecords],
    ['data bytes', sb.dataBytes, dataBytes],
    ['metadata records', sb.metaRecords, metaRecords],
    ['metadata bytes', sb.metaBytes, metaBytes],
  ];
  for (const [what, claimed, found] of checks) {
    if (claimed !== found) problem('counters', `superblock counts ${claimed} ${what}, found ${found}`);
  }
  // Records found above, against all Grass holds: the rest lie where no walk looks (free
  // addresses without a refcount page, above the high water, past the graveyard).
  const unaccounted = grass.stats().liveRecords - (metaRecords + dataFound);
  if (unaccounted !== 0) problem('leaks', `Grass holds ${unaccounted} records that fsck did not find at an address Cow uses (found ${metaRecords + dataFound})`);
  return report;
}
