//! The id space that `ID.NEW` issues from: `[FIRST_ID, END_ID)`, handed out in
//! blocks of [`BLOCK`] ids. The net-daemon's allocator and the cluster's id
//! ranges both cut it along these constants; docs/ids.md describes the scheme.

/// Ids per block.
pub const BLOCK: u64 = 1 << 20;
/// The first id of the space.
pub const FIRST_ID: u64 = 1;
/// One past the last id (ids fit a positive i64).
pub const END_ID: u64 = 1 << 63;

const _: () = assert!(FIRST_ID < BLOCK && END_ID.is_multiple_of(BLOCK));
