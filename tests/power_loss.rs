//! Power loss. First the filesystem that models it (`power_loss/lossyfs.rs`), tested
//! on its own: data written but not fsynced is lost, or partly kept by the seed of the
//! cut; what was fsynced survives; what LMDB relies on (pwrite seen through mmap,
//! shared writable mappings, fcntl locks, O_DSYNC writes) works on the mount. Then
//! `shoal serve` on that filesystem, its power cut under load: it starts again, and
//! no acknowledged write is missing (`acknowledged_writes_survive_power_cuts_under_load`).
//!
//! These tests need root and /dev/fuse (CI runs as root); without them they fail.

mod common;

#[path = "power_loss/lossyfs.rs"]
mod lossyfs;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use lossyfs::{CutStats, LossyFs, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;

/// A backing directory and a mountpoint in a temp dir, with the filesystem mounted.
/// `fs` is declared first so that it is unmounted before the temp dir is removed.
struct Fixture {
    fs: LossyFs,
    backing: PathBuf,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("shoal-lossyfs")
            .tempdir()
            .expect("temp dir");
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).expect("backing dir");
        fs::create_dir(&mnt).expect("mountpoint");
        let fs = LossyFs::mount(&backing, &mnt);
        Fixture {
            fs,
            backing,
            mnt,
            _dir: dir,
        }
    }

    fn m(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn b(&self, name: &str) -> PathBuf {
        self.backing.join(name)
    }
}

/// `count` pages from page `first` on: page `i` is filled with `tag` and starts with
/// its index, so that a page in the wrong place or zeros are told apart.
fn pages(tag: u8, first: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for index in first..first + count {
        let mut page = vec![tag; PAGE];
        page[..8].copy_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&page);
    }
    out
}

/// What a file must hold after a cut: `old` (its durable content), with each page of
/// `new` that the cut kept written over it (extending the file as needed).
fn after_cut(stats: &CutStats, path: &str, old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = old.to_vec();
    for (index, kept) in stats.pages_of(path) {
        if !kept {
            continue;
        }
        let start = index as usize * PAGE;
        let end = (start + PAGE).min(new.len());
        if out.len() < end {
            out.resize(end, 0);
        }
        out[start..end].copy_from_slice(&new[start..end]);
    }
    out
}

/// Compares page by page, to say which page differs.
fn assert_pages(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: {} bytes, expected {}",
        actual.len(),
        expected.len()
    );
    for (index, (a, e)) in actual.chunks(PAGE).zip(expected.chunks(PAGE)).enumerate() {
        assert!(
            a == e,
            "{what}: page {index} differs (starts {:?}, expected {:?})",
            &a[..16.min(a.len())],
            &e[..16.min(e.len())]
        );
    }
}

fn errno(result: io::Result<impl std::fmt::Debug>) -> Option<i32> {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e.raw_os_error(),
    }
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// Creates (or empties) `path` for reading and writing.
fn create_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("create")
}

/// Runs `f` in a forked child and returns its exit code. `f` must only make
/// async-signal-safe calls (raw syscalls through libc; no allocation, no panics).
fn in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only runs `f` (async-signal-safe by contract) and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "child did not exit: {status:#x}");
    libc::WEXITSTATUS(status)
}

/// Whether the `want.len()` bytes at `p` equal `want` (no allocation: for children).
///
/// # Safety
/// `p` must point to at least `want.len()` readable bytes.
unsafe fn same(p: *const u8, want: &[u8]) -> bool {
    want.iter()
        .enumerate()
        .all(|(i, &w)| unsafe { p.add(i).read_volatile() } == w)
}

/// A shared mapping of `len` bytes of `fd` (null if mmap failed).
///
/// # Safety
/// `fd` must be an open descriptor.
unsafe fn map(fd: i32, len: usize, writable: bool) -> *mut u8 {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        p.cast()
    }
}

/// The scenario of the first test, up to the cut: `f` is written and fsynced (8 pages
/// of A), then overwritten and extended to 12 pages of B; `g` gets 6 pages of C; neither
/// is fsynced after that.
fn unsynced_scenario(fx: &Fixture, seed: u64) -> CutStats {
    let mut f = File::create(fx.m("f")).expect("create f");
    f.write_all(&pages(b'A', 0, 8)).expect("write f");
    f.sync_all().expect("fsync f");
    assert_eq!(
        fs::read(fx.b("f")).expect("backing f"),
        pages(b'A', 0, 8),
        "fsync must put the data in the backing file"
    );
    assert_eq!(fx.fs.dirty_pages(), 0);

    f.write_all_at(&pages(b'B', 0, 12), 0).expect("overwrite f");
    drop(f);
    fs::write(fx.m("g"), pages(b'C', 0, 6)).expect("write g");

    // The mount sees the new data; the backing store does not have it.
    assert_pages(
        &fs::read(fx.m("f")).expect("read f"),
        &pages(b'B', 0, 12),
        "f through the mount",
    );
    assert_pages(
        &fs::read(fx.m("g")).expect("read g"),
        &pages(b'C', 0, 6),
        "g through the mount",
    );
    assert_eq!(
        fs::metadata(fx.m("f")).expect("stat f").len(),
        12 * PAGE_SIZE
    );
    assert_pages(
        &fs::read(fx.b("f")).expect("backing f"),
        &pages(b'A', 0, 8),
        "backing f before the cut",
    );
    assert_eq!(
        fs::metadata(fx.b("g")).expect("backing g").len(),
        0,
        "g was created (metadata is durable) but holds nothing yet"
    );
    assert_eq!(fx.fs.dirty_pages(), 18);

    fx.fs.cut(seed)
}

const SEED: u64 = 7;

#[test]
fn a_cut_keeps_synced_data_and_a_seeded_part_of_unsynced_pages() {
    let mut fx = Fixture::new();
    let stats = unsynced_scenario(&fx, SEED);

    assert_eq!(stats.kept + stats.dropped, 18, "{stats:?}");
    assert_eq!(stats.kept, stats.pages.iter().filter(|p| p.kept).count());
    assert!(
        stats.kept > 0 && stats.dropped > 0,
        "seed {SEED} should keep some pages and drop others: {stats:?}"
    );
    let f: Vec<u64> = stats.pages_of("f").iter().map(|&(i, _)| i).collect();
    let g: Vec<u64> = stats.pages_of("g").iter().map(|&(i, _)| i).collect();
    assert_eq!(f, (0..12).collect::<Vec<_>>());
    assert_eq!(g, (0..6).collect::<Vec<_>>());
    assert_eq!(fx.fs.dirty_pages(), 0, "the cut empties the overlay");

    fx.fs.remount();
    let expected_f = after_cut(&stats, "f", &pages(b'A', 0, 8), &pages(b'B', 0, 12));
    let expected_g = after_cut(&stats, "g", &[], &pages(b'C', 0, 6));
    assert_pages(
        &fs::read(fx.m("f")).expect("read f"),
        &expected_f,
        "f after the cut",
    );
    assert_pages(
        &fs::read(fx.m("g")).expect("read g"),
        &expected_g,
        "g after the cut",
    );
    // The mount and the backing store agree: no overlay after a remount.
    assert_pages(
        &fs::read(fx.b("f")).expect("backing f"),
        &expected_f,
        "backing f after the cut",
    );
    // Pages the cut dropped really are gone: at least one page of f or g is not new.
    assert!(
        expected_f != pages(b'B', 0, 12) || expected_g != pages(b'C', 0, 6),
        "nothing was lost"
    );

    // A fresh mount starts clean and works as usual.
    fs::write(fx.m("h"), b"after").expect("write after remount");
    File::open(fx.m("h"))
        .expect("open h")
        .sync_all()
        .expect("fsync h");
    assert_eq!(fs::read(fx.b("h")).expect("backing h"), b"after");
}

#[test]
fn the_seed_decides_the_cut() {
    let cut = |seed| {
        let fx = Fixture::new();
        unsynced_scenario(&fx, seed)
    };
    let first = cut(SEED);
    assert_eq!(cut(SEED), first, "the same seed must make the same choices");
    assert_ne!(
        cut(SEED + 1).pages,
        first.pages,
        "another seed should choose otherwise"
    );
}

#[test]
fn o_dsync_writes_are_durable_at_once() {
    let mut fx = Fixture::new();
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .open(fx.m("meta"))
        .expect("open O_DSYNC");
    file.write_all(&pages(b'M', 0, 3)).expect("write");
    assert_eq!(fs::read(fx.b("meta")).expect("backing"), pages(b'M', 0, 3));
    drop(file);
    let stats = fx.fs.cut(SEED);
    assert!(
        stats.pages.is_empty(),
        "nothing was left to lose: {stats:?}"
    );
    fx.fs.remount();
    assert_eq!(fs::read(fx.m("meta")).expect("read"), pages(b'M', 0, 3));
}

// The tests below map files of the mount only in child processes: a process must not
// map files of a FUSE filesystem that it serves itself (see the module docs).

#[test]
fn mmap_sees_pwrite_before_any_fsync() {
    let fx = Fixture::new();
    let path = fx.m("data.mdb");
    let file = create_rw(&path);
    file.write_all_at(&pages(b'A', 0, 3), 0).expect("pwrite");
    let before = pages(b'A', 0, 3);
    let page1 = pages(b'B', 1, 1);
    let mut after = before.clone();
    after[PAGE..2 * PAGE].copy_from_slice(&page1);
    let c_path = cpath(&path);
    // A child maps the file read-only, as LMDB maps data.mdb, and pwrites while mapped.
    let code = in_child(|| unsafe {
        let fd = libc::open(c_path.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return 2;
        }
        let p = map(fd, 3 * PAGE, false);
        if p.is_null() {
            return 3;
        }
        if !same(p, &before) {
            return 4;
        }
        if libc::pwrite(fd, page1.as_ptr().cast(), PAGE, PAGE as libc::off_t) != PAGE as isize {
            return 5;
        }
        if !same(p, &after) {
            return 6;
        }
        libc::munmap(p.cast(), 3 * PAGE);
        libc::close(fd);
        0
    });
    assert_eq!(
        code, 0,
        "child (2 open, 3 mmap, 4 the mapping misses the first pwrite, 5 pwrite, \
         6 the mapping misses the pwrite made while mapped)"
    );
    assert_eq!(
        fs::metadata(fx.b("data.mdb")).expect("backing").len(),
        0,
        "nothing was fsynced"
    );
    file.sync_data().expect("fdatasync");
    assert_pages(
        &fs::read(fx.b("data.mdb")).expect("backing"),
        &after,
        "backing after fdatasync",
    );
}

#[test]
fn shared_writable_mappings_and_locks_work_across_processes() {
    let fx = Fixture::new();
    let path = fx.m("lock.mdb");
    let file = create_rw(&path);
    file.set_len(2 * PAGE_SIZE).expect("ftruncate");
    let c_path = cpath(&path);

    // A child maps the file twice, read-write and shared as LMDB maps lock.mdb: a write
    // through one mapping is seen through the other. A grandchild maps it too, sees that
    // write, and writes itself; the child sees that.
    let code = in_child(|| unsafe {
        let (fd1, fd2) = (
            libc::open(c_path.as_ptr(), libc::O_RDWR),
            libc::open(c_path.as_ptr(), libc::O_RDWR),
        );
        if fd1 < 0 || fd2 < 0 {
            return 2;
        }
        let (a, b) = (map(fd1, 2 * PAGE, true), map(fd2, 2 * PAGE, true));
        if a.is_null() || b.is_null() {
            return 3;
        }
        a.add(100).write_volatile(b'P');
        if b.add(100).read_volatile() != b'P' {
            return 4;
        }
        let pid = libc::fork();
        if pid == 0 {
            let fd = libc::open(c_path.as_ptr(), libc::O_RDWR);
            let p = if fd < 0 {
                std::ptr::null_mut()
            } else {
                map(fd, 2 * PAGE, true)
            };
            if p.is_null() {
                libc::_exit(5);
            }
            if p.add(100).read_volatile() != b'P' {
                libc::_exit(6);
            }
            p.add(PAGE + 7).write_volatile(b'C');
            libc::munmap(p.cast(), 2 * PAGE);
            libc::close(fd);
            libc::_exit(0);
        }
        let mut status = 0;
        if pid < 0 || libc::waitpid(pid, &mut status, 0) != pid {
            return 7;
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return libc::WEXITSTATUS(status);
        }
        if a.add(PAGE + 7).read_volatile() != b'C' || b.add(PAGE + 7).read_volatile() != b'C' {
            return 8;
        }
        // Unmapping writes the dirty pages back (as FUSE writes).
        libc::munmap(a.cast(), 2 * PAGE);
        libc::munmap(b.cast(), 2 * PAGE);
        libc::close(fd1);
        libc::close(fd2);
        0
    });
    assert_eq!(
        code, 0,
        "child (2 open, 3 mmap, 4 one mapping misses the other's write, 5 grandchild \
         mmap, 6 the grandchild misses the write, 7 fork, 8 the child misses the \
         grandchild's write)"
    );

    // Writeback of mapped pages reaches the filesystem as writes into the overlay, and
    // fsync makes them durable.
    let content = fs::read(&path).expect("read");
    assert_eq!(
        (content[100], content[PAGE + 7]),
        (b'P', b'C'),
        "read() sees what was written through the mappings"
    );
    let backing = fs::read(fx.b("lock.mdb")).expect("backing");
    assert!(
        backing.len() < PAGE + 8 || (backing[100], backing[PAGE + 7]) != (b'P', b'C'),
        "mapped writes reached the backing file without an fsync"
    );
    file.sync_all().expect("fsync");
    let backing = fs::read(fx.b("lock.mdb")).expect("backing");
    assert_eq!(
        (backing[100], backing[PAGE + 7]),
        (b'P', b'C'),
        "fsync persists mapped writes"
    );

    // fcntl locks: the parent holds a write lock on [0, 10); the child is refused it,
    // sees the parent as its holder, and gets it once the parent unlocks.
    let setlk = |fd: i32, kind: i32| -> io::Result<()> {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 0;
        fl.l_len = 10;
        // SAFETY: `fl` is a valid flock structure.
        if unsafe { libc::fcntl(fd, libc::F_SETLK, &fl) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    setlk(file.as_raw_fd(), libc::F_WRLCK).expect("parent F_SETLK");
    let parent = std::process::id() as libc::pid_t;
    let try_lock = || unsafe {
        let fd = libc::open(c_path.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return 10;
        }
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_len = 10;
        let mut probe = fl;
        if libc::fcntl(fd, libc::F_GETLK, &mut probe) != 0 {
            return 11;
        }
        if libc::fcntl(fd, libc::F_SETLK, &fl) == 0 {
            return if probe.l_type == libc::F_UNLCK as libc::c_short {
                0
            } else {
                12
            };
        }
        let e = *libc::__errno_location();
        if (e == libc::EAGAIN || e == libc::EACCES)
            && probe.l_type == libc::F_WRLCK as libc::c_short
            && probe.l_pid == parent
        {
            1
        } else {
            13
        }
    };
    assert_eq!(
        in_child(try_lock),
        1,
        "the child must be refused the lock the parent holds (0: granted; 1x: errors)"
    );
    setlk(file.as_raw_fd(), libc::F_UNLCK).expect("parent unlock");
    assert_eq!(
        in_child(try_lock),
        0,
        "the child gets the lock once it is free"
    );

    // flock, as on a pid file.
    // SAFETY: a valid descriptor.
    assert_eq!(
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0,
        "flock"
    );
    let code = in_child(|| unsafe {
        let fd = libc::open(c_path.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            return 10;
        }
        if libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0 {
            return 0;
        }
        if *libc::__errno_location() == libc::EWOULDBLOCK {
            1
        } else {
            11
        }
    });
    assert_eq!(
        code, 1,
        "the child must be refused the flock the parent holds"
    );
}

#[test]
fn rename_of_an_fsynced_temp_file_survives_and_of_an_unsynced_one_does_not() {
    let mut fx = Fixture::new();
    for name in ["config", "config2"] {
        fs::write(fx.m(name), pages(b'O', 0, 2)).expect("write old");
        File::open(fx.m(name))
            .expect("open")
            .sync_all()
            .expect("fsync old");
    }
    // The right way: write the temp file, fsync it, rename it over the old one.
    let mut tmp = File::create(fx.m("config.tmp")).expect("create tmp");
    tmp.write_all(&pages(b'N', 0, 3)).expect("write tmp");
    tmp.sync_all().expect("fsync tmp");
    drop(tmp);
    fs::rename(fx.m("config.tmp"), fx.m("config")).expect("rename");
    // The wrong way: no fsync before the rename.
    fs::write(fx.m("config2.tmp"), pages(b'N', 0, 3)).expect("write tmp2");
    fs::rename(fx.m("config2.tmp"), fx.m("config2")).expect("rename 2");

    // Renames are applied to the backing directory at once.
    assert!(!fx.b("config.tmp").exists() && !fx.b("config2.tmp").exists());
    assert_eq!(fs::metadata(fx.b("config2")).expect("backing").len(), 0);

    let stats = fx.fs.cut(SEED);
    assert!(stats.pages_of("config").is_empty(), "{stats:?}");
    assert_eq!(stats.pages_of("config2").len(), 3, "{stats:?}");
    assert!(
        stats.pages_of("config2").iter().any(|&(_, kept)| !kept),
        "seed {SEED} should drop a page of config2: {stats:?}"
    );

    fx.fs.remount();
    assert_eq!(
        fs::read(fx.m("config")).expect("read config"),
        pages(b'N', 0, 3)
    );
    assert!(!fx.m("config.tmp").exists());
    let config2 = fs::read(fx.m("config2")).expect("read config2");
    assert_pages(
        &config2,
        &after_cut(&stats, "config2", &[], &pages(b'N', 0, 3)),
        "config2",
    );
    assert_ne!(config2, pages(b'N', 0, 3), "the unsynced rename lost data");
}

#[test]
fn after_the_cut_every_operation_fails_with_eio() {
    let fx = Fixture::new();
    fs::write(fx.m("a"), b"durable").expect("write a");
    let open = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.m("a"))
        .expect("open a");
    open.sync_all().expect("fsync a");
    fs::create_dir(fx.m("dir")).expect("mkdir");

    fx.fs.cut(SEED);
    assert!(fx.fs.is_cut());
    let eio = Some(libc::EIO);
    assert_eq!(errno(fs::metadata(fx.m("a"))), eio, "stat");
    assert_eq!(errno(File::open(fx.m("a"))), eio, "open");
    assert_eq!(errno(File::create(fx.m("b"))), eio, "create");
    assert_eq!(errno(fs::read_dir(&fx.mnt)), eio, "readdir");
    assert_eq!(errno(open.write_at(b"lost", 0)), eio, "write");
    assert_eq!(errno(open.sync_all()), eio, "fsync");
    assert_eq!(errno(fs::rename(fx.m("a"), fx.m("c"))), eio, "rename");
    assert_eq!(errno(fs::remove_file(fx.m("a"))), eio, "unlink");
    assert_eq!(errno(fs::create_dir(fx.m("d"))), eio, "mkdir");
    assert_eq!(errno(fs::remove_dir(fx.m("dir"))), eio, "rmdir");
    drop(open);
    // Nothing reached the backing store.
    assert_eq!(fs::read(fx.b("a")).expect("backing a"), b"durable");
    assert!(!fx.b("b").exists() && !fx.b("c").exists() && !fx.b("d").exists());
    assert!(fx.b("dir").is_dir());
}

#[test]
fn metadata_operations_reach_the_backing_directory_at_once() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    fs::create_dir_all(fx.m("d/e")).expect("mkdir -p");
    assert!(fx.b("d/e").is_dir());
    fs::write(fx.m("d/e/x"), pages(b'X', 0, 2)).expect("write x");
    assert!(fx.b("d/e/x").exists());
    fs::set_permissions(fx.m("d/e/x"), fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_eq!(
        fs::metadata(fx.b("d/e/x"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Truncate drops the overlay beyond the new size, and is durable.
    OpenOptions::new()
        .write(true)
        .open(fx.m("d/e/x"))
        .expect("open")
        .set_len(100)
        .expect("truncate");
    assert_eq!(fs::metadata(fx.b("d/e/x")).expect("stat").len(), 100);
    assert_eq!(
        fs::read(fx.m("d/e/x")).expect("read"),
        pages(b'X', 0, 1)[..100].to_vec()
    );
    // A directory rename carries what is below it.
    fs::rename(fx.m("d/e"), fx.m("d/f")).expect("rename dir");
    assert!(fx.b("d/f/x").exists() && !fx.b("d/e").exists());
    assert_eq!(
        fs::read(fx.m("d/f/x")).expect("read after rename").len(),
        100
    );
    let names: Vec<String> = fs::read_dir(fx.m("d/f"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["x"]);
    std::os::unix::fs::symlink("x", fx.m("d/f/link")).expect("symlink");
    assert_eq!(
        fs::read_link(fx.m("d/f/link")).expect("readlink"),
        Path::new("x")
    );
    fs::hard_link(fx.m("d/f/x"), fx.m("d/f/y")).expect("link");
    fs::remove_file(fx.m("d/f/x")).expect("unlink x");
    assert_eq!(fs::read(fx.m("d/f/y")).expect("read y").len(), 100);
    fs::remove_file(fx.m("d/f/y")).expect("unlink y");
    fs::remove_file(fx.m("d/f/link")).expect("unlink link");
    fs::remove_dir(fx.m("d/f")).expect("rmdir");
    assert!(!fx.b("d/f").exists());
    // statfs passes through.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-buffer.
    assert_eq!(
        unsafe { libc::statvfs(cpath(&fx.mnt).as_ptr(), &mut st) },
        0
    );
    assert!(st.f_blocks > 0);
}

/// Set for the child process that runs [`lmdb_child`]: `write:DIR` or `read:DIR`.
const LMDB_CHILD: &str = "LOSSYFS_LMDB_CHILD";

/// Runs [`lmdb_child`] in a child process (LMDB maps its files, which this process must
/// not do on a mount it serves) and checks that it ran and passed.
fn run_lmdb_child(phase: &str, dir: &Path) {
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["lmdb_child", "--exact", "--include-ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(LMDB_CHILD, format!("{phase}:{}", dir.display()))
        .output()
        .expect("run the LMDB child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "LMDB child ({phase}) failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The LMDB side of [`lmdb_commits_survive_a_cut`], run in a child process: `write`
/// makes 100 commits of one key each (default flags: every commit synced), `read`
/// checks that all 100 are there.
#[test]
#[ignore = "run by lmdb_commits_survive_a_cut in a child process"]
fn lmdb_child() {
    use heed::types::Str;
    use heed::{CommitOrAbort, Database, EnvOpenOptions};

    let Ok(spec) = std::env::var(LMDB_CHILD) else {
        eprintln!("lmdb_child has nothing to do outside lmdb_commits_survive_a_cut");
        return;
    };
    let (phase, dir) = spec.split_once(':').expect("PHASE:DIR");
    let mut options = EnvOpenOptions::new();
    options.map_size(16 << 20).max_dbs(1);
    // SAFETY: this process opens the environment once.
    let env = unsafe { options.open(dir) }.expect("open the LMDB environment on the mount");
    match phase {
        "write" => {
            let db: Database<Str, Str> = env
                .create_databases_and_commit(env.write_txn().expect("txn"), |opener, txn| {
                    opener
                        .create_database::<Str, Str>(txn, Some("kv"))
                        .map(CommitOrAbort::<_, ()>::Commit)
                })
                .expect("create db")
                .unwrap_commit();
            for i in 0..100 {
                let mut txn = env.write_txn().expect("write txn");
                db.put(&mut txn, &format!("key{i:03}"), &format!("value{i}"))
                    .expect("put");
                txn.commit().expect("commit");
            }
        }
        "read" => {
            let db: Database<Str, Str> = env
                .open_databases_and_commit(env.read_txn().expect("txn"), |opener, txn| {
                    opener
                        .open_database::<Str, Str>(txn, Some("kv"))
                        .map(|db| CommitOrAbort::<_, ()>::Commit(db.expect("the kv database")))
                })
                .expect("open db")
                .unwrap_commit();
            let rtxn = env.read_txn().expect("read txn");
            for i in 0..100 {
                let value = db.get(&rtxn, &format!("key{i:03}")).expect("get");
                assert_eq!(
                    value,
                    Some(format!("value{i}").as_str()),
                    "key{i:03} after the cut"
                );
            }
            assert_eq!(db.len(&rtxn).expect("len"), 100);
        }
        other => panic!("unknown phase {other:?}"),
    }
    env.prepare_for_closing().wait();
}

#[test]
fn lmdb_commits_survive_a_cut() {
    let mut fx = Fixture::new();
    let env_dir = fx.m("env");
    fs::create_dir(&env_dir).expect("env dir");
    run_lmdb_child("write", &env_dir);

    // LMDB writes its data pages with pwrite + fdatasync and its meta pages through an
    // O_DSYNC descriptor: no page of data.mdb may still be waiting in the overlay.
    let dirty = fx.fs.dirty_files();
    assert!(!dirty.contains_key(Path::new("env/data.mdb")), "{dirty:?}");
    let stats = fx.fs.cut(SEED);
    assert!(
        stats
            .pages
            .iter()
            .all(|p| p.path == Path::new("env/lock.mdb")),
        "{stats:?}"
    );

    fx.fs.remount();
    run_lmdb_child("read", &env_dir);
}

/// A write acknowledged by the server: key, value, and when the answer came.
type Acknowledged = Vec<(String, String, std::time::Instant)>;

/// With `async` durability, how long after its acknowledgement a write must be on
/// disk: the journal is flushed every `flush_interval_ms` (100 ms in these tests),
/// with room to spare for a busy machine.
const ASYNC_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

/// `threads` connections SET unique keys of round `round` as fast as they are answered,
/// until the server goes away (or a bound of count or time); returns what was
/// acknowledged.
fn write_until_cut(
    server: &common::Server,
    round: u64,
    threads: usize,
) -> Vec<std::thread::JoinHandle<Acknowledged>> {
    (0..threads)
        .map(|thread| {
            let mut con = server.conn();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let mut acknowledged = Vec::new();
                for i in 0..200_000u64 {
                    if started.elapsed() > std::time::Duration::from_secs(60) {
                        break;
                    }
                    let key = format!("r{round}-t{thread}-{i}");
                    let value = format!("{key}-{}", "v".repeat((i % 90) as usize));
                    match redis::cmd("SET")
                        .arg(&key)
                        .arg(&value)
                        .query::<String>(&mut con)
                    {
                        Ok(reply) => {
                            assert_eq!(reply, "OK");
                            acknowledged.push((key, value, std::time::Instant::now()));
                        }
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect()
}

/// Each write is there with its value or, unless `all_there`, missing; never with
/// another value.
fn check_writes(server: &common::Server, writes: &[(String, String)], all_there: bool) {
    let mut con = server.conn();
    for chunk in writes.chunks(500) {
        let mut pipe = redis::pipe();
        for (key, _) in chunk {
            pipe.cmd("GET").arg(key);
        }
        let values: Vec<Option<String>> = pipe.query(&mut con).expect("GETs");
        for ((key, want), got) in chunk.iter().zip(values) {
            match got {
                Some(got) => assert_eq!(&got, want, "{key} has a value it was never given"),
                None => assert!(
                    !all_there,
                    "acknowledged write of {key} lost after a power cut\n{}",
                    server.logs()
                ),
            }
        }
    }
}

/// `shoal serve` with `durability` on the lossy filesystem, cut three times under
/// load: after a few hundred ms (before any checkpoint but the one at start), and
/// after 1.5 s and 2.7 s (past checkpoints, with their pages and the journal's since
/// in flight). Each cut kills the process tree, keeps a seeded part of every page not
/// yet synced and loses the rest; the machine then boots again (a new boot id).
/// Shoal must start, rewind its shards to their checkpoints and replay their
/// journals. With `fsync`, every write it acknowledged, in this round and the ones
/// before, is there; with `async`, every write acknowledged [`ASYNC_WINDOW`] before
/// the cut, and no key has a value it was never given.
fn power_cuts_under_load(durability: &str, storage: &str) {
    let dir = tempfile::Builder::new()
        .prefix("shoal-power")
        .tempdir()
        .expect("temp dir");
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&backing).expect("backing dir");
    fs::create_dir(&mnt).expect("mountpoint");
    let boot = dir.path().join("boot_id");
    fs::write(&boot, "boot-0").expect("boot id");
    let mut lossy = LossyFs::mount(&backing, &mnt);
    let mut server = common::Server::configure(&format!(
        "data_dir = {:?}\n[client]\nunix_socket = \"\"\n[storage]\ndurability = {durability:?}\nflush_interval_ms = 100\n{storage}",
        mnt.join("data").display().to_string()
    ));
    server.set_env("SHOAL_BOOT_ID_PATH", &boot.display().to_string());
    server.spawn_and_wait();

    let (mut must_be_there, mut may_be_there) = (Vec::new(), Vec::new());
    let mut data_pages_lost = 0;
    // `SHOAL_LONG_TESTS=1` adds 12 cuts after 0.1 to 3 s of writes, chosen by a seed.
    let mut rounds = vec![(1u64, 300u64), (2, 1500), (3, 2700)];
    if common::long_tests() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for round in 4..16 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            rounds.push((round, 100 + state % 2900));
        }
    }
    for (round, run_ms) in rounds {
        let writers = write_until_cut(&server, round, 4);
        std::thread::sleep(std::time::Duration::from_millis(run_ms));
        let cut_at = std::time::Instant::now();
        server.kill_tree();
        let mut this_round = 0;
        for writer in writers {
            for (key, value, at) in writer.join().expect("writer") {
                this_round += 1;
                match durability == "fsync" || at + ASYNC_WINDOW <= cut_at {
                    true => must_be_there.push((key, value)),
                    false => may_be_there.push((key, value)),
                }
            }
        }
        assert!(this_round > 0, "round {round}: no write was acknowledged");
        let stats = lossy.cut(round);
        data_pages_lost += stats
            .pages
            .iter()
            .filter(|p| !p.kept && p.path.ends_with("data.mdb"))
            .count();
        eprintln!(
            "{durability}, round {round}: {this_round} writes acknowledged; the cut kept {} unsynced pages and lost {}",
            stats.kept, stats.dropped
        );
        lossy.remount();
        fs::write(&boot, format!("boot-{round}")).expect("boot id");
        server.spawn_and_wait();
        check_writes(&server, &must_be_there, true);
        check_writes(&server, &may_be_there, false);
    }
    assert!(
        data_pages_lost > 0,
        "the cuts lost no page of a data file: they tested nothing of LMDB's recovery"
    );
    assert!(
        server
            .logs()
            .contains("rewinding the shard to its last checkpoint"),
        "the shards were rewound after the reboots\n{}",
        server.logs()
    );
    if durability == "async" {
        assert!(
            !must_be_there.is_empty(),
            "no write was old enough to be required: the rounds are too short"
        );
    }
    server.stop();
    lossy.unmount();
}

#[test]
fn acknowledged_writes_survive_power_cuts_under_load() {
    // Every group commit committed in LMDB; the default, write-back, is the third test.
    power_cuts_under_load("fsync", "writeback_ms = 0\n");
}

#[test]
fn with_async_durability_a_power_cut_loses_at_most_the_last_moments_and_corrupts_nothing() {
    // Every group commit committed in LMDB, so that the cuts hit its pages.
    power_cuts_under_load("async", "writeback_ms = 0\n");
}

#[test]
fn with_write_back_acknowledged_writes_survive_power_cuts_under_load() {
    // The cuts land while acknowledged writes wait in the workers' transactions.
    power_cuts_under_load(
        "fsync",
        "writeback_ms = 300\nwriteback_idle_ms = 0\nwriteback_min_free_bytes = 0\n",
    );
}
