//! The cursors of SCANs in progress: where each resumes, under a token that goes
//! into the cursor number the client gets back. SCAN (in [`crate::commands`])
//! saves and loads them; the table is bounded, and the oldest are dropped first.
//! It never talks to a worker.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use shoal_shared::limits::MAX_STORED_KEY_BYTES;

/// Cursors kept for SCAN; older ones fall back to their partition's start.
const MAX_SCAN_CURSORS: usize = 100_000;
/// Cursor layout (all below bit 63, so clients that read it as a signed integer cope):
/// worker in bits 55..63, partition in bits 39..55, token below.
const CURSOR_TOKEN_BITS: u32 = 39;
const CURSOR_WORKER_SHIFT: u32 = 55;

/// A stored key after every key of `partition`: a scan resuming after it starts the next.
pub(crate) fn partition_end(partition: u16) -> Vec<u8> {
    let mut end = partition.to_be_bytes().to_vec();
    end.extend(std::iter::repeat_n(0xff, MAX_STORED_KEY_BYTES + 1));
    end
}

/// Where a SCAN resumes: the worker, and the stored key (partition ++ key) to continue after.
#[derive(Clone)]
pub(crate) struct ScanPosition {
    pub(crate) worker: usize,
    pub(crate) after: Option<Vec<u8>>,
}

/// Positions of SCANs in progress, under their cursor tokens; bounded, oldest dropped first.
#[derive(Default)]
pub struct ScanCursors {
    next_token: AtomicU64,
    table: Mutex<CursorTable>,
}

/// Resume keys by token, and the tokens in the order they were made (for eviction).
type CursorTable = (HashMap<u64, Vec<u8>>, VecDeque<u64>);

impl ScanCursors {
    /// A cursor for `position`: worker (8 bits) and partition (16 bits) above a token.
    pub(crate) fn save(&self, position: &ScanPosition) -> u64 {
        let after = position.after.clone().unwrap_or_default();
        let partition = match after.as_slice() {
            [high, low, ..] => u64::from(u16::from_be_bytes([*high, *low])),
            _ => 0,
        };
        let token =
            (self.next_token.fetch_add(1, Ordering::Relaxed) % ((1 << CURSOR_TOKEN_BITS) - 1)) + 1;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *table;
        map.insert(token, after);
        order.push_back(token);
        while order.len() > MAX_SCAN_CURSORS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        ((position.worker as u64) << CURSOR_WORKER_SHIFT) | (partition << CURSOR_TOKEN_BITS) | token
    }

    /// The position a cursor names; `None` for a malformed cursor.
    pub(crate) fn load(&self, cursor: u64, workers: usize) -> Option<ScanPosition> {
        if cursor == 0 {
            return Some(ScanPosition {
                worker: 0,
                after: None,
            });
        }
        let worker = (cursor >> CURSOR_WORKER_SHIFT) as usize;
        let partition = ((cursor >> CURSOR_TOKEN_BITS) & 0xffff) as u16;
        let token = cursor & ((1 << CURSOR_TOKEN_BITS) - 1);
        if worker >= workers || token == 0 {
            return None;
        }
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let after = match table.0.get(&token) {
            Some(after)
                if after.len() >= 2 && u16::from_be_bytes([after[0], after[1]]) == partition =>
            {
                after.clone()
            }
            // Unknown token: restart at the beginning of the partition, after every key
            // of the partition before it.
            _ => match partition.checked_sub(1) {
                Some(previous) => partition_end(previous),
                None => {
                    return Some(ScanPosition {
                        worker,
                        after: None,
                    })
                }
            },
        };
        Some(ScanPosition {
            worker,
            after: Some(after),
        })
    }
}
