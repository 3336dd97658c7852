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

/// One entry of the table: what is listed, and where its L1 table is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// What `snapshot -l` and `info` show.
    pub info: SnapshotInfo,
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
}

/// Read and validate the snapshot table the header points at (empty when it has none).
pub fn read_table(file: &HostFile, h: &Header) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
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
    let len = avail.min(MAX_TABLE_BYTES);
    file.check_range(h.snapshots_offset, 1, "snapshot table")
        .map_err(|e| e.with_field("snapshots_offset").at(64))?;
    let raw = file.read_vec(h.snapshots_offset, len, "snapshot table")?;
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    let mut pos = 0usize;
    for i in 0..h.nb_snapshots {
        let at = h.snapshots_offset + pos as u64;
        let short = || {
            Error::corrupt(format!(
                "snapshot {i} at {at:#x} runs past the snapshot table's end"
            ))
            .with_field("snapshot table")
            .at(at)
        };
        let fixed = raw.get(pos..pos + ENTRY_FIXED).ok_or_else(short)?;
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
        let extra = raw.get(p..p + extra_len as usize).ok_or_else(short)?;
        let ext_u64 = |o: usize| (extra.len() >= o + 8).then(|| BigEndian::read_u64(&extra[o..]));
        let vm_state_size = ext_u64(0).unwrap_or(u64::from(vm_state_size32));
        let disk_size = ext_u64(8);
        let icount = ext_u64(16).filter(|&c| c != u64::MAX);
        p += extra_len as usize;
        let id = raw.get(p..p + id_len).ok_or_else(short)?;
        p += id_len;
        let name = raw.get(p..p + name_len).ok_or_else(short)?;
        p += name_len;
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
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                vm_state_size,
                date_sec,
                date_nsec,
                vm_clock_nsec,
                icount,
                disk_size,
            },
            l1_table_offset,
            l1_size,
        });
    }
    Ok(out)
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
