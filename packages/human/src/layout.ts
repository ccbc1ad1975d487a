/**
 * Where a pool keeps things in its Cow space. Each image (volume, snapshot, scratch area) owns
 * one slot: an aligned run of 2^SLOT_BITS blocks starting at id << SLOT_BITS. Slot 0 holds the
 * catalog. Aligned slots are what make a snapshot one BLOCK-COPY of a whole slot, O(log n),
 * and a diff a walk that skips shared subtrees (Cow's DIFF_WINDOW_BLOCKS is one slot).
 */
import { BLOCK_BYTES, DIFF_WINDOW_BLOCKS } from '@pasture/cow';

export { BLOCK_BYTES };
export const SLOT_BITS = 40n;
export const SLOT_BLOCKS = 1n << SLOT_BITS;
// Pool.diff hands Cow whole slots: they must be exactly Cow's diff window.
if (SLOT_BLOCKS !== DIFF_WINDOW_BLOCKS) throw new Error(`a Human slot (${SLOT_BLOCKS} blocks) must be Cow's diff window (${DIFF_WINDOW_BLOCKS})`);
/** 2^40 blocks of 4 KiB: 4 PiB, the largest volume. */
export const MAX_VOLUME_BYTES = Number(SLOT_BLOCKS) * BLOCK_BYTES;
/** Ids fit the 128-bit space with room to spare (2^40 of them would; we stop at 2^32). */
export const MAX_IMAGE_ID = 2 ** 32 - 1;
/** The catalog may use the first 1024 blocks (4 MiB) of slot 0. */
export const CATALOG_BLOCKS_MAX = 1024;
/** Largest single read or write: bounds one Cow transaction (8192 blocks). */
export const MAX_IO_BYTES = 32 * 1024 * 1024;

export function slotBase(id: number): bigint {
  return BigInt(id) << SLOT_BITS;
}
