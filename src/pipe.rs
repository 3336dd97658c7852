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
use std::io::Read;
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
    fn reading_far_ahead_is_refused_before_anything_is_buffered() {
        let src = PipeSource::new(std::io::repeat(1), 1 << 40, "-");
        let mut b = vec![0u8; 4096];
        let e = src.read_at(&mut b, PipeSource::MAX_WINDOW).unwrap_err();
        assert!(e.to_string().contains("read ahead"), "{e}");
        assert_eq!(src.state.lock().unwrap().window.len(), 0);
    }
}
