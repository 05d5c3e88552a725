//! `lossyfs`: a FUSE filesystem that models a power failure, for the power-loss tests.
//!
//! It passes everything through to a backing directory, except file data: a write
//! (`write`, `pwrite`, or the writeback of a page dirtied through a shared mmap, which
//! reaches FUSE as a write) lands in an in-memory overlay of dirty 4096-byte pages of
//! that file, the way an OS page cache holds it before it reaches the disk. Reads see
//! the overlay over the backing file, and a file's size includes the extensions that
//! only the overlay holds.
//!
//! # What is durable
//!
//! - `fsync`/`fdatasync` of a file (and `msync(MS_SYNC)`, `sync_file_range` aside) writes
//!   that file's dirty pages to the backing file and fsyncs it. A write through a
//!   descriptor opened with `O_SYNC`/`O_DSYNC` is made durable at once (LMDB writes its
//!   meta pages so). `close` (`flush`/`release`) persists nothing.
//! - Metadata is treated as durable the moment it happens: create, mknod, mkdir,
//!   symlink, link, unlink, rmdir, rename, chmod/chown/utimes, and truncate (`setattr`)
//!   are applied to the backing directory at once. A truncate also drops the overlay
//!   pages beyond the new size. `fsyncdir` has nothing left to do.
//!
//! # The power cut
//!
//! [`LossyFs::cut`] is the power failure. From that instant every request from the
//! kernel fails with EIO, so nothing issued after the cut reaches the backing store.
//! Then each dirty page is kept (written to the backing file) or dropped, with
//! probability 1/2, by a PRNG seeded with the cut's seed; files are taken in the order
//! of their paths and pages in the order of their offsets, so a seed always makes the
//! same choices for the same overlay. A kept page past the backing file's end extends
//! the file (a hole before it reads as zeros); a dropped page leaves what the backing
//! file held there. The file's size after the cut is the backing file's size then: the
//! size that only dropped pages gave it is lost. [`CutStats`] says which page went
//! which way. Dirty pages of a file that was already unlinked have no name left and are
//! discarded without a count. Then unmount ([`LossyFs::unmount`] or drop) and mount a
//! fresh `LossyFs` on the same backing directory: it starts with no overlay.
//!
//! What the model does not cover: metadata operations are never lost or reordered
//! (a real filesystem may lose a rename or a create that no directory fsync covered);
//! a page is kept or lost whole (no torn sectors inside a page); pages are not
//! written back in the background before the cut (a real kernel may persist some
//! unsynced pages early; the coin flip at the cut stands for that); data still in the
//! kernel's page cache of the FUSE mount that was never sent to the filesystem (pages
//! dirtied through a shared mmap of a process that is still alive) is lost as a
//! whole; an `O_SYNC`/`O_DSYNC` write makes all the file's dirty pages durable, not
//! only its own range (the kernel follows it with a FUSE fsync, which has no range);
//! xattrs, fallocate and file locks go to the kernel's defaults (locks are local to
//! the kernel, which is what processes on one machine need).
//!
//! # Requirements
//!
//! Root and `/dev/fuse`. Mounting calls mount(2) directly (the `fuser` crate's pure-Rust
//! path), so neither libfuse nor `fusermount3` is needed. The kernel caches no entry
//! or attribute (TTL 0) and no direct I/O is used, so shared writable mmaps work, as do
//! POSIX (`fcntl`) and `flock` locks: the filesystem does not ask for
//! `FUSE_POSIX_LOCKS`, so the kernel keeps them itself.
//!
//! The filesystem is served by a thread of the process that mounts it. That process
//! must not mmap files of the mount itself (run LMDB, or anything else that maps them,
//! in a child process, as the real server is): a thread that faults on or unmaps such
//! a mapping holds the process's mmap lock while it waits for this filesystem, whose
//! thread may need the same lock to fault in or allocate memory, and the process
//! deadlocks in the kernel. Plain reads and writes from the mounting process are fine.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

/// The unit of loss: the overlay holds, and a cut keeps or drops, pages of this size.
pub const PAGE_SIZE: u64 = 4096;

/// `statfs` magic of a FUSE mount.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Entries and attributes are not cached by the kernel.
const TTL: Duration = Duration::ZERO;

const ROOT: u64 = 1;

/// A mounted lossy filesystem. Dropping it unmounts it.
pub struct LossyFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
}

/// What a [`LossyFs::cut`] did with the dirty pages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutStats {
    /// Pages written to the backing files.
    pub kept: usize,
    /// Pages lost.
    pub dropped: usize,
    /// Every dirty page, in the order the cut decided them (by path, then offset).
    pub pages: Vec<CutPage>,
}

/// One dirty page at the cut, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutPage {
    /// The file's path relative to the backing directory (and the mountpoint).
    pub path: PathBuf,
    /// The page index: the page covers bytes `index * PAGE_SIZE ..` of the file.
    pub index: u64,
    /// Whether the page was written to the backing file.
    pub kept: bool,
}

impl CutStats {
    /// The dirty pages of `path` (relative to the mountpoint) as (index, kept).
    pub fn pages_of(&self, path: impl AsRef<Path>) -> Vec<(u64, bool)> {
        let path = path.as_ref();
        self.pages
            .iter()
            .filter(|page| page.path == path)
            .map(|page| (page.index, page.kept))
            .collect()
    }
}

impl LossyFs {
    /// Mounts a lossy view of `backing` on `mountpoint` (both existing directories).
    /// Panics with an explanation when it cannot (no `/dev/fuse`, not root, mount fails).
    pub fn mount(backing: &Path, mountpoint: &Path) -> LossyFs {
        LossyFs::try_mount(backing, mountpoint).unwrap_or_else(|e| {
            panic!(
                "cannot mount lossyfs of {} on {}: {e}",
                backing.display(),
                mountpoint.display()
            )
        })
    }

    /// Like [`LossyFs::mount`], with the error returned.
    pub fn try_mount(backing: &Path, mountpoint: &Path) -> io::Result<LossyFs> {
        if !Path::new("/dev/fuse").exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "/dev/fuse is missing: the power-loss tests need the FUSE device \
                 (`modprobe fuse`; in a container, pass --device /dev/fuse) and root",
            ));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the power-loss tests must run as root: lossyfs mounts with mount(2)",
            ));
        }
        let backing = backing.canonicalize()?;
        let mountpoint = mountpoint.canonicalize()?;
        let state = Arc::new(Mutex::new(State::new(&backing)?));
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("lossyfs".into())];
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(
            Fs {
                state: Arc::clone(&state),
            },
            &mountpoint,
            &config,
        )?;
        let fs = LossyFs {
            backing,
            mountpoint,
            state,
            session: Some(session),
        };
        let magic = statfs_type(&fs.mountpoint)?;
        if magic != FUSE_SUPER_MAGIC {
            return Err(io::Error::other(format!(
                "{} is not a FUSE mount after mounting (f_type {magic:#x})",
                fs.mountpoint.display()
            )));
        }
        Ok(fs)
    }

    /// The backing directory (canonical).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Where the filesystem is mounted (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Dirty pages in the overlay, over all files.
    pub fn dirty_pages(&self) -> usize {
        lock(&self.state)
            .nodes
            .values()
            .map(|node| node.pages.len())
            .sum()
    }

    /// The files that have dirty pages, by path relative to the mountpoint, with their
    /// count of dirty pages (unlinked files are left out).
    pub fn dirty_files(&self) -> BTreeMap<PathBuf, usize> {
        let state = lock(&self.state);
        state
            .nodes
            .iter()
            .filter(|(_, node)| !node.pages.is_empty())
            .filter_map(|(&ino, node)| Some((state.relative(ino)?, node.pages.len())))
            .collect()
    }

    /// Writes every dirty page to the backing files, as `sync(2)` would (a clean
    /// shutdown). Panics on an I/O error of the backing store.
    pub fn sync(&self) {
        let mut state = lock(&self.state);
        for node in state.nodes.values_mut() {
            node.persist(false)
                .unwrap_or_else(|e| panic!("lossyfs sync of {:?}: {e}", node.name));
        }
    }

    /// Whether [`LossyFs::cut`] happened.
    pub fn is_cut(&self) -> bool {
        lock(&self.state).cut
    }

    /// The power cut: from now on every request fails with EIO; each dirty page is kept
    /// or dropped with probability 1/2 by a PRNG seeded with `seed`. See the module
    /// docs. Kill and reap the processes that use the mount first (their exit writes
    /// back pages they dirtied through mappings), then cut, then [`LossyFs::remount`].
    /// Panics if the power was already cut or the backing store fails.
    pub fn cut(&self, seed: u64) -> CutStats {
        let mut state = lock(&self.state);
        assert!(!state.cut, "lossyfs: the power was already cut");
        state.cut = true;
        let mut dirty: Vec<(PathBuf, u64)> = state
            .nodes
            .iter()
            .filter(|(_, node)| !node.pages.is_empty() && node.linked)
            .filter_map(|(&ino, _)| Some((state.relative(ino)?, ino)))
            .collect();
        dirty.sort();
        let mut rng = XorShift::new(seed);
        let mut stats = CutStats::default();
        for (path, ino) in dirty {
            let node = state.nodes.get_mut(&ino).expect("dirty node");
            let size = node
                .size
                .expect("a node with dirty pages has a logical size");
            let file = node
                .file
                .as_ref()
                .expect("a node with dirty pages has its backing file open");
            for (&index, page) in &node.pages {
                let kept = rng.coin();
                if kept {
                    let start = index * PAGE_SIZE;
                    let len = PAGE_SIZE.min(size.saturating_sub(start)) as usize;
                    file.write_all_at(&page[..len], start).unwrap_or_else(|e| {
                        panic!("lossyfs cut: writing page {index} of {path:?}: {e}")
                    });
                    stats.kept += 1;
                } else {
                    stats.dropped += 1;
                }
                stats.pages.push(CutPage {
                    path: path.clone(),
                    index,
                    kept,
                });
            }
        }
        for node in state.nodes.values_mut() {
            node.pages.clear();
            node.size = None;
        }
        stats
    }

    /// Unmounts, then mounts a fresh filesystem (no overlay) on the same backing
    /// directory and mountpoint: the machine coming back after a cut.
    pub fn remount(&mut self) {
        self.unmount();
        let fresh = LossyFs::mount(&self.backing, &self.mountpoint);
        *self = fresh;
    }

    /// Unmounts (idempotent). Dirty pages that are still in the overlay are discarded:
    /// call [`LossyFs::sync`] first for a clean shutdown, or [`LossyFs::cut`] for a
    /// power failure. If the mount is busy (a descriptor or mapping is still open on
    /// it) for 2 s, the FUSE connection is aborted and the mount detached, so that a
    /// failing test leaves no mount behind.
    pub fn unmount(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let target =
            CString::new(self.mountpoint.as_os_str().as_bytes()).expect("mountpoint without NUL");
        let mut unmounted = false;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            // SAFETY: `target` is a valid NUL-terminated path.
            if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
                unmounted = true;
                break;
            }
            let busy = io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY);
            if !busy || Instant::now() >= deadline {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        if !unmounted {
            // MNT_FORCE aborts the FUSE connection (open descriptors then get ENOTCONN),
            // MNT_DETACH takes the mount out of the namespace even if still busy.
            // SAFETY: as above.
            unsafe {
                libc::umount2(target.as_ptr(), libc::MNT_FORCE);
                libc::umount2(target.as_ptr(), libc::MNT_DETACH);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !session.guard.is_finished() && Instant::now() < deadline {
            sleep(Duration::from_millis(10));
        }
        if session.guard.is_finished() {
            if let Err(e) = session.join() {
                eprintln!("lossyfs: the FUSE session ended with an error: {e}");
            }
        } else {
            eprintln!(
                "lossyfs: the FUSE session of {} did not end; leaving its thread",
                self.mountpoint.display()
            );
        }
    }
}

impl Drop for LossyFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

// ---------------------------------------------------------------- state

/// A file, directory or other inode of the mount, named by its parent and name.
struct Node {
    parent: u64,
    name: OsString,
    /// The backing inode: (st_dev, st_ino).
    key: (u64, u64),
    /// False once its last name is gone (unlinked, or replaced by a rename).
    linked: bool,
    /// The backing file, open while the node is open or has dirty pages.
    file: Option<File>,
    opens: u32,
    /// Dirty pages by index, each PAGE_SIZE bytes.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// The logical size while there are dirty pages (the backing file is never larger).
    size: Option<u64>,
}

impl Node {
    fn new(parent: u64, name: &OsStr, key: (u64, u64)) -> Node {
        Node {
            parent,
            name: name.to_owned(),
            key,
            linked: true,
            file: None,
            opens: 0,
            pages: BTreeMap::new(),
            size: None,
        }
    }

    /// Writes the dirty pages to the backing file and syncs it.
    fn persist(&mut self, datasync: bool) -> io::Result<()> {
        if self.pages.is_empty() {
            return Ok(());
        }
        let file = self
            .file
            .as_ref()
            .expect("dirty pages without a backing file");
        let size = self.size.expect("dirty pages without a logical size");
        for (&index, page) in &self.pages {
            let start = index * PAGE_SIZE;
            if start >= size {
                continue;
            }
            let len = PAGE_SIZE.min(size - start) as usize;
            file.write_all_at(&page[..len], start)?;
        }
        if file.metadata()?.len() < size {
            file.set_len(size)?;
        }
        if datasync {
            file.sync_data()?;
        } else {
            file.sync_all()?;
        }
        self.pages.clear();
        self.size = None;
        Ok(())
    }

    /// Forgets the overlay and closes the backing file unless it is open.
    fn release_if_idle(&mut self) {
        if !self.linked && self.opens == 0 {
            self.pages.clear();
            self.size = None;
        }
        if self.opens == 0 && self.pages.is_empty() {
            self.file = None;
        }
    }
}

enum Handle {
    File {
        ino: u64,
        sync: bool,
    },
    Dir {
        entries: Vec<(u64, FileType, OsString)>,
    },
}

struct State {
    root: PathBuf,
    cut: bool,
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

type R<T> = Result<T, Errno>;

fn key_of(md: &Metadata) -> (u64, u64) {
    (md.dev(), md.ino())
}

fn cstring(path: &Path) -> R<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

fn last_errno() -> Errno {
    Errno::from(io::Error::last_os_error())
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

fn kind(md: &Metadata) -> FileType {
    FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile)
}

/// Opens a backing file for reading and writing (read-only if that is refused).
fn open_backing(path: &Path) -> io::Result<File> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok(file),
        Err(_) => File::open(path),
    }
}

/// Reads at `offset` until `buf` is full or EOF; what is past EOF stays as it was.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl State {
    fn new(root: &Path) -> io::Result<State> {
        let md = fs::symlink_metadata(root)?;
        let key = key_of(&md);
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(ROOT, OsStr::new(""), key));
        Ok(State {
            root: root.to_owned(),
            cut: false,
            nodes,
            by_key: HashMap::from([(key, ROOT)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
        })
    }

    fn node(&self, ino: u64) -> R<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> R<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The backing path of a linked node.
    fn path(&self, ino: u64) -> R<PathBuf> {
        if ino == ROOT {
            return Ok(self.root.clone());
        }
        let node = self.node(ino)?;
        if !node.linked {
            return Err(Errno::ENOENT);
        }
        Ok(self.path(node.parent)?.join(&node.name))
    }

    fn child(&self, parent: u64, name: &OsStr) -> R<PathBuf> {
        Ok(self.path(parent)?.join(name))
    }

    /// The path of a linked node relative to the root.
    fn relative(&self, ino: u64) -> Option<PathBuf> {
        let path = self.path(ino).ok()?;
        path.strip_prefix(&self.root).ok().map(Path::to_owned)
    }

    /// The node of the backing inode `md` found at `parent`/`name`; a new one if unknown.
    fn register(&mut self, parent: u64, name: &OsStr, md: &Metadata) -> u64 {
        let key = key_of(md);
        if let Some(&ino) = self.by_key.get(&key) {
            if ino != ROOT {
                let node = self.nodes.get_mut(&ino).expect("indexed node");
                node.parent = parent;
                node.name = name.to_owned();
                node.linked = true;
            }
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, Node::new(parent, name, key));
        self.by_key.insert(key, ino);
        ino
    }

    /// The backing inode `key` lost its last name.
    fn detach(&mut self, key: (u64, u64)) {
        if let Some(ino) = self.by_key.remove(&key) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.linked = false;
                node.release_if_idle();
            }
        }
    }

    /// A name of the backing inode `md` was removed.
    fn unlinked(&mut self, md: &Metadata) {
        if md.is_dir() || md.nlink() <= 1 {
            self.detach(key_of(md));
        }
    }

    fn metadata(&self, ino: u64) -> R<Metadata> {
        let node = self.node(ino)?;
        if let Some(file) = &node.file {
            return Ok(file.metadata()?);
        }
        Ok(fs::symlink_metadata(self.path(ino)?)?)
    }

    fn attr(&self, ino: u64, md: &Metadata) -> FileAttr {
        let size = self
            .nodes
            .get(&ino)
            .and_then(|node| node.size)
            .unwrap_or(md.size());
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: md.blocks().max(size.div_ceil(512)),
            atime: time(md.atime(), md.atime_nsec()),
            mtime: time(md.mtime(), md.mtime_nsec()),
            ctime: time(md.ctime(), md.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind(md),
            perm: (md.mode() & 0o7777) as u16,
            nlink: md.nlink() as u32,
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev() as u32,
            blksize: PAGE_SIZE as u32,
            flags: 0,
        }
    }

    fn getattr(&self, ino: u64) -> R<FileAttr> {
        let md = self.metadata(ino)?;
        Ok(self.attr(ino, &md))
    }

    /// The entry for `parent`/`name`, which exists in the backing directory.
    fn entry(&mut self, parent: u64, name: &OsStr) -> R<FileAttr> {
        let md = fs::symlink_metadata(self.child(parent, name)?)?;
        let ino = self.register(parent, name, &md);
        Ok(self.attr(ino, &md))
    }

    /// Makes sure the node's backing file is open.
    fn ensure_file(&mut self, ino: u64) -> R<()> {
        if self.node(ino)?.file.is_none() {
            let file = open_backing(&self.path(ino)?)?;
            self.node_mut(ino)?.file = Some(file);
        }
        Ok(())
    }

    fn new_fh(&mut self, handle: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, handle);
        fh
    }

    fn read(&mut self, ino: u64, offset: u64, size: u32) -> R<Vec<u8>> {
        self.ensure_file(ino)?;
        let node = self.node(ino)?;
        let file = node.file.as_ref().expect("ensured");
        let logical = match node.size {
            Some(size) => size,
            None => file.metadata()?.len(),
        };
        if offset >= logical {
            return Ok(Vec::new());
        }
        let end = logical.min(offset + u64::from(size));
        let mut buf = vec![0u8; (end - offset) as usize];
        read_full_at(file, &mut buf, offset)?;
        let first = offset / PAGE_SIZE;
        let last = (end - 1) / PAGE_SIZE;
        for (&index, page) in node.pages.range(first..=last) {
            let page_start = index * PAGE_SIZE;
            let from = page_start.max(offset);
            let to = (page_start + PAGE_SIZE).min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&page[(from - page_start) as usize..(to - page_start) as usize]);
        }
        Ok(buf)
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> R<()> {
        self.ensure_file(ino)?;
        let node = self.node_mut(ino)?;
        let file = node.file.as_ref().expect("ensured");
        let logical = match node.size {
            Some(size) => size,
            None => file.metadata()?.len(),
        };
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE_SIZE;
            let page_start = index * PAGE_SIZE;
            let within = (pos - page_start) as usize;
            let n = (PAGE_SIZE - within as u64).min(end - pos) as usize;
            let page = match node.pages.entry(index) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(entry) => {
                    let mut page = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
                    if page_start < logical {
                        let valid = PAGE_SIZE.min(logical - page_start) as usize;
                        read_full_at(file, &mut page[..valid], page_start)?;
                    }
                    entry.insert(page)
                }
            };
            let from = (pos - offset) as usize;
            page[within..within + n].copy_from_slice(&data[from..from + n]);
            pos += n as u64;
        }
        node.size = Some(logical.max(end));
        Ok(())
    }

    /// Truncates (or extends) the file, durably; drops the overlay beyond `size`.
    fn truncate(&mut self, ino: u64, size: u64) -> R<()> {
        let node = self.node(ino)?;
        match &node.file {
            Some(file) => file.set_len(size)?,
            None => OpenOptions::new()
                .write(true)
                .open(self.path(ino)?)?
                .set_len(size)?,
        }
        let node = self.node_mut(ino)?;
        if node.size.is_some() {
            node.pages.split_off(&size.div_ceil(PAGE_SIZE));
            // The page holding the new end (if it is not whole) reads as zeros past it.
            if let Some(page) = node.pages.get_mut(&(size / PAGE_SIZE)) {
                page[(size % PAGE_SIZE) as usize..].fill(0);
            }
            node.size = if node.pages.is_empty() {
                None
            } else {
                Some(size)
            };
        }
        Ok(())
    }

    /// Sets the exact permission bits of a path just created (the process umask of this
    /// server would otherwise apply on top of the caller's).
    fn chmod_path(path: &Path, mode: u32) -> R<()> {
        let c = cstring(path)?;
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::chmod(c.as_ptr(), (mode & 0o7777) as libc::mode_t) } != 0 {
            return Err(last_errno());
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> R<FileAttr> {
        if let Some(mode) = mode {
            let perms = Permissions::from_mode(mode & 0o7777);
            match &self.node(ino)?.file {
                Some(file) => file.set_permissions(perms)?,
                None => fs::set_permissions(self.path(ino)?, perms)?,
            }
        }
        if uid.is_some() || gid.is_some() {
            match &self.node(ino)?.file {
                Some(file) => std::os::unix::fs::fchown(file, uid, gid)?,
                None => std::os::unix::fs::lchown(self.path(ino)?, uid, gid)?,
            }
        }
        if let Some(size) = size {
            self.truncate(ino, size)?;
        }
        if atime.is_some() || mtime.is_some() {
            let spec = |t: Option<TimeOrNow>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                    libc::timespec {
                        tv_sec: d.as_secs() as libc::time_t,
                        tv_nsec: d.subsec_nanos() as libc::c_long,
                    }
                }
            };
            let times = [spec(atime), spec(mtime)];
            let path = cstring(&self.path(ino)?)?;
            // SAFETY: `path` is NUL-terminated and `times` holds two timespecs.
            let rc = unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if rc != 0 {
                return Err(last_errno());
            }
        }
        self.getattr(ino)
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> R<()> {
        let from = self.child(parent, name)?;
        let to = self.child(newparent, newname)?;
        let source = fs::symlink_metadata(&from)?;
        let target = fs::symlink_metadata(&to).ok();
        if flags == 0 {
            fs::rename(&from, &to)?;
        } else {
            let (cfrom, cto) = (cstring(&from)?, cstring(&to)?);
            // SAFETY: both paths are valid NUL-terminated strings.
            let rc = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    cfrom.as_ptr(),
                    libc::AT_FDCWD,
                    cto.as_ptr(),
                    flags,
                )
            };
            if rc != 0 {
                return Err(last_errno());
            }
        }
        let source_key = key_of(&source);
        if let Some(target) = target {
            let target_key = key_of(&target);
            if target_key != source_key {
                if flags & libc::RENAME_EXCHANGE != 0 {
                    if let Some(&ino) = self.by_key.get(&target_key) {
                        let node = self.node_mut(ino)?;
                        node.parent = parent;
                        node.name = name.to_owned();
                    }
                } else {
                    self.unlinked(&target);
                }
            }
        }
        if let Some(&ino) = self.by_key.get(&source_key) {
            if ino != ROOT {
                let node = self.node_mut(ino)?;
                node.parent = newparent;
                node.name = newname.to_owned();
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> R<(FileAttr, u64)> {
        let path = self.child(parent, name)?;
        let existed = fs::symlink_metadata(&path).is_ok();
        let mode = mode & !umask & 0o7777;
        let mut options = OpenOptions::new();
        options.read(true).write(true).mode(mode);
        if flags & libc::O_EXCL != 0 {
            options.create_new(true);
        } else {
            options.create(true);
        }
        let file = options.open(&path)?;
        if !existed {
            file.set_permissions(Permissions::from_mode(mode))?;
        }
        let md = file.metadata()?;
        let ino = self.register(parent, name, &md);
        if existed && flags & libc::O_TRUNC != 0 {
            self.truncate(ino, 0)?;
        }
        let node = self.node_mut(ino)?;
        if node.file.is_none() {
            node.file = Some(file);
        }
        node.opens += 1;
        let sync = flags & libc::O_DSYNC != 0;
        let fh = self.new_fh(Handle::File { ino, sync });
        let attr = self.getattr(ino)?;
        Ok((attr, fh))
    }

    fn opendir(&mut self, ino: u64) -> R<u64> {
        let dir = self.path(ino)?;
        let parent = if ino == ROOT {
            ROOT
        } else {
            self.node(ino)?.parent
        };
        let mut entries = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ];
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Ok(md) = entry.metadata() else {
                continue; // removed meanwhile
            };
            let child = self.register(ino, &name, &md);
            entries.push((child, kind(&md), name));
        }
        Ok(self.new_fh(Handle::Dir { entries }))
    }
}

/// A small xorshift64 generator: the coin of the cut.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed, so that nearby seeds start far apart (and never at 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        XorShift(if z == 0 { 0x2545_f491_4f6c_dd1d } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// True with probability 1/2 (the top bit, the best of xorshift's).
    fn coin(&mut self) -> bool {
        self.next() >> 63 == 1
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn statfs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: zeroed statfs is a valid out-buffer; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

// ---------------------------------------------------------------- FUSE operations

struct Fs {
    state: Arc<Mutex<State>>,
}

impl Fs {
    /// Runs `f` on the state, unless the power was cut (then EIO).
    fn with<T>(&self, f: impl FnOnce(&mut State) -> R<T>) -> R<T> {
        let mut state = lock(&self.state);
        if state.cut {
            return Err(Errno::EIO);
        }
        f(&mut state)
    }
}

fn reply_empty(reply: ReplyEmpty, result: R<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_entry(reply: ReplyEntry, result: R<FileAttr>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(reply: ReplyAttr, result: R<FileAttr>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

fn reply_open(reply: ReplyOpen, result: R<u64>) {
    match result {
        // Keep the page cache across opens: every change to the files goes through this
        // kernel, so it never holds stale pages, and shared mappings stay coherent.
        Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.with(|s| s.entry(parent.0, name)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.with(|s| s.getattr(ino.0)));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply_attr(
            reply,
            self.with(|s| s.setattr(ino.0, mode, uid, gid, size, atime, mtime)),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.with(|s| Ok(fs::read_link(s.path(ino.0)?)?)) {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.with(|s| {
                let path = s.child(parent.0, name)?;
                let c = cstring(&path)?;
                let mode = mode & !umask;
                // SAFETY: `c` is a valid NUL-terminated path.
                if unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, libc::dev_t::from(rdev)) }
                    != 0
                {
                    return Err(last_errno());
                }
                State::chmod_path(&path, mode)?;
                s.entry(parent.0, name)
            }),
        );
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.with(|s| {
                let path = s.child(parent.0, name)?;
                fs::create_dir(&path)?;
                State::chmod_path(&path, mode & !umask)?;
                s.entry(parent.0, name)
            }),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.with(|s| {
                let path = s.child(parent.0, name)?;
                let md = fs::symlink_metadata(&path)?;
                fs::remove_file(&path)?;
                s.unlinked(&md);
                Ok(())
            }),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.with(|s| {
                let path = s.child(parent.0, name)?;
                let md = fs::symlink_metadata(&path)?;
                fs::remove_dir(&path)?;
                s.unlinked(&md);
                Ok(())
            }),
        );
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.with(|s| {
                std::os::unix::fs::symlink(target, s.child(parent.0, link_name)?)?;
                s.entry(parent.0, link_name)
            }),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.with(|s| s.rename(parent.0, name, newparent.0, newname, flags.bits())),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.with(|s| {
                fs::hard_link(s.path(ino.0)?, s.child(newparent.0, newname)?)?;
                s.entry(newparent.0, newname)
            }),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        reply_open(
            reply,
            self.with(|s| {
                s.ensure_file(ino.0)?;
                s.node_mut(ino.0)?.opens += 1;
                let sync = flags.0 & libc::O_DSYNC != 0;
                Ok(s.new_fh(Handle::File { ino: ino.0, sync }))
            }),
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.with(|s| s.read(ino.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.with(|s| {
            s.write(ino.0, offset, data)?;
            let sync = flags.0 & libc::O_DSYNC != 0
                || matches!(s.handles.get(&fh.0), Some(Handle::File { sync: true, .. }));
            if sync {
                s.node_mut(ino.0)?.persist(true)?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() persists nothing.
        reply_empty(reply, self.with(|_| Ok(())));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.with(|s| {
                if let Some(Handle::File { ino, .. }) = s.handles.remove(&fh.0) {
                    if let Some(node) = s.nodes.get_mut(&ino) {
                        node.opens = node.opens.saturating_sub(1);
                        node.release_if_idle();
                    }
                }
                Ok(())
            }),
        );
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.with(|s| Ok(s.node_mut(ino.0)?.persist(datasync)?)),
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply_open(reply, self.with(|s| s.opendir(ino.0)));
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let result = self.with(|s| {
            let Some(Handle::Dir { entries }) = s.handles.get(&fh.0) else {
                return Err(Errno::EBADF);
            };
            for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                    break;
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.with(|s| {
                s.handles.remove(&fh.0);
                Ok(())
            }),
        );
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory operations are durable at once: nothing is left to sync.
        reply_empty(reply, self.with(|_| Ok(())));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let result = self.with(|s| {
            let c = cstring(&s.root)?;
            // SAFETY: zeroed statvfs is a valid out-buffer; `c` is NUL-terminated.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
                return Err(last_errno());
            }
            Ok(st)
        });
        match result {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.with(|s| {
                let c = cstring(&s.path(ino.0)?)?;
                // SAFETY: `c` is a valid NUL-terminated path.
                if unsafe { libc::access(c.as_ptr(), mask.bits()) } != 0 {
                    return Err(last_errno());
                }
                Ok(())
            }),
        );
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.with(|s| s.create(parent.0, name, mode, umask, flags)) {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(e),
        }
    }
}
