//! [`Sink`]: the one file API a writer sees, whatever the destination (a fresh file, a file
//! or block device written in place, a stream), with digests followed on the way.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::digest::Digester;
use super::zeros::{write_zeros, ZEROS};
use crate::error::{Error, Result};

#[doc(hidden)] // a helper of the format writers and editors, not a stable API
/// Positional write of all of `data` at `offset`, with the error naming what was written.
pub fn write_all_at(file: &Sink, data: &[u8], offset: u64, what: &str) -> Result<()> {
    file.write_all_at(data, offset)
        .map_err(|e| Error::io(format!("writing {what}"), e).at(offset))
}

#[doc(hidden)] // a helper of the format writers, not a stable API
/// Make host range `[from, to)` of `file` read as zeros, for ranges a planned writer
/// laid out but the engine never wrote: nothing on a fresh file (the range stays a hole),
/// zeros written on a stream or in place, where the bytes must be sent or old data
/// overwritten. `what` names the range in errors.
pub fn zero_fill_at(file: &Sink, from: u64, to: u64, what: &str) -> Result<()> {
    if file.fresh_file().is_some() {
        return Ok(());
    }
    let mut at = from;
    while at < to {
        let k = (to - at).min(ZEROS.len() as u64) as usize;
        write_all_at(file, &ZEROS[..k], at, what)?;
        at += k as u64;
    }
    Ok(())
}

/// Where a writer's bytes go: a fresh file, an existing file or block device written in
/// place, or a stream (a FIFO or character device).
///
/// Writers see one file API (positional writes, `set_len`, `sync_all`) whatever the
/// destination. A fresh file passes straight through. In place, the sink records which
/// ranges were written so that [`Output::finish`](super::Output::finish) can zero the
/// rest: a writer may rely on unwritten ranges reading as zeros, as they do in a new file,
/// but a block device holds old data there. A stream turns forward positional writes into
/// sequential ones, filling gaps with zeros, and refuses a write behind what it has already
/// sent.
#[derive(Debug)]
pub struct Sink {
    /// The file, for a fresh or in-place output; None on a stream, whose bytes go through
    /// the [`StreamOut`] inside `track`.
    pub(super) file: Option<File>,
    pub(super) track: Option<Arc<Mutex<Track>>>,
    /// Digests of a fresh file hashed on the way while its writes move forward (see
    /// [`Output::request_digests`]).
    pub(super) follow: Option<Arc<Mutex<Follow>>>,
    /// Bytes written to `file` since its writeback was last started (see [`WRITEBACK`]).
    pub(super) dirty: std::sync::atomic::AtomicU64,
}

/// Dirty bytes after which a file output's writeback is started. Without it a machine
/// with plenty of memory keeps the whole output in its page cache until the final
/// `sync` (or the caller's), which then waits for all of it; started as the bytes come,
/// the disk writes while the converter still reads and decodes.
const WRITEBACK: u64 = 32 << 20;

/// On-the-way digests of a fresh file: valid while every write starts at or past the end
/// of the previous one (the bytes between are holes, hashed as zeros); dropped at the
/// first write that goes back, and the finished file is read instead.
#[derive(Debug)]
pub(super) struct Follow {
    pub(super) pos: u64,
    pub(super) digests: Option<Digester>,
}

impl Follow {
    fn wrote(&mut self, data: &[u8], offset: u64) {
        let Some(d) = &mut self.digests else {
            return;
        };
        if offset < self.pos {
            self.digests = None;
            return;
        }
        let mut gap = offset - self.pos;
        while gap > 0 {
            let k = gap.min(ZEROS.len() as u64) as usize;
            d.update(&ZEROS[..k]);
            gap -= k as u64;
        }
        d.update(data);
        self.pos = offset + data.len() as u64;
    }
}

/// The sequential side of a stream output, shared by its [`Sink`] and its [`Output`] (which
/// pads the stream to its length once the writer is done).
pub(super) struct StreamOut {
    pub(super) w: Box<dyn Write + Send>,
    /// Digests of every byte sent, zeros filling gaps included.
    pub(super) digests: Option<Digester>,
}

impl std::fmt::Debug for StreamOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOut").finish_non_exhaustive()
    }
}

impl Write for StreamOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        if let Some(d) = &mut self.digests {
            d.update(&buf[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

#[derive(Debug)]
pub(super) enum Track {
    InPlace {
        /// Bytes a block device holds; None for a regular file, which grows.
        capacity: Option<u64>,
        /// The length asked for with `set_len` (the destination is never shrunk).
        len: u64,
        /// Written ranges, start -> end, merged when they touch.
        written: BTreeMap<u64, u64>,
    },
    Stream {
        /// Bytes sent so far.
        pos: u64,
        /// The length the stream will have once finished (zeros past `pos`).
        len: u64,
        out: StreamOut,
    },
}

impl From<File> for Sink {
    fn from(file: File) -> Self {
        Sink {
            file: Some(file),
            track: None,
            follow: None,
            dirty: Default::default(),
        }
    }
}

fn too_small(capacity: u64, needed: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "the block device holds {capacity} bytes but the output needs {needed} bytes"
    ))
}

fn stream_backwards(offset: u64, pos: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "the writer went back to offset {offset:#x} after sending {pos:#x} bytes; \
         this output format cannot be written to a pipe or character device"
    ))
}

impl Sink {
    /// The file, when this is a fresh, empty regular file (where options such as
    /// preallocation apply and unwritten ranges are holes); None in place or on a stream.
    pub fn fresh_file(&self) -> Option<&File> {
        self.track.is_none().then_some(self.file.as_ref()).flatten()
    }

    fn file(&self) -> std::io::Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| std::io::Error::other("a stream output has no file"))
    }

    /// Start writing back the file's dirty pages once [`WRITEBACK`] bytes were written
    /// since the last start. Only starts it (the call does not wait for the disk), and a
    /// failure to start is no error: the final flush still writes everything.
    fn wrote_to_file(&self, file: &File, n: usize) {
        use std::sync::atomic::Ordering;
        let before = self.dirty.fetch_add(n as u64, Ordering::Relaxed);
        if before + n as u64 >= WRITEBACK {
            self.dirty.store(0, Ordering::Relaxed);
            #[cfg(target_os = "linux")]
            // SAFETY: a plain syscall on a descriptor this sink owns; no memory is passed.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
            #[cfg(not(target_os = "linux"))]
            let _ = file;
        }
    }

    /// Write all of `data` at `offset`.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let Some(track) = &self.track else {
            let file = self.file()?;
            file.write_all_at(data, offset)?;
            self.wrote_to_file(file, data.len());
            if let Some(f) = &self.follow {
                f.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .wrote(data, offset);
            }
            return Ok(());
        };
        let mut t = track.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| std::io::Error::other("write past 2^64"))?;
        match &mut *t {
            Track::InPlace {
                capacity, written, ..
            } => {
                if let Some(cap) = *capacity {
                    if end > cap {
                        return Err(too_small(cap, end));
                    }
                }
                let file = self.file()?;
                file.write_all_at(data, offset)?;
                self.wrote_to_file(file, data.len());
                record(written, offset, end);
                Ok(())
            }
            Track::Stream { pos, len, out } => {
                if offset < *pos {
                    return Err(stream_backwards(offset, *pos));
                }
                write_zeros(&mut *out, offset - *pos)?;
                out.write_all(data)?;
                *pos = end;
                *len = (*len).max(end);
                Ok(())
            }
        }
    }

    /// Set the output's length, like [`File::set_len`]. In place, a block device is
    /// never resized (an error names both sizes when it is too small) and an existing
    /// file is never shrunk; on a stream, the length may not go below what was sent.
    pub fn set_len(&self, len: u64) -> std::io::Result<()> {
        let Some(track) = &self.track else {
            return self.file()?.set_len(len);
        };
        let mut t = track.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *t {
            Track::InPlace {
                capacity, len: l, ..
            } => {
                match *capacity {
                    Some(cap) if len > cap => return Err(too_small(cap, len)),
                    Some(_) => {}
                    None => {
                        let file = self.file()?;
                        if len > file.metadata()?.len() {
                            file.set_len(len)?;
                        }
                    }
                }
                *l = len;
                Ok(())
            }
            Track::Stream { pos, len: l, .. } => {
                if len < *pos {
                    return Err(stream_backwards(len, *pos));
                }
                *l = len;
                Ok(())
            }
        }
    }

    /// Flush written data to stable storage (a no-op on a stream).
    pub fn sync_all(&self) -> std::io::Result<()> {
        match &self.track {
            Some(t)
                if matches!(
                    *t.lock().unwrap_or_else(|p| p.into_inner()),
                    Track::Stream { .. }
                ) =>
            {
                Ok(())
            }
            _ => self.file()?.sync_all(),
        }
    }
}

/// Add `[start, end)` to the merged set of written ranges.
fn record(written: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if start == end {
        return;
    }
    // Merge with a range that starts at or before `start` and reaches it.
    if let Some((&s, &e)) = written.range(..=start).next_back() {
        if e >= start {
            start = s;
            end = end.max(e);
            written.remove(&s);
        }
    }
    // Swallow ranges that start inside the new one.
    while let Some((&s, &e)) = written.range(start..=end).next() {
        end = end.max(e);
        written.remove(&s);
    }
    written.insert(start, end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_ranges_merge() {
        let mut w = BTreeMap::new();
        record(&mut w, 0, 10);
        record(&mut w, 10, 20);
        record(&mut w, 30, 40);
        assert_eq!(
            w.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(0, 20), (30, 40)]
        );
        record(&mut w, 15, 35);
        assert_eq!(
            w.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(0, 40)]
        );
        record(&mut w, 50, 60);
        record(&mut w, 45, 70);
        record(&mut w, 5, 6);
        assert_eq!(
            w.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(0, 40), (45, 70)]
        );
    }
}
