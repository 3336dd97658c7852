//! [`Output`]: what a destination is (a new or replaced file, an existing file under `-n`,
//! a block device, a FIFO or character device, a file behind a descriptor, a symlink to
//! any of them), opened and checked before anything is read, and finished after the
//! writer: renamed into place, unwritten ranges zeroed, a stream padded, digests taken.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::atomic::{parent_dir, AtomicOutput};
use super::digest::{DigestAlgo, Digester};
use super::sink::{Follow, Sink, StreamOut, Track};
use super::zeros::{write_zeros, write_zeros_at, ZEROS};
use crate::error::{Error, Result};

/// What [`Output::finish`] knows of the finished output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    /// Bytes of output: those sent on a stream, the file's length, the image's extent
    /// written in place.
    pub len: u64,
    /// The digests asked with [`Output::request_digests`], lowercase hex.
    pub digests: Vec<(DigestAlgo, String)>,
}

/// What kind of destination an [`Output`] writes.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A new file, created under a temporary name and renamed into place.
    New,
    /// An existing regular file, replaced atomically (a new inode with the old file's
    /// mode, owner and group).
    Replace,
    /// An existing regular file written in place (`-n`).
    ExistingFile,
    /// A block device, written in place.
    BlockDevice,
    /// A FIFO or character device (`/dev/stdout`), written sequentially.
    Stream,
    /// A regular file named through an open descriptor (`/dev/stdout` redirected to a
    /// file, `/proc/self/fd/N`): truncated and written in place, since a rename would
    /// not reach the descriptor's file.
    Descriptor,
}

/// How to open a destination.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputOptions {
    /// Write into the existing destination instead of creating it (qemu-img's `-n`):
    /// it must exist, and a regular file is written in place, not replaced.
    pub existing: bool,
    /// The destination already reads as zeros (qemu-img's `--target-is-zero`, only with
    /// `existing`): ranges the writer leaves unwritten are not zeroed.
    pub target_is_zero: bool,
}

/// A destination opened for writing, checked before any input is read: a new or replaced
/// regular file goes through [`AtomicOutput`]; a block device, an existing file under
/// `-n`, a FIFO or a character device is written in place. Nothing but the destination's
/// own name is ever replaced: a symlink is followed and the file it points to is
/// replaced, the link stays.
#[derive(Debug)]
pub struct Output {
    dest: PathBuf,
    kind: OutputKind,
    atomic: Option<AtomicOutput>,
    /// A second handle on the in-place or stream destination, to finish it after the
    /// writer (which owns the [`Sink`]) is gone.
    file: Option<File>,
    track: Option<Arc<Mutex<Track>>>,
    zero_fill: bool,
    existing_len: Option<u64>,
    /// Digests to compute (see [`request_digests`](Self::request_digests)).
    digests: Vec<DigestAlgo>,
    /// A fresh file's on-the-way digests, shared with its sink.
    follow: Option<Arc<Mutex<Follow>>>,
}

fn io_err(what: &str, dest: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.to_string();
    let dest = dest.to_path_buf();
    move |e| Error::io(what, e).with_path(dest)
}

/// Size of an open block device (seeking to its end, which every block driver supports).
fn device_size(file: &File) -> std::io::Result<u64> {
    // SAFETY: lseek on a valid descriptor; positional I/O elsewhere ignores the position.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as u64)
}

impl Output {
    /// Check and open the destination `dest`, before anything is read: a folder, a
    /// missing or unwritable parent folder, a socket, or `-n` on a missing file fail at
    /// once, naming `dest`. Returns the output and the [`Sink`] to give the writer.
    pub fn open(dest: &Path, opts: &OutputOptions) -> Result<(Output, Sink)> {
        let meta = match std::fs::metadata(dest) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("cannot open the output", e).with_path(dest)),
        };
        let out = |kind, atomic, file, track, existing_len| Output {
            dest: dest.to_path_buf(),
            kind,
            atomic,
            file,
            track,
            zero_fill: !opts.target_is_zero,
            existing_len,
            digests: Vec::new(),
            follow: None,
        };
        let Some(meta) = meta else {
            if opts.existing {
                return Err(Error::arg(
                    "-n: the output does not exist (it must be created beforehand)",
                )
                .with_path(dest));
            }
            let target = resolve_missing(dest)?;
            let dir = parent_dir(&target);
            match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(
                        Error::arg(format!("{} is not a folder", dir.display())).with_path(dest)
                    )
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("cannot create the output in {}", dir.display()),
                        e,
                    )
                    .with_path(dest))
                }
            }
            let (a, f) = AtomicOutput::create_with_mode(&target, dest, 0o666)?;
            return Ok((out(OutputKind::New, Some(a), None, None, None), f.into()));
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(Error::arg("the output is a directory").with_path(dest));
        }
        if ft.is_socket() {
            return Err(Error::arg(
                "the output is a socket; write to a file, a block device, a FIFO or a character device",
            )
            .with_path(dest));
        }
        if ft.is_file() && !opts.existing && through_descriptor(dest) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(dest)
                .map_err(io_err("cannot open the output for writing", dest))?;
            let handle = file
                .try_clone()
                .map_err(io_err("cannot open the output for writing", dest))?;
            return Ok((
                out(OutputKind::Descriptor, None, Some(handle), None, None),
                file.into(),
            ));
        }
        if ft.is_file() && !opts.existing {
            let target = if std::fs::symlink_metadata(dest)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
            {
                dest.canonicalize()
                    .map_err(io_err("cannot resolve the output's symlink", dest))?
            } else {
                dest.to_path_buf()
            };
            let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
                .map_err(|_| Error::arg("output path contains a NUL byte").with_path(dest))?;
            // SAFETY: access with a valid NUL-terminated path.
            if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
                return Err(Error::io(
                    "the output exists and is not writable",
                    std::io::Error::last_os_error(),
                )
                .with_path(dest));
            }
            // 0600 until the old mode is copied, so a private file's new content is
            // never readable by others, not even briefly.
            let (a, f) = AtomicOutput::create_with_mode(&target, dest, 0o600)?;
            copy_owner_and_mode(&f, &meta).map_err(io_err(
                "cannot give the new output the old file's mode",
                dest,
            ))?;
            return Ok((
                out(OutputKind::Replace, Some(a), None, None, None),
                f.into(),
            ));
        }
        // In place: an existing file under -n, a block device, a FIFO or a character
        // device. Opening a FIFO waits for its reader, as any writer does.
        use std::os::unix::fs::OpenOptionsExt;
        let mut oo = std::fs::OpenOptions::new();
        oo.write(true).custom_flags(libc::O_NOCTTY);
        if ft.is_block_device() {
            // O_EXCL on a block device: refuse one that is mounted or otherwise held.
            oo.custom_flags(libc::O_NOCTTY | libc::O_EXCL);
        }
        let file = oo
            .open(dest)
            .map_err(io_err("cannot open the output for writing", dest))?;
        let now = file
            .metadata()
            .map_err(io_err("cannot stat the output", dest))?;
        if now.file_type() != ft || now.ino() != meta.ino() || now.dev() != meta.dev() {
            return Err(Error::arg("the output changed while it was being opened").with_path(dest));
        }
        let (kind, track, existing_len, file) = if ft.is_block_device() || ft.is_file() {
            let (kind, capacity, len) = if ft.is_block_device() {
                let size =
                    device_size(&file).map_err(io_err("cannot size the block device", dest))?;
                (OutputKind::BlockDevice, Some(size), size)
            } else {
                (OutputKind::ExistingFile, None, now.len())
            };
            let t = Track::InPlace {
                capacity,
                len: 0,
                written: BTreeMap::new(),
            };
            (kind, t, Some(len), Some(file))
        } else {
            let t = Track::Stream {
                pos: 0,
                len: 0,
                out: StreamOut {
                    w: Box::new(file),
                    digests: None,
                },
            };
            (OutputKind::Stream, t, None, None)
        };
        let track = Arc::new(Mutex::new(track));
        let handle = match &file {
            Some(f) => Some(
                f.try_clone()
                    .map_err(io_err("cannot open the output for writing", dest))?,
            ),
            None => None,
        };
        let sink = Sink {
            file,
            track: Some(track.clone()),
            follow: None,
            dirty: Default::default(),
        };
        Ok((out(kind, None, handle, Some(track), existing_len), sink))
    }

    /// A stream output over any [`Write`] (stdout, a socket, an HTTP body, a channel),
    /// named `name` in errors. Like a FIFO: forward positional writes become sequential
    /// ones, gaps and the tail are sent as zeros, a write behind what was sent is refused.
    pub fn from_writer(name: &Path, w: Box<dyn Write + Send>) -> (Output, Sink) {
        let track = Arc::new(Mutex::new(Track::Stream {
            pos: 0,
            len: 0,
            out: StreamOut { w, digests: None },
        }));
        let out = Output {
            dest: name.to_path_buf(),
            kind: OutputKind::Stream,
            atomic: None,
            file: None,
            track: Some(track.clone()),
            zero_fill: true,
            existing_len: None,
            digests: Vec::new(),
            follow: None,
        };
        let sink = Sink {
            file: None,
            track: Some(track),
            follow: None,
            dirty: Default::default(),
        };
        (out, sink)
    }

    /// Compute `algos` over the output's bytes, reported by [`finish`](Self::finish). Call
    /// before anything is written to `sink` (this output's). A stream hashes each byte as
    /// it is sent, and so does a new file while its writer writes in order (raw, vpc
    /// fixed, streamOptimized vmdk), on the thread that writes; a file written out of order
    /// (qcow2, dynamic vpc, vdi, monolithicSparse vmdk) or in place is read once when
    /// finished instead.
    pub fn request_digests(&mut self, algos: &[DigestAlgo], sink: &mut Sink) {
        self.digests = algos.to_vec();
        let fresh = (!algos.is_empty()).then(|| Digester::new(algos));
        if let Some(t) = &self.track {
            if let Track::Stream { out, .. } = &mut *t.lock().unwrap_or_else(|p| p.into_inner()) {
                out.digests = fresh;
            }
        } else if fresh.is_some() && sink.track.is_none() {
            let f = Arc::new(Mutex::new(Follow {
                pos: 0,
                digests: fresh,
            }));
            sink.follow = Some(f.clone());
            self.follow = Some(f);
        }
    }

    /// What kind of destination this is.
    pub fn kind(&self) -> OutputKind {
        self.kind
    }

    /// The destination's size when it is written in place (a block device's size, an
    /// existing file's length); None for new, replaced and stream outputs.
    pub fn existing_len(&self) -> Option<u64> {
        self.existing_len
    }

    /// The destination as given.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// Complete the output after the writer finished: rename a new or replaced file into
    /// place, zero what the writer left unwritten in place (unless the target is known to
    /// be zero), pad a stream to its final length. With `sync`, flush to stable storage
    /// first. Dropped without this, a new or replaced file leaves nothing behind. Returns
    /// the output's length and the digests asked for.
    pub fn finish(self, sync: bool) -> Result<Finished> {
        let followed = self.follow.as_ref().and_then(|f| {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            let pos = f.pos;
            f.digests.take().map(|d| (pos, d))
        });
        let hashed = |file: &File, len: u64| -> Result<Finished> {
            let digests = if self.digests.is_empty() {
                Vec::new()
            } else if let Some((pos, mut d)) = followed.filter(|(pos, _)| *pos <= len) {
                // The file's tail past the last write is a hole.
                let mut gap = len - pos;
                while gap > 0 {
                    let k = gap.min(ZEROS.len() as u64) as usize;
                    d.update(&ZEROS[..k]);
                    gap -= k as u64;
                }
                d.finish()
            } else {
                Digester::of_file(file, len, &self.digests)
                    .map_err(io_err(
                        "reading the finished output for its digests",
                        &self.dest,
                    ))?
                    .finish()
            };
            Ok(Finished { len, digests })
        };
        if let Some(a) = self.atomic {
            let f = File::open(a.temp_path())
                .map_err(io_err("cannot reopen the finished output", &self.dest))?;
            let len = f
                .metadata()
                .map_err(io_err("cannot stat the output", &self.dest))?
                .len();
            let done = hashed(&f, len)?;
            a.commit(sync)?;
            return Ok(done);
        }
        let Some(track) = &self.track else {
            // A file named through a descriptor: its write-only handle is reopened for
            // reading through the same name.
            let Some(file) = &self.file else {
                return Ok(Finished::default());
            };
            if sync {
                file.sync_all()
                    .map_err(io_err("flushing output", &self.dest))?;
            }
            let len = file
                .metadata()
                .map_err(io_err("cannot stat the output", &self.dest))?
                .len();
            if self.digests.is_empty() {
                return Ok(Finished {
                    len,
                    digests: Vec::new(),
                });
            }
            let f = File::open(&self.dest)
                .map_err(io_err("cannot reopen the finished output", &self.dest))?;
            return hashed(&f, len);
        };
        let mut t = track.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *t {
            Track::Stream { pos, len, out } => {
                write_zeros(&mut *out, *len - *pos)
                    .and_then(|()| out.flush())
                    .map_err(io_err("writing the output's last zeros", &self.dest))?;
                *pos = *len;
                Ok(Finished {
                    len: *len,
                    digests: out.digests.take().map(Digester::finish).unwrap_or_default(),
                })
            }
            Track::InPlace { len, written, .. } => {
                let Some(file) = &self.file else {
                    return Err(Error::arg("an in-place output has no file").with_path(&self.dest));
                };
                let bound = written.values().next_back().copied().unwrap_or(0).max(*len);
                if self.zero_fill {
                    let block = self.kind == OutputKind::BlockDevice;
                    let mut at = 0u64;
                    let mut gaps: Vec<(u64, u64)> = Vec::new();
                    for (&s, &e) in written.iter() {
                        if s > at {
                            gaps.push((at, s.min(bound)));
                        }
                        at = e;
                    }
                    if at < bound {
                        gaps.push((at, bound));
                    }
                    for (s, e) in gaps {
                        zero_range(file, block, s, e).map_err(io_err(
                            "zeroing unwritten ranges of the output",
                            &self.dest,
                        ))?;
                    }
                }
                if sync {
                    file.sync_all()
                        .map_err(io_err("flushing output", &self.dest))?;
                }
                if self.digests.is_empty() {
                    return Ok(Finished {
                        len: bound,
                        digests: Vec::new(),
                    });
                }
                let f = File::open(&self.dest)
                    .map_err(io_err("cannot reopen the finished output", &self.dest))?;
                hashed(&f, bound)
            }
        }
    }
}

/// Whether `dest` reaches its file through a descriptor link (`/dev/stdout`,
/// `/dev/fd/N`, `/proc/<pid>/fd/N`), whose target names are not real paths.
fn through_descriptor(dest: &Path) -> bool {
    let mut p = dest.to_path_buf();
    for _ in 0..40 {
        if p.starts_with("/proc") || p.starts_with("/dev/fd") {
            return true;
        }
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&p) {
                Ok(t) if t.is_absolute() => p = t,
                Ok(t) => p = parent_dir(&p).join(t),
                Err(_) => return false,
            },
            _ => return false,
        }
    }
    false
}

/// Follow a chain of symlinks ending at a name that does not exist yet (a dangling
/// link), so the new file is created where the link points and the link stays a link.
fn resolve_missing(dest: &Path) -> Result<PathBuf> {
    let mut p = dest.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let t = std::fs::read_link(&p)
                    .map_err(io_err("cannot read the output's symlink", dest))?;
                p = if t.is_absolute() {
                    t
                } else {
                    parent_dir(&p).join(t)
                };
            }
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(Error::io("cannot open the output", e).with_path(dest)),
        }
    }
    Err(Error::arg("too many levels of symbolic links").with_path(dest))
}

/// Give `file` the owner, group and permission bits of `old` (the file it replaces).
/// An owner we may not set (not root) is left as ours, and then set-id bits are dropped:
/// they must never pass to a file owned by someone else.
fn copy_owner_and_mode(file: &File, old: &std::fs::Metadata) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    let mut mode = old.mode() & 0o7777;
    // SAFETY: fchown on a valid descriptor.
    if unsafe { libc::fchown(fd, old.uid(), old.gid()) } != 0 {
        // SAFETY: as above; uid -1 leaves the owner unchanged.
        let _ = unsafe { libc::fchown(fd, u32::MAX, old.gid()) };
        mode &= 0o777;
    }
    // SAFETY: fchmod on a valid descriptor.
    if unsafe { libc::fchmod(fd, mode) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make `[start, end)` of an in-place destination read as zeros: BLKZEROOUT on a block
/// device, a punched hole in a file, plain zero writes where neither is supported.
fn zero_range(file: &File, block: bool, start: u64, end: u64) -> std::io::Result<()> {
    if start >= end {
        return Ok(());
    }
    let fd = file.as_raw_fd();
    if block {
        // The ioctl takes whole 512-byte sectors; unaligned edges are written.
        let a = start.next_multiple_of(512);
        let b = end / 512 * 512;
        if a < b {
            let range: [u64; 2] = [a, b - a];
            // SAFETY: BLKZEROOUT reads a [u64; 2] (start, length) from the pointer.
            let r = unsafe { libc::ioctl(fd, libc::_IO(0x12, 127), range.as_ptr()) };
            if r == 0 {
                write_zeros_at(file, start, a)?;
                return write_zeros_at(file, b, end);
            }
        }
    } else {
        let (Ok(s), Ok(l)) = (i64::try_from(start), i64::try_from(end - start)) else {
            return write_zeros_at(file, start, end);
        };
        // SAFETY: fallocate on a valid descriptor; KEEP_SIZE never changes the length.
        let r = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                s,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    write_zeros_at(file, start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_fills_gaps_pads_its_length_and_refuses_going_back() {
        use std::io::Read;
        use std::os::unix::io::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors, each then owned by one File.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (mut rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            rd.read_to_end(&mut v).unwrap();
            v
        });
        let path = PathBuf::from(format!("/proc/self/fd/{}", wr.as_raw_fd()));
        let (out, sink) = Output::open(&path, &OutputOptions::default()).unwrap();
        drop(wr);
        assert_eq!(out.kind(), OutputKind::Stream);
        sink.set_len(20).unwrap();
        sink.write_all_at(b"ab", 0).unwrap();
        sink.write_all_at(b"cd", 10).unwrap();
        let e = sink.write_all_at(b"x", 5).unwrap_err();
        assert!(e.to_string().contains("cannot be written to a pipe"), "{e}");
        assert!(sink.set_len(4).is_err());
        drop(sink);
        out.finish(true).unwrap();
        let got = reader.join().unwrap();
        let mut want = vec![0u8; 20];
        want[..2].copy_from_slice(b"ab");
        want[10..12].copy_from_slice(b"cd");
        assert_eq!(got, want);
    }

    #[test]
    fn in_place_file_zeroes_what_was_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, vec![0xaau8; 8192]).unwrap();
        let opts = OutputOptions {
            existing: true,
            target_is_zero: false,
        };
        let (out, sink) = Output::open(&p, &opts).unwrap();
        assert_eq!(out.kind(), OutputKind::ExistingFile);
        assert_eq!(out.existing_len(), Some(8192));
        sink.set_len(6000).unwrap();
        sink.write_all_at(&[1u8; 100], 1000).unwrap();
        drop(sink);
        out.finish(false).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 8192, "an existing file is never shrunk");
        assert!(b[..1000].iter().all(|&x| x == 0));
        assert!(b[1000..1100].iter().all(|&x| x == 1));
        assert!(b[1100..6000].iter().all(|&x| x == 0));
        assert!(
            b[6000..].iter().all(|&x| x == 0xaa),
            "past the image: untouched"
        );
    }
}
