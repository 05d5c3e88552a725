//! What LMDB writes to the disk per put, by how many puts each commit holds and whether
//! a snapshot is pinned between checkpoints, as the shard-worker's checkpoints pin one
//! (docs/architecture.md, *Durability*).
//!
//! Raw LMDB, no Shoal code: an environment in a temp dir with `MDB_NOSYNC`, one
//! database preloaded with `keys` keys of 110-byte values, then `puts` puts of random
//! keys among them, committed `batch` at a time. Every `window_ms` the environment is
//! flushed; with `pinned`, a read transaction taken before each flush is held until
//! the next one (so LMDB cannot reuse a page that the flushed snapshot uses). Prints
//! puts per second, the bytes the block devices took per put (from
//! `/sys/block/*/stat`; other writers on the machine count too) and the data file's
//! size.
//!
//! ```text
//! cargo bench -p shoal-shard-worker --bench pages -- [batch puts keys pinned window_ms]
//! cargo bench -p shoal-shard-worker --bench pages -- 11 400000 50000 1 1000
//! ```
//!
//! Without arguments it runs the table of docs/performance.md (*What limits each
//! figure*): 400,000 puts in batches of 11, 150 and 1,500, and 4,000,000 in batches of
//! 15,000, pinned; 4,000,000 in batches of 11 and 150, not pinned; 50,000 keys,
//! flushed every second. The environment is made under the target directory.

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, EnvFlags, EnvOpenOptions};
use std::time::{Duration, Instant};

const VALUE_BYTES: usize = 110;

/// Sectors written so far by the machine's disks, from `/sys/block/<dev>/stat`: not
/// loop, zram or RAM devices, and not the devices stacked on others (device-mapper,
/// md), whose writes their disks count.
fn sectors_written() -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/sys/block").expect("/sys/block") {
        let name = entry.expect("a block device").file_name();
        let name = name.to_string_lossy();
        if name.starts_with("loop") || name.starts_with("zram") || name.starts_with("ram") {
            continue;
        }
        let stacked = std::fs::read_dir(format!("/sys/block/{name}/slaves"))
            .is_ok_and(|mut slaves| slaves.next().is_some());
        if stacked {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .nth(6)
            .and_then(|field| field.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn key(i: usize) -> Vec<u8> {
    format!("\0\x01key:{i:012}").into_bytes()
}

fn run(batch: usize, puts: usize, keys: usize, pinned: bool, window: Duration) {
    // Under the target directory, on a disk: `/tmp` may be a tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temp dir");
    // SAFETY: the environment is opened once in this process, in a fresh directory.
    let env = unsafe {
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options
            .map_size(16 << 30)
            .max_dbs(2)
            .flags(EnvFlags::NO_SYNC);
        options.open(dir.path()).expect("open the environment")
    };
    let txn = env.write_txn().expect("a write transaction");
    let database: Database<Bytes, Bytes> = env
        .create_databases_and_commit(txn, |opener, txn| {
            opener
                .create_database::<Bytes, Bytes>(txn, Some("c0"))
                .map(CommitOrAbort::<_, ()>::Commit)
        })
        .expect("create the database")
        .unwrap_commit();
    let value = [7u8; VALUE_BYTES];
    let mut txn = env.write_txn().expect("a write transaction");
    for i in 0..keys {
        database.put(&mut txn, &key(i), &value).expect("preload");
    }
    txn.commit().expect("commit the preload");
    env.force_sync().expect("flush the preload");

    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut pin = pinned.then(|| env.clone().static_read_txn().expect("a pin"));
    let mut flushed = Instant::now();
    let before = sectors_written();
    let started = Instant::now();
    let mut done = 0;
    while done < puts {
        let mut txn = env.write_txn().expect("a write transaction");
        for _ in 0..batch.min(puts - done) {
            let i = random() as usize % keys;
            database.put(&mut txn, &key(i), &value).expect("put");
            done += 1;
        }
        txn.commit().expect("commit");
        if flushed.elapsed() >= window {
            let next = pinned.then(|| env.clone().static_read_txn().expect("a pin"));
            env.force_sync().expect("flush");
            pin = next;
            flushed = Instant::now();
        }
    }
    env.force_sync().expect("flush");
    drop(pin);
    let seconds = started.elapsed().as_secs_f64();
    let bytes = (sectors_written() - before) * 512;
    if bytes == 0 {
        eprintln!(
            "no disk took writes: is {} on a disk?",
            dir.path().display()
        );
    }
    let file = std::fs::metadata(dir.path().join("data.mdb")).map_or(0, |m| m.len());
    println!(
        "batch {batch:>6}  pinned {pinned:<5}  window {:>5} ms  {:>9.0} puts/s  {:>6.2} KB written per put  data file {:>5} MiB",
        window.as_millis(),
        puts as f64 / seconds,
        bytes as f64 / puts as f64 / 1000.0,
        file >> 20
    );
}

fn main() {
    // `cargo bench` passes `--bench`; only the numbers are ours.
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    match numbers[..] {
        [batch, puts, keys, pinned, window_ms] => run(
            batch.max(1),
            puts,
            keys.max(1),
            pinned != 0,
            Duration::from_millis(window_ms as u64),
        ),
        [] => {
            let second = Duration::from_secs(1);
            for batch in [11, 150, 1_500] {
                run(batch, 400_000, 50_000, true, second);
            }
            // Faster runs get more puts, so that several flushes fall in them.
            run(15_000, 4_000_000, 50_000, true, second);
            for batch in [11, 150] {
                run(batch, 4_000_000, 50_000, false, second);
            }
        }
        _ => {
            eprintln!("usage: pages [batch puts keys pinned(0|1) window_ms]");
            std::process::exit(2);
        }
    }
}
