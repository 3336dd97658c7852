//! The VHDX metadata log, replayed in memory.
//!
//! A VHDX that was not closed cleanly has a non-zero log GUID in its current header and a
//! sequence of valid log entries in its log: writes to the BAT and metadata that may not
//! have reached their places yet. Every reader must apply them before trusting any table.
//! qemu-img refuses such an image when it opens it read-only; we apply the entries to an
//! [`Overlay`] of 4 KiB host sectors that every later read of the file goes through, and
//! never write them back: the input is never touched.
//!
//! Finding the active sequence follows the spec (and qemu's `vhdx_log_search`): every
//! 4 KiB offset of the circular log may start a valid entry (signature, the header's log
//! GUID, a non-zero sequence number, a length inside the log, CRC-32C over the whole
//! entry); consecutive entries with consecutive sequence numbers form a sequence, and the
//! one whose last entry has the highest sequence number is replayed, from the entry its
//! last entry's tail names when that is one of its entries. The search's work is bounded
//! (see [`MAX_LOG_CRC_WORK`]) so a hostile log cannot make it quadratic.

use std::collections::BTreeMap;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::{checksum, Guid, Header, HEADER_SECTION_END, MIB};
use crate::device::HostFile;
use crate::error::{Error, Result};

/// Log sectors are 4 KiB.
pub const LOG_SECTOR: u64 = 4096;
/// Largest log we read into memory to replay.
pub const MAX_LOG_BYTES: u64 = 64 << 20;
/// The log search computes checksums over at most this many times the log's length.
pub const MAX_LOG_CRC_WORK: u64 = 16;

const ENTRY_SIG: &[u8; 4] = b"loge";
const DESC_SIG: &[u8; 4] = b"desc";
const ZERO_SIG: &[u8; 4] = b"zero";
const DATA_SIG: &[u8; 4] = b"data";
const ENTRY_HEADER_SIZE: usize = 64;
const DESC_SIZE: usize = 32;

/// The file's bytes after the replayed log: whole 4 KiB sectors written by the log, zero
/// ranges, and the length the file has after the replay.
#[derive(Debug, Default)]
pub struct Overlay {
    /// Host sector offset -> its 4 KiB after the replay. Wins over `zeros`.
    sectors: BTreeMap<u64, Box<[u8]>>,
    /// Zeroed host ranges `start -> end`, disjoint, sectors aligned.
    zeros: BTreeMap<u64, u64>,
    /// The file's length after the replay (at least its real length).
    len: u64,
    /// Log entries replayed.
    pub entries: usize,
}

impl Overlay {
    fn zero(&mut self, start: u64, end: u64) {
        let stale: Vec<u64> = self.sectors.range(start..end).map(|(&k, _)| k).collect();
        for k in stale {
            self.sectors.remove(&k);
        }
        let (mut s, mut e) = (start, end);
        let touching: Vec<(u64, u64)> = self
            .zeros
            .range(..=end)
            .filter(|&(_, &ze)| ze >= start)
            .map(|(&a, &b)| (a, b))
            .collect();
        for (a, b) in touching {
            self.zeros.remove(&a);
            s = s.min(a);
            e = e.max(b);
        }
        self.zeros.insert(s, e);
    }

    /// Apply the overlay to `buf`, which holds the file's bytes at `offset`.
    fn apply(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        for (&a, &b) in self.zeros.range(..end) {
            if b <= offset {
                continue;
            }
            let (s, e) = (a.max(offset), b.min(end));
            buf[(s - offset) as usize..(e - offset) as usize].fill(0);
        }
        let first = offset - offset % LOG_SECTOR;
        for (&at, data) in self.sectors.range(first..end) {
            let (s, e) = (at.max(offset), (at + LOG_SECTOR).min(end));
            if s >= e {
                continue;
            }
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - at) as usize..(e - at) as usize]);
        }
    }
}

/// The image file as the reader sees it: the file, with the replayed log over it when
/// there was one (bytes past the real end that the log extends the file to read as zeros).
#[derive(Debug)]
pub struct Host {
    /// The file.
    pub file: HostFile,
    /// The replayed log, if the image needed one.
    pub overlay: Option<Overlay>,
}

impl Host {
    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file's length (after the replay).
    pub fn len(&self) -> u64 {
        match &self.overlay {
            Some(o) => o.len,
            None => self.file.len(),
        }
    }

    /// Error unless `[offset, offset+len)` lies inside the file; `what` names the field.
    pub fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        if self.overlay.is_none() {
            return self.file.check_range(offset, len, what);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(Error::corrupt(format!(
                "{what} ({len} bytes at {offset:#x}) runs past the end of the file ({} bytes after the log replay)",
                self.len()
            ))
            .with_field(what.to_string())
            .at(offset)
            .with_path(self.file.path())),
        }
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        let Some(o) = &self.overlay else {
            return self.file.read_exact_at(buf, offset, what);
        };
        self.check_range(offset, buf.len() as u64, what)?;
        let real = self.file.len();
        let end = offset + buf.len() as u64;
        if offset < real {
            let n = (end.min(real) - offset) as usize;
            self.file.read_exact_at(&mut buf[..n], offset, what)?;
            buf[n..].fill(0);
        } else {
            buf.fill(0);
        }
        o.apply(buf, offset);
        Ok(())
    }

    /// Read `len` bytes at `offset` into a new buffer (bounded by the file's length).
    pub fn read_vec(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        self.check_range(offset, len, what)?;
        let mut v = vec![0u8; len as usize];
        self.read_exact_at(&mut v, offset, what)?;
        Ok(v)
    }
}

/// A log entry that passed every check, at `at` bytes into the log.
#[derive(Debug, Clone)]
struct Entry {
    at: u64,
    length: u64,
    tail: u64,
    seq: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// The log, read into memory, and its search state.
struct Log<'a> {
    bytes: &'a [u8],
    guid: Guid,
    crc_budget: u64,
}

impl Log<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// `n` bytes of the circular log from `at`.
    fn read(&self, at: u64, n: usize) -> Vec<u8> {
        let len = self.len();
        let mut v = Vec::with_capacity(n);
        let mut p = at % len;
        while v.len() < n {
            let k = (n - v.len()).min((len - p) as usize);
            v.extend_from_slice(&self.bytes[p as usize..p as usize + k]);
            p = (p + k as u64) % len;
        }
        v
    }

    /// The valid entry at `at`, if there is one. Errors only when the search's work
    /// budget runs out.
    fn entry(&mut self, at: u64) -> Result<Option<Entry>> {
        let h = self.read(at, ENTRY_HEADER_SIZE);
        if &h[0..4] != ENTRY_SIG || h[32..48] != self.guid {
            return Ok(None);
        }
        let length = LE::read_u32(&h[8..]) as u64;
        let seq = LE::read_u64(&h[16..]);
        let desc_count = LE::read_u32(&h[24..]) as u64;
        if length == 0 || !length.is_multiple_of(LOG_SECTOR) || length > self.len() || seq == 0 {
            return Ok(None);
        }
        if desc_sectors(desc_count) * LOG_SECTOR > length {
            return Ok(None);
        }
        if self.crc_budget < length {
            return Err(Error::limit(format!(
                "searching the VHDX log for its active sequence would checksum more than {MAX_LOG_CRC_WORK} times the log's {} bytes",
                self.len()
            ))
            .with_field("header.log_length"));
        }
        self.crc_budget -= length;
        let whole = self.read(at, length as usize);
        if LE::read_u32(&whole[4..]) != checksum(&whole, 4) {
            return Ok(None);
        }
        Ok(Some(Entry {
            at,
            length,
            tail: LE::read_u32(&h[12..]) as u64,
            seq,
            flushed_file_offset: LE::read_u64(&h[48..]),
            last_file_offset: LE::read_u64(&h[56..]),
        }))
    }
}

/// 4 KiB sectors holding the entry header and `count` descriptors (126 fit in the
/// first sector, 128 in each further one).
fn desc_sectors(count: u64) -> u64 {
    (count + 2).div_ceil(128)
}

/// Replay the log the current header `h` describes, when it holds an active sequence;
/// None for a clean image (zero log GUID, or no valid entry). A descriptor may not write
/// into the header section or the log itself.
pub fn replay(file: &HostFile, h: &Header) -> Result<Option<Overlay>> {
    if !h.log_offset.is_multiple_of(MIB) || h.log_offset < HEADER_SECTION_END {
        return Err(Error::invalid(format!(
            "VHDX log offset {:#x} is not a multiple of 1 MiB past the header section",
            h.log_offset
        ))
        .with_field("header.log_offset"));
    }
    if !(h.log_length as u64).is_multiple_of(MIB) {
        return Err(Error::invalid(format!(
            "VHDX log length {} is not a multiple of 1 MiB",
            h.log_length
        ))
        .with_field("header.log_length"));
    }
    if h.log_version != 0 {
        return Err(Error::unsupported(format!(
            "VHDX log version {} (only version 0 exists)",
            h.log_version
        ))
        .with_field("header.log_version"));
    }
    if h.log_guid == [0u8; 16] || h.log_length == 0 {
        return Ok(None);
    }
    let log_len = h.log_length as u64;
    if log_len > MAX_LOG_BYTES {
        return Err(Error::limit(format!(
            "the VHDX log to replay is {log_len} bytes (the limit is {MAX_LOG_BYTES})"
        ))
        .with_field("header.log_length"));
    }
    let bytes = file.read_vec(h.log_offset, log_len, "header.log_offset")?;
    let mut log = Log {
        bytes: &bytes,
        guid: h.log_guid,
        crc_budget: log_len * MAX_LOG_CRC_WORK,
    };
    // Every valid entry, then the sequences they chain into.
    let mut valid: BTreeMap<u64, Entry> = BTreeMap::new();
    let mut at = 0;
    while at < log_len {
        if let Some(e) = log.entry(at)? {
            valid.insert(at, e);
        }
        at += LOG_SECTOR;
    }
    let mut best: Option<Vec<Entry>> = None;
    for start in valid.keys() {
        let mut seq = vec![valid[start].clone()];
        loop {
            let last = seq.last().unwrap();
            let next_at = (last.at + last.length) % log_len;
            match valid.get(&next_at) {
                Some(n) if n.seq == last.seq + 1 && seq.len() < valid.len() => seq.push(n.clone()),
                _ => break,
            }
        }
        let head = seq.last().unwrap().seq;
        if best.as_ref().is_none_or(|b| head > b.last().unwrap().seq) {
            best = Some(seq);
        }
    }
    let Some(mut seq) = best else {
        return Ok(None);
    };
    // Replay from the tail the head names, when it is in the sequence.
    let tail = seq.last().unwrap().tail;
    if let Some(i) = seq.iter().position(|e| e.at == tail) {
        seq.drain(..i);
    }
    let mut ov = Overlay {
        len: file.len(),
        ..Default::default()
    };
    let log_range = (h.log_offset, h.log_offset + log_len);
    for e in &seq {
        if e.flushed_file_offset > file.len() {
            return Err(Error::corrupt(format!(
                "VHDX log entry {} at log offset {:#x} says the file was {} bytes long, but it has {} bytes: the file was truncated",
                e.seq, e.at, e.flushed_file_offset, file.len()
            ))
            .with_field("log_entry.flushed_file_offset")
            .at(h.log_offset + e.at));
        }
        apply_entry(&log, e, &mut ov, log_range, h.log_offset)?;
        ov.len = ov.len.max(e.last_file_offset);
        ov.entries += 1;
    }
    Ok(Some(ov))
}

/// Apply the descriptors of entry `e` to `ov`.
fn apply_entry(
    log: &Log,
    e: &Entry,
    ov: &mut Overlay,
    log_range: (u64, u64),
    log_offset: u64,
) -> Result<()> {
    let whole = log.read(e.at, e.length as usize);
    let count = LE::read_u32(&whole[24..]) as usize;
    let mut data_at = desc_sectors(count as u64) as usize * LOG_SECTOR as usize;
    let bad = |what: String, i: usize| {
        Error::corrupt(format!(
            "VHDX log entry {} (log offset {:#x}), descriptor {i}: {what}",
            e.seq, e.at
        ))
        .with_field("log_descriptor")
        .at(log_offset + e.at)
    };
    for i in 0..count {
        let d = &whole[ENTRY_HEADER_SIZE + i * DESC_SIZE..ENTRY_HEADER_SIZE + (i + 1) * DESC_SIZE];
        let target = LE::read_u64(&d[16..]);
        if LE::read_u64(&d[24..]) != e.seq {
            return Err(bad("sequence number differs from its entry's".into(), i));
        }
        if target % LOG_SECTOR != 0 {
            return Err(bad(
                format!("file offset {target:#x} is not 4 KiB aligned"),
                i,
            ));
        }
        let len = if &d[0..4] == DESC_SIG {
            LOG_SECTOR
        } else if &d[0..4] == ZERO_SIG {
            let z = LE::read_u64(&d[8..]);
            if z % LOG_SECTOR != 0 || z == 0 {
                return Err(bad(
                    format!("zero length {z} is not a multiple of 4 KiB"),
                    i,
                ));
            }
            z
        } else {
            return Err(bad("signature is neither \"desc\" nor \"zero\"".into(), i));
        };
        let end = target
            .checked_add(len)
            .ok_or_else(|| bad("range overflows 64 bits".into(), i))?;
        if target < HEADER_SECTION_END || (target < log_range.1 && end > log_range.0) {
            return Err(bad(
                format!("writes {len} bytes at {target:#x}, into the header section or the log"),
                i,
            ));
        }
        if end > e.last_file_offset.max(ov.len) {
            return Err(bad(
                format!(
                    "writes {len} bytes at {target:#x}, past the entry's last file offset {:#x}",
                    e.last_file_offset
                ),
                i,
            ));
        }
        if &d[0..4] == ZERO_SIG {
            ov.zero(target, end);
            continue;
        }
        if data_at + LOG_SECTOR as usize > whole.len() {
            return Err(bad(
                "its data sector lies past the end of the entry".into(),
                i,
            ));
        }
        let s = &whole[data_at..data_at + LOG_SECTOR as usize];
        data_at += LOG_SECTOR as usize;
        let seq = (LE::read_u32(&s[4..]) as u64) << 32 | LE::read_u32(&s[4092..]) as u64;
        if &s[0..4] != DATA_SIG || seq != e.seq {
            return Err(bad(
                "its data sector has a wrong signature or sequence number".into(),
                i,
            ));
        }
        let mut sector = vec![0u8; LOG_SECTOR as usize].into_boxed_slice();
        sector[..8].copy_from_slice(&d[8..16]);
        sector[8..4092].copy_from_slice(&s[8..4092]);
        sector[4092..].copy_from_slice(&d[4..8]);
        ov.sectors.insert(target, sector);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_orders_zero_and_data() {
        let mut o = Overlay {
            len: 1 << 30,
            ..Default::default()
        };
        o.sectors.insert(8192, vec![7u8; 4096].into_boxed_slice());
        o.zero(4096, 16384);
        o.sectors.insert(12288, vec![9u8; 4096].into_boxed_slice());
        let mut b = vec![1u8; 20480];
        o.apply(&mut b, 0);
        assert!(b[..4096].iter().all(|&x| x == 1));
        assert!(b[4096..12288].iter().all(|&x| x == 0));
        assert!(b[12288..16384].iter().all(|&x| x == 9));
        assert!(b[16384..].iter().all(|&x| x == 1));
        o.zero(16384, 20480);
        assert_eq!(o.zeros.len(), 1);
    }

    #[test]
    fn descriptor_sectors() {
        assert_eq!(desc_sectors(0), 1);
        assert_eq!(desc_sectors(126), 1);
        assert_eq!(desc_sectors(127), 2);
        assert_eq!(desc_sectors(254), 2);
    }
}
