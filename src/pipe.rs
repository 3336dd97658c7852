//! A raw image read from a pipe (`rbd export POOL/IMG - | diskconv convert -f raw - ...`):
//! a [`BlockDevice`] over a [`Read`] that is consumed once, front to back.
//!
//! The engine reads each data unit exactly once, in ascending order, with a fixed number of
//! units in flight (see [`mod@crate::convert`]); workers finish out of order, so the device
//! keeps the bytes read from the pipe but not yet asked for in a window, dropping its front
//! as soon as every byte of it was handed out. The window is then at most the units in
//! flight (a few MiB); [`PipeSource::MAX_WINDOW`] caps it so a caller reading far ahead gets
//! an error rather than unbounded memory. Nothing is ever guessed: the stream must be
//! exactly the size given, and a second pass (a layout planned from the source first, a
//! `--target-size` check of the tail) fails with an error saying a pipe is read only once.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use crate::device::{check_guest_range, map_end, BlockDevice, ImageInfo, Mapping, MappingKind};
use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;

/// Bytes read from the pipe per `read(2)`-sized step.
const STEP: usize = 1 << 20;

/// A raw image of a known `size` arriving on a pipe, read once in order.
///
/// [`map`](BlockDevice::map) reports everything as data (a stream has no holes to ask
/// about); the engine's zero detection (`-S`) still leaves all-zero blocks unallocated in
/// the output. A stream shorter or longer than `size` fails the read that finds it out
/// (the longer case when the last byte is read), so a conversion never finishes on a
/// truncated or oversized input.
pub struct PipeSource {
    size: u64,
    name: String,
    state: Mutex<State>,
}

struct State {
    reader: Box<dyn Read + Send>,
    /// Guest offset of `window[0]`.
    base: u64,
    /// Bytes read from the pipe and not yet dropped: guest offsets `base..base+len`.
    window: VecDeque<u8>,
    /// Ranges above `base` already handed out (start -> end), merged when they touch.
    taken: BTreeMap<u64, u64>,
    /// The first error the stream gave: every later read fails with it too.
    failed: Option<(ErrorKind, String)>,
}

impl std::fmt::Debug for PipeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipeSource")
            .field("size", &self.size)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PipeSource {
    /// The most bytes kept between the lowest range not yet read and the pipe's position.
    pub const MAX_WINDOW: u64 = 256 << 20;

    /// A raw image of exactly `size` bytes read from `reader`; `name` is what errors call
    /// it (`-` for standard input).
    pub fn new(reader: impl Read + Send + 'static, size: u64, name: impl Into<String>) -> Self {
        PipeSource {
            size,
            name: name.into(),
            state: Mutex::new(State {
                reader: Box::new(reader),
                base: 0,
                window: VecDeque::new(),
                taken: BTreeMap::new(),
                failed: None,
            }),
        }
    }

    fn fail(&self, st: &mut State, kind: ErrorKind, msg: String) -> Error {
        st.failed = Some((kind, msg.clone()));
        Error::new(kind, msg).with_path(&self.name)
    }

    /// Read from the pipe until the window reaches guest offset `end`.
    fn fill_to(&self, st: &mut State, end: u64) -> Result<()> {
        let mut chunk = vec![0u8; STEP];
        while st.base + (st.window.len() as u64) < end {
            let have = st.base + st.window.len() as u64;
            let n = (end - have).min(STEP as u64) as usize;
            let got = loop {
                match st.reader.read(&mut chunk[..n]) {
                    Ok(g) => break g,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let msg = format!("reading the raw stream failed at byte {have}: {e}");
                        return Err(self.fail(st, ErrorKind::Io, msg));
                    }
                }
            };
            if got == 0 {
                let msg = format!(
                    "the raw stream ended after {have} bytes, but its size was given as {} \
                     bytes; nothing was written",
                    self.size
                );
                return Err(self.fail(st, ErrorKind::Io, msg));
            }
            st.window.extend(&chunk[..got]);
        }
        if end == self.size {
            // The last byte is in: the stream must end here, or the size given was wrong.
            let mut one = [0u8; 1];
            let extra = loop {
                match st.reader.read(&mut one) {
                    Ok(g) => break g,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let msg =
                            format!("reading the raw stream failed at byte {}: {e}", self.size);
                        return Err(self.fail(st, ErrorKind::Io, msg));
                    }
                }
            };
            if extra != 0 {
                let msg = format!(
                    "the raw stream is longer than the {} bytes its size was given as; \
                     nothing was written",
                    self.size
                );
                return Err(self.fail(st, ErrorKind::InvalidArgument, msg));
            }
        }
        Ok(())
    }

    /// Record `[start, end)` as handed out and drop the window's front that is all taken.
    fn take(st: &mut State, start: u64, end: u64) {
        let mut start = start;
        let mut end = end;
        // Merge with a range ending where this one starts, and one starting where it ends.
        if let Some((&s, &e)) = st.taken.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                st.taken.remove(&s);
            }
        }
        while let Some((&s, &e)) = st.taken.range(start..=end).next() {
            end = end.max(e);
            st.taken.remove(&s);
        }
        if start <= st.base {
            let drop = (end - st.base) as usize;
            st.window.drain(..drop.min(st.window.len()));
            st.base = end;
        } else {
            st.taken.insert(start, end);
        }
    }
}

impl BlockDevice for PipeSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = map_end(self.size, offset, max_len)?;
        Ok(Mapping {
            offset,
            len: end - offset,
            kind: MappingKind::Data { host: None },
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((kind, msg)) = &st.failed {
            return Err(Error::new(*kind, msg.clone()).with_path(&self.name));
        }
        if offset < st.base {
            return Err(Error::unsupported(format!(
                "a pipe is read once, front to back: bytes at offset {offset:#x} were asked \
                 for again after the stream had passed them (an output laid out from a first \
                 pass over the source, such as qcow2, vhd, vdi or vmdk written to a pipe, or \
                 a --target-size below the source's size, needs the source in a file)"
            ))
            .with_path(&self.name));
        }
        if end - st.base > Self::MAX_WINDOW {
            return Err(Error::limit(format!(
                "reading {} bytes at offset {offset:#x} of the raw stream would keep more \
                 than {} bytes read ahead in memory",
                buf.len(),
                Self::MAX_WINDOW
            ))
            .with_path(&self.name));
        }
        self.fill_to(&mut st, end)?;
        let from = (offset - st.base) as usize;
        let (a, b) = st.window.as_slices();
        let mut done = 0usize;
        let mut at = from;
        for part in [a, b] {
            if at >= part.len() {
                at -= part.len();
                continue;
            }
            let n = (part.len() - at).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&part[at..at + n]);
            done += n;
            at = 0;
            if done == buf.len() {
                break;
            }
        }
        Self::take(&mut st, offset, end);
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "raw".into(),
            virtual_size: self.size,
            ..Default::default()
        }
    }

    fn format(&self) -> Format {
        Format::Raw
    }
}

/// Block size of [`spool`]: an all-zero block of this size is skipped, not written.
pub const SPOOL_BLOCK: usize = 64 << 10;

/// Copy `reader` to its end into an anonymous temporary file in `dir` and return that
/// file, its length the stream's exact length (`name` is what errors call the stream).
///
/// This is how a raw stream of unknown length (`rbd export POOL/IMG -`) becomes a source
/// read at random offsets: memory stays one [`SPOOL_BLOCK`], while the disk holds the
/// stream's data. All-zero blocks are seeked over rather than written, so the file is
/// sparse and a mostly empty image needs little space. The file is made with `O_TMPFILE`,
/// which has no name at all, so nothing is left behind on any exit, `SIGKILL` included;
/// a filesystem without `O_TMPFILE` gets a file with a random name unlinked at once (a
/// kill in between those two calls is the only way it could stay). A write that fails (a
/// full disk) is an error naming `dir` and the bytes spooled so far.
pub fn spool(reader: impl Read, dir: &Path, name: &str) -> Result<File> {
    use std::os::unix::fs::FileExt;
    let mut reader = reader;
    let file = anonymous_file(dir)?;
    let mut buf = vec![0u8; SPOOL_BLOCK];
    let mut len = 0u64;
    loop {
        // A pipe hands out what it has; fill the whole block so zero runs stay aligned.
        let mut got = 0;
        while got < buf.len() {
            match reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let at = len + got as u64;
                    return Err(Error::io(
                        format!("reading the raw stream failed at byte {at}; nothing was written"),
                        e,
                    )
                    .with_path(name));
                }
            }
        }
        if got == 0 {
            break;
        }
        if buf[..got].iter().any(|&b| b != 0) {
            file.write_all_at(&buf[..got], len)
                .map_err(|e| spool_error(dir, len, e))?;
        }
        len += got as u64;
    }
    // A trailing zero run was seeked over: the length makes it part of the file.
    file.set_len(len).map_err(|e| spool_error(dir, len, e))?;
    Ok(file)
}

fn spool_error(dir: &Path, done: u64, e: std::io::Error) -> Error {
    Error::io(
        format!(
            "spooling standard input to a temporary file in {} failed after {done} bytes \
             (the spool needs as much free space as the stream has data: point TMPDIR at a \
             larger filesystem, or give --size to convert without one); nothing was written",
            dir.display()
        ),
        e,
    )
}

/// A read-write file in `dir` that no name refers to.
pub(crate) fn anonymous_file(dir: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match opened {
        Ok(f) => return Ok(f),
        // Kernels and filesystems without O_TMPFILE answer one of these.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) => {}
        Err(e) => {
            return Err(
                Error::io("cannot make a temporary file for standard input", e).with_path(dir),
            )
        }
    }
    for attempt in 0u32.. {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = dir.join(format!(
            ".diskconv-stdin-{}-{nanos:x}-{attempt}",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(f) => {
                std::fs::remove_file(&p).map_err(|e| {
                    Error::io("cannot unlink the temporary file for standard input", e)
                        .with_path(&p)
                })?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {}
            Err(e) => {
                return Err(
                    Error::io("cannot make a temporary file for standard input", e).with_path(dir),
                )
            }
        }
    }
    unreachable!("the loop returns within 100 attempts")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn out_of_order_units_inside_the_window_read_right_and_the_window_drains() {
        let d = data(5 * 4096 + 100);
        let src = PipeSource::new(std::io::Cursor::new(d.clone()), d.len() as u64, "-");
        let mut b = vec![0u8; 4096];
        // Unit 2 before 0 and 1, as a faster worker would ask.
        src.read_at(&mut b, 2 * 4096).unwrap();
        assert_eq!(b, d[2 * 4096..3 * 4096]);
        src.read_at(&mut b, 0).unwrap();
        assert_eq!(b, d[..4096]);
        assert_eq!(src.state.lock().unwrap().base, 4096);
        src.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, d[4096..2 * 4096]);
        // Units 0..3 all taken: the window's front is gone.
        let st = src.state.lock().unwrap();
        assert_eq!((st.base, st.window.len()), (3 * 4096, 0));
        drop(st);
        let mut tail = vec![0u8; 2 * 4096 + 100];
        src.read_at(&mut tail, 3 * 4096).unwrap();
        assert_eq!(tail, d[3 * 4096..]);
        let e = src.read_at(&mut b, 0).unwrap_err();
        assert!(e.to_string().contains("read once"), "{e}");
    }

    #[test]
    fn a_short_or_long_stream_fails_and_names_the_byte_counts() {
        let d = data(10_000);
        let short = PipeSource::new(std::io::Cursor::new(d.clone()), 20_000, "-");
        let mut b = vec![0u8; 20_000];
        let e = short.read_at(&mut b, 0).unwrap_err();
        assert!(e.to_string().contains("ended after 10000 bytes"), "{e}");
        assert!(e.to_string().contains("20000"), "{e}");
        // Every later read fails the same way.
        assert!(short.read_at(&mut b[..10], 0).is_err());
        let long = PipeSource::new(std::io::Cursor::new(d), 9_999, "-");
        let mut b = vec![0u8; 9_999];
        let e = long.read_at(&mut b, 0).unwrap_err();
        assert!(e.to_string().contains("longer than the 9999 bytes"), "{e}");
    }

    #[test]
    fn a_spool_has_the_exact_length_and_the_bytes_and_skips_zero_blocks() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        // 4 MiB of zeros between two data blocks, and an odd-sized zero tail.
        let mut d = data(SPOOL_BLOCK);
        d.resize(SPOOL_BLOCK + (4 << 20), 0);
        d.extend(data(SPOOL_BLOCK + 123));
        d.resize(d.len() + 3 * SPOOL_BLOCK + 7, 0);
        let f = spool(std::io::Cursor::new(d.clone()), dir.path(), "-").unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(meta.len(), d.len() as u64);
        let mut back = vec![0u8; d.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back == d);
        // Only the data blocks (and at most a filesystem block around them) hold space.
        assert!(
            meta.blocks() * 512 < 4 * SPOOL_BLOCK as u64,
            "{}",
            meta.blocks()
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let empty = spool(std::io::empty(), dir.path(), "-").unwrap();
        assert_eq!(empty.metadata().unwrap().len(), 0);
    }

    #[test]
    fn reading_far_ahead_is_refused_before_anything_is_buffered() {
        let src = PipeSource::new(std::io::repeat(1), 1 << 40, "-");
        let mut b = vec![0u8; 4096];
        let e = src.read_at(&mut b, PipeSource::MAX_WINDOW).unwrap_err();
        assert!(e.to_string().contains("read ahead"), "{e}");
        assert_eq!(src.state.lock().unwrap().window.len(), 0);
    }
}
