//! The qcow2 internal snapshot table: parsed and validated up front (bounded by qemu's
//! limits and by the file's length), so `info` and `snapshot -l` can list it and a
//! snapshot's L1 table can be opened instead of the active one.

use byteorder::{BigEndian, ByteOrder};

use super::header::Header;
use crate::device::{HostFile, SnapshotInfo};
use crate::error::{Error, Result};

/// qemu's limit on the number of snapshots (QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// qemu's limit on the snapshot table's size in bytes (QCOW_MAX_SNAPSHOTS_SIZE).
pub const MAX_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// qemu's limit on one entry's extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
const MAX_EXTRA: u32 = 1024;
/// The fixed part of an entry.
const ENTRY_FIXED: usize = 40;

/// The extra data qemu writes for every entry: vm_state_size_large, disk_size, icount.
pub const KNOWN_EXTRA: u32 = 24;

/// One entry of the table: what is listed, and where its L1 table is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// What `snapshot -l` and `info` show.
    pub info: SnapshotInfo,
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// The ID and name as stored (qemu compares and rewrites bytes, not text).
    pub raw_id: Vec<u8>,
    /// See `raw_id`.
    pub raw_name: Vec<u8>,
    /// Extra data past the 24 bytes qemu knows, kept when the table is rewritten.
    pub unknown_extra: Vec<u8>,
    /// The entry's extra_data_size as stored.
    pub extra_size: u32,
}

/// Read and validate the snapshot table the header points at (empty when it has none).
pub fn read_table(file: &HostFile, h: &Header) -> Result<Vec<Snapshot>> {
    Ok(read_table_len(file, h)?.0)
}

/// [`read_table`], and the table's length in bytes (what freeing it frees).
pub fn read_table_len(file: &HostFile, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(Error::limit(format!(
            "{} snapshots exceed the limit of {MAX_SNAPSHOTS}",
            h.nb_snapshots
        ))
        .with_field("nb_snapshots")
        .at(60));
    }
    if !h.snapshots_offset.is_multiple_of(h.cluster_size()) {
        return Err(Error::corrupt(format!(
            "snapshot table offset {:#x} is not cluster aligned",
            h.snapshots_offset
        ))
        .with_field("snapshots_offset")
        .at(64));
    }
    let avail = file.len().saturating_sub(h.snapshots_offset);
    file.check_range(h.snapshots_offset, 1, "snapshot table")
        .map_err(|e| e.with_field("snapshots_offset").at(64))?;
    let mut raw = Window {
        file,
        start: h.snapshots_offset,
        cap: avail.min(MAX_TABLE_BYTES) as usize,
        buf: Vec::new(),
    };
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    let mut pos = 0usize;
    let mut end = 0usize;
    for i in 0..h.nb_snapshots {
        let at = h.snapshots_offset + pos as u64;
        let short = || {
            Error::corrupt(format!(
                "snapshot {i} at {at:#x} runs past the snapshot table's end"
            ))
            .with_field("snapshot table")
            .at(at)
        };
        let fixed = raw.get(pos, ENTRY_FIXED)?.ok_or_else(short)?.to_vec();
        let l1_table_offset = BigEndian::read_u64(&fixed[0..]);
        let l1_size = BigEndian::read_u32(&fixed[8..]);
        let id_len = BigEndian::read_u16(&fixed[12..]) as usize;
        let name_len = BigEndian::read_u16(&fixed[14..]) as usize;
        let date_sec = BigEndian::read_u32(&fixed[16..]);
        let date_nsec = BigEndian::read_u32(&fixed[20..]);
        let vm_clock_nsec = BigEndian::read_u64(&fixed[24..]);
        let vm_state_size32 = BigEndian::read_u32(&fixed[32..]);
        let extra_len = BigEndian::read_u32(&fixed[36..]);
        if extra_len > MAX_EXTRA {
            return Err(Error::corrupt(format!(
                "snapshot {i} extra data of {extra_len} bytes exceeds {MAX_EXTRA}"
            ))
            .with_field("extra_data_size")
            .at(at + 36));
        }
        let mut p = pos + ENTRY_FIXED;
        let extra = raw.get(p, extra_len as usize)?.ok_or_else(short)?.to_vec();
        let ext_u64 = |o: usize| (extra.len() >= o + 8).then(|| BigEndian::read_u64(&extra[o..]));
        let vm_state_size = ext_u64(0).unwrap_or(u64::from(vm_state_size32));
        let disk_size = ext_u64(8);
        let icount = ext_u64(16).filter(|&c| c != u64::MAX);
        p += extra_len as usize;
        let id = raw.get(p, id_len)?.ok_or_else(short)?.to_vec();
        p += id_len;
        let name = raw.get(p, name_len)?.ok_or_else(short)?.to_vec();
        p += name_len;
        end = p;
        pos = p.next_multiple_of(8);
        if l1_table_offset % h.cluster_size() != 0 {
            return Err(Error::corrupt(format!(
                "snapshot {i} L1 table offset {l1_table_offset:#x} is not cluster aligned"
            ))
            .with_field("snapshot l1_table_offset")
            .at(at));
        }
        out.push(Snapshot {
            info: SnapshotInfo {
                id: String::from_utf8_lossy(&id).into_owned(),
                name: String::from_utf8_lossy(&name).into_owned(),
                vm_state_size,
                date_sec,
                date_nsec,
                vm_clock_nsec,
                icount,
                disk_size,
            },
            l1_table_offset,
            l1_size,
            raw_id: id,
            raw_name: name,
            unknown_extra: extra.get(KNOWN_EXTRA as usize..).unwrap_or(&[]).to_vec(),
            extra_size: extra_len,
        });
    }
    Ok((out, end as u64))
}

/// The table's bytes, read as far as its entries reach (a table of a few entries costs a
/// few KiB, not qemu's 64 MiB limit).
struct Window<'a> {
    file: &'a HostFile,
    start: u64,
    /// Bytes that may be read: to the end of the file, at most qemu's limit.
    cap: usize,
    buf: Vec<u8>,
}

impl Window<'_> {
    /// `len` bytes at `pos`, None when they pass the end of what may be read.
    fn get(&mut self, pos: usize, len: usize) -> Result<Option<&[u8]>> {
        let end = pos + len;
        if end > self.cap {
            return Ok(None);
        }
        if end > self.buf.len() {
            let want = end.max(self.buf.len() * 2).max(64 << 10).min(self.cap);
            let more = self.file.read_vec(
                self.start + self.buf.len() as u64,
                (want - self.buf.len()) as u64,
                "snapshot table",
            )?;
            self.buf.extend_from_slice(&more);
        }
        Ok(Some(&self.buf[pos..end]))
    }
}

/// The table as qemu's `qcow2_write_snapshots` lays it out: every entry with at least the
/// 24 bytes of known extra data (a missing disk size is `size`, a missing icount -1), the
/// unknown extra data kept, entries 8-byte aligned.
pub fn table_bytes(table: &[Snapshot], size: u64) -> Vec<u8> {
    let mut b = Vec::new();
    for sn in table {
        b.resize(b.len().next_multiple_of(8), 0);
        let mut h = [0u8; ENTRY_FIXED];
        let i = &sn.info;
        BigEndian::write_u64(&mut h[0..], sn.l1_table_offset);
        BigEndian::write_u32(&mut h[8..], sn.l1_size);
        BigEndian::write_u16(&mut h[12..], sn.raw_id.len() as u16);
        BigEndian::write_u16(&mut h[14..], sn.raw_name.len() as u16);
        BigEndian::write_u32(&mut h[16..], i.date_sec);
        BigEndian::write_u32(&mut h[20..], i.date_nsec);
        BigEndian::write_u64(&mut h[24..], i.vm_clock_nsec);
        // A state too large for 32 bits reads as none to older readers, not truncated.
        BigEndian::write_u32(&mut h[32..], u32::try_from(i.vm_state_size).unwrap_or(0));
        BigEndian::write_u32(&mut h[36..], KNOWN_EXTRA + sn.unknown_extra.len() as u32);
        b.extend_from_slice(&h);
        let mut x = [0u8; KNOWN_EXTRA as usize];
        BigEndian::write_u64(&mut x[0..], i.vm_state_size);
        BigEndian::write_u64(&mut x[8..], i.disk_size.unwrap_or(size));
        BigEndian::write_u64(&mut x[16..], i.icount.unwrap_or(u64::MAX));
        b.extend_from_slice(&x);
        b.extend_from_slice(&sn.unknown_extra);
        b.extend_from_slice(&sn.raw_id);
        b.extend_from_slice(&sn.raw_name);
    }
    b
}

/// The snapshot `sel` names: `snapshot.id=ID` or `snapshot.name=NAME` (qemu's
/// `convert -l` keys), or a bare ID-or-name as qemu's `-s` takes it.
pub fn find<'a>(table: &'a [Snapshot], key: &str, value: &str) -> Result<&'a Snapshot> {
    let hit = match key {
        "snapshot.id" => table.iter().find(|s| s.info.id == value),
        "snapshot.name" => table.iter().find(|s| s.info.name == value),
        _ => table
            .iter()
            .find(|s| s.info.id == value)
            .or_else(|| table.iter().find(|s| s.info.name == value)),
    };
    hit.ok_or_else(|| {
        let have: Vec<String> = table
            .iter()
            .map(|s| format!("{} ({})", s.info.id, s.info.name))
            .collect();
        Error::arg(format!(
            "no snapshot with {key} '{value}' (snapshots: {})",
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        ))
    })
}
