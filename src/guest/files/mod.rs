//! Read-only file access to a guest's filesystems: list a directory, stat, read a link,
//! read a file, over a [`Volume`] (a partition or a logical volume of any image).
//!
//! Everything here reads; nothing writes. Paths are the guest's: absolute, resolved inside
//! the one filesystem they are given to (symlinks included), never on the host. Every
//! walk is bounded: a directory yields at most [`MAX_DIR_ENTRIES`] entries, a file read
//! stops at the caller's limit, symlink chains and path lengths are capped by the reader.

pub mod ext4;
pub mod fat;
pub mod ntfs;
mod volume;
pub mod xfs;

pub use volume::Volume;

use std::io::Write;

use serde::Serialize;

use crate::error::{Error, Result};

/// The most entries one directory may list: a hostile directory claiming more is an
/// error, not an allocation.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;

/// What an inode is.
/// Closed: the seven POSIX file types, which every filesystem read here maps onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

impl FileKind {
    /// The letter `ls -l` prints for it.
    pub fn letter(self) -> char {
        match self {
            FileKind::File => '-',
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::CharDevice => 'c',
            FileKind::BlockDevice => 'b',
            FileKind::Fifo => 'p',
            FileKind::Socket => 's',
        }
    }
}

/// What `stat` tells about one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Meta {
    /// Its type.
    pub kind: FileKind,
    /// Size in bytes (a symlink: the length of its target).
    pub size: u64,
    /// Permission bits with setuid, setgid and sticky (the low 12 bits of `st_mode`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last modification, seconds since the epoch.
    pub mtime: i64,
}

/// One name in a directory (never `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The name; bytes that are not UTF-8 are shown as U+FFFD.
    pub name: String,
    /// True when the name was not UTF-8: such an entry cannot be addressed by its
    /// printed name, and copy-out skips it with a finding.
    pub lossy: bool,
    /// Its metadata (of the link itself for a symlink).
    pub meta: Meta,
}

/// A filesystem opened read-only.
pub trait FileSystem {
    /// "ext2", "ext3", "ext4", ...
    fn fs_type(&self) -> &str;
    /// The volume label, if set.
    fn label(&self) -> Option<String>;
    /// The filesystem UUID as blkid prints it, if it has one.
    fn uuid(&self) -> Option<String>;
    /// (size, used) in bytes, from the filesystem's own counters.
    fn usage(&self) -> Option<(u64, u64)>;
    /// Metadata of `path`, following symlinks.
    fn metadata(&self, path: &str) -> Result<Meta>;
    /// Metadata of `path` itself (a final symlink not followed).
    fn symlink_metadata(&self, path: &str) -> Result<Meta>;
    /// The entries of directory `path`, sorted by name.
    fn read_dir(&self, path: &str) -> Result<Vec<Entry>>;
    /// The target of symlink `path`.
    fn read_link(&self, path: &str) -> Result<String>;
    /// Write the contents of file `path` (symlinks followed) to `out`; an error before
    /// writing more than `limit` bytes. Returns the bytes written.
    fn copy_to(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64>;

    /// The first `n` bytes of file `path` (fewer when it is shorter).
    fn read_prefix(&self, path: &str, n: usize) -> Result<Vec<u8>>;
    /// Whether `path` exists (symlinks followed); an error only when the filesystem
    /// cannot be read.
    fn exists(&self, path: &str) -> Result<bool>;

    /// The contents of file `path`, when it is at most `limit` bytes.
    fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.copy_to(path, &mut v, limit)?;
        Ok(v)
    }
}

/// Open the filesystem on `vol`, trying each reader in turn. `Ok(None)` when none
/// recognises it; an error when one recognises it but cannot read it.
pub fn open(vol: &Volume) -> Result<Option<Box<dyn FileSystem>>> {
    if let Some(fs) = ext4::open(vol)? {
        return Ok(Some(Box::new(fs)));
    }
    if let Some(fs) = fat::open(vol)? {
        return Ok(Some(Box::new(fs)));
    }
    if let Some(fs) = ntfs::open(vol)? {
        return Ok(Some(Box::new(fs)));
    }
    if let Some(fs) = xfs::open(vol)? {
        return Ok(Some(Box::new(fs)));
    }
    Ok(None)
}

/// Check that `path` is one the readers take: absolute, no NUL, at most 4096 bytes.
pub fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::arg(format!(
            "guest path {path:?} is not absolute (it must start with /)"
        )));
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err(Error::arg(format!(
            "guest path {:?} is longer than 4096 bytes or holds a NUL",
            path.chars().take(64).collect::<String>()
        )));
    }
    Ok(())
}

/// A `Write` that refuses to go past `limit` bytes, so a file claiming a huge size costs
/// an error, not memory or disk.
pub struct Limited<'a> {
    /// Where the bytes go.
    pub out: &'a mut dyn Write,
    /// The most that may be written.
    pub limit: u64,
    /// Written so far.
    pub written: u64,
    /// The guest path, for the error.
    pub what: &'a str,
}

impl Limited<'_> {
    /// Write `buf`, or fail naming the limit.
    pub fn put(&mut self, buf: &[u8]) -> Result<()> {
        let n = buf.len() as u64;
        if self.written.saturating_add(n) > self.limit {
            return Err(Error::limit(format!(
                "{} is larger than the {} bytes read at most",
                self.what, self.limit
            )));
        }
        self.out
            .write_all(buf)
            .map_err(|e| Error::io(format!("writing {}", self.what), e))?;
        self.written += n;
        Ok(())
    }
}
