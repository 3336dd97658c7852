//! Reading qcow2: the active L1 table is loaded up front (it is at most 32 MiB and checked
//! against the file length), L2 tables go through a small bounded cache, and every guest
//! range resolves to a run of one kind (data at contiguous host offsets, compressed
//! cluster, zero, unallocated) so contiguous clusters are read with one pread.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use byteorder::{BigEndian, ByteOrder};

use super::compress::decompress;
use super::header::*;
use crate::device::{
    check_guest_range, BlockDevice, BlockStatus, HostFile, ImageInfo, Mapping, MappingKind,
};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::OpenOptions;

/// Bits 9..=55 of L1 and standard L2 entries: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 bit 63: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 bit 62: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 bit 0: reads as zeros.
pub const ZERO: u64 = 1;

/// Bytes of L2 tables kept in memory.
const L2_CACHE_BYTES: u64 = 16 << 20;
/// How many L2 tables one `map` call may walk before returning a shorter range (keeps a
/// single call cheap and the cache useful for the reads that follow).
const MAP_MAX_TABLES: u64 = 64;

/// What one guest run is, as the reader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Not allocated here (the backing image's, or zeros); with the host offset of the
    /// preallocated cluster it lies in, if any (qemu's UNALLOCATED_ALLOC subcluster).
    Unallocated(Option<u64>),
    /// Reads as zeros; with the host offset of its preallocated cluster, if any (qemu's
    /// ZERO_ALLOC, which `map` shows with its offset).
    Zero(Option<u64>),
    /// Uncompressed data at this host offset (of the image or the external data file).
    Data(u64),
    /// A compressed cluster: host offset and byte count of its stream.
    Compressed { coffset: u64, csize: u64 },
}

struct L2Cache {
    tables: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
    cap: usize,
}

/// An opened qcow2 image.
pub struct Qcow2Image {
    file: HostFile,
    data_file: Option<HostFile>,
    header: Header,
    ext: Extensions,
    backing_name: Option<String>,
    backing: Option<Box<dyn BlockDevice>>,
    /// Where the backing image was opened from (named in `map`'s human output).
    backing_path: Option<std::path::PathBuf>,
    /// The internal snapshot table.
    snapshots: Vec<crate::device::SnapshotInfo>,
    /// Host offset of the L1 table being read (the active one, or a snapshot's).
    l1_offset: u64,
    l1: Vec<u64>,
    cache: Mutex<L2Cache>,
    cs: u64,
    l2_entries: u64,
    csize_shift: u32,
    /// Guest size: the header's size rounded down to whole sectors, as qemu reads it.
    size: u64,
    /// qemu's metadata-preallocation guess, made on the first block status.
    metadata_prealloc: std::sync::OnceLock<bool>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.file.path())
            .field("header", &self.header)
            .finish()
    }
}

/// Open a qcow2 image: parse and validate the header and extensions, refuse referenced
/// files unless `opts` allows them, load the active L1 table.
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Qcow2Image> {
    let head_len = file.len().min(64 << 10);
    let mut head = file.read_vec(0, head_len, "qcow2 header")?;
    let header = Header::parse(&head).map_err(|e| e.with_path(file.path()))?;
    let cs = header.cluster_size();
    // The extension area ends at the backing file name, or at the end of the first cluster.
    let area_end = if header.backing_file_offset != 0 {
        header.backing_file_offset
    } else {
        cs
    }
    .min(file.len());
    if area_end > head.len() as u64 {
        head = file.read_vec(0, area_end, "qcow2 header extensions")?;
    }
    let ext_start = header.header_length as usize;
    let ext = if (area_end as usize) > ext_start {
        Extensions::parse(&head[..area_end as usize], ext_start)?
    } else {
        Extensions::default()
    };

    // The image's own tables are checked before any file it names is opened. Only the
    // entries covering the virtual size are loaded (the rest may map VM state).
    let needed = header.l1_entries_needed()?;
    let snapshots = super::snapshot::read_table(&file, &header)?;
    // `snapshot.id` / `snapshot.name` (convert -l): read that snapshot's L1 table instead
    // of the active one, validated the same way; the guest size stays the image's, as in qemu.
    let mut selected = None;
    for (k, v) in &opts.options {
        match k.as_str() {
            "snapshot.id" | "snapshot.name" | "snapshot" => {
                selected = Some(super::snapshot::find(&snapshots, k, v)?)
            }
            other => {
                return Err(Error::arg(format!(
                "format 'qcow2' has no open option '{other}' (options: snapshot.id, snapshot.name)"
            )))
            }
        }
    }
    let (l1_offset, l1_field, l1_have) = match selected {
        Some(sn) => (
            sn.l1_table_offset,
            "snapshot l1_table_offset",
            u64::from(sn.l1_size).min(needed),
        ),
        None => (header.l1_table_offset, "l1_table_offset", needed),
    };
    let l1_bytes = l1_have * 8;
    file.check_range(l1_offset, l1_bytes, "L1 table")
        .map_err(|e| e.with_field(l1_field).at(40))?;
    let raw = file.read_vec(l1_offset, l1_bytes, "L1 table")?;
    let mut l1: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
    // A snapshot taken before a resize has a shorter table: the rest is unallocated.
    l1.resize(needed as usize, 0);
    let snapshots: Vec<_> = snapshots.into_iter().map(|s| s.info).collect();

    let backing_name = if header.backing_file_offset != 0 && header.backing_file_size != 0 {
        let raw = file.read_vec(
            header.backing_file_offset,
            u64::from(header.backing_file_size),
            "backing file name",
        )?;
        Some(String::from_utf8(raw).map_err(|_| {
            Error::invalid("backing file name is not valid UTF-8")
                .with_field("backing_file_offset")
                .at(header.backing_file_offset)
        })?)
    } else {
        None
    };

    let data_file = if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        let name = ext.data_file.as_deref().ok_or_else(|| {
            Error::invalid("external data file feature set but the image names no data file")
                .with_field("incompatible_features")
                .at(72)
        })?;
        Some(opts.open_reference_file(file.path(), name, "data_file")?)
    } else {
        None
    };

    let backing = match &backing_name {
        Some(_) if opts.no_backing => None,
        Some(name) => {
            let fmt = match ext.backing_format.as_deref() {
                Some(f) => Some(Format::from_name(f).map_err(|_| {
                    Error::unsupported(format!("backing file format '{f}' is not supported"))
                        .with_field("backing format extension")
                })?),
                None => None,
            };
            Some(opts.open_reference(file.path(), name, "backing_file", fmt)?)
        }
        None => None,
    };

    let l2_entries = header.l2_entries();
    let cap = (L2_CACHE_BYTES / cs).max(16) as usize;
    let backing_path = backing_name
        .as_ref()
        .filter(|_| backing.is_some())
        .map(|n| {
            file.path()
                .parent()
                .unwrap_or(std::path::Path::new(""))
                .join(n)
        });
    Ok(Qcow2Image {
        csize_shift: 62 - (header.cluster_bits - 8),
        size: header.size & !511,
        metadata_prealloc: std::sync::OnceLock::new(),
        file,
        data_file,
        ext,
        backing_path,
        snapshots,
        l1_offset,
        backing_name,
        backing,
        l1,
        cache: Mutex::new(L2Cache {
            tables: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }),
        cs,
        l2_entries,
        header,
    })
}

thread_local! {
    /// Per-thread scratch for compressed clusters (stream, decompressed cluster).
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Qcow2Image {
    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// The parsed header extensions.
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    fn l2_table(&self, l1_index: u64) -> Result<Option<Arc<[u64]>>> {
        let entry = *self.l1.get(l1_index as usize).ok_or_else(|| {
            Error::corrupt(format!("L1 index {l1_index} is outside the L1 table"))
        })?;
        let off = entry & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        {
            let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = c.tables.get(&off) {
                return Ok(Some(t.clone()));
            }
        }
        let where_ = self.l1_offset + l1_index * 8;
        if !off.is_multiple_of(self.cs) {
            return Err(Error::corrupt(format!(
                "L2 table offset {off:#x} (L1 entry {l1_index}) is not cluster aligned"
            ))
            .with_field("L1 entry")
            .at(where_));
        }
        self.file
            .check_range(off, self.cs, "L2 table")
            .map_err(|e| e.with_field(format!("L1 entry {l1_index}")).at(where_))?;
        let raw = self.file.read_vec(off, self.cs, "L2 table")?;
        let t: Arc<[u64]> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if !c.tables.contains_key(&off) {
            if c.tables.len() >= c.cap {
                if let Some(old) = c.order.pop_front() {
                    c.tables.remove(&old);
                }
            }
            c.order.push_back(off);
            c.tables.insert(off, t.clone());
        }
        Ok(Some(t))
    }

    /// The kind of guest byte `cur` and how far (up to `limit`, inside one cluster) it
    /// stays the same; Data carries the host offset of `cur`.
    fn classify(&self, table: &[u64], cur: u64, limit: u64) -> Result<(u64, Piece)> {
        let cs = self.cs;
        let idx = ((cur / cs) % self.l2_entries) as usize;
        let in_cluster = cur % cs;
        let ext = self.header.extended_l2();
        let (entry, bitmap) = if ext {
            (table[idx * 2], table[idx * 2 + 1])
        } else {
            (table[idx], 0)
        };
        let l2_pos = || cur / cs;
        if entry & COMPRESSED != 0 {
            if self.data_file.is_some() {
                return Err(Error::corrupt(format!(
                    "compressed cluster at guest offset {:#x} in an image with an external data file",
                    l2_pos() * cs
                )));
            }
            let offset_mask = (1u64 << self.csize_shift) - 1;
            let coffset = entry & offset_mask;
            let csize_mask = (1u64 << (self.header.cluster_bits - 8)) - 1;
            let nsect = ((entry >> self.csize_shift) & csize_mask) + 1;
            let csize = (nsect * 512).saturating_sub(coffset & 511);
            if coffset >= 1 << 56 || csize == 0 {
                return Err(Error::corrupt(format!(
                    "compressed cluster descriptor {entry:#018x} for guest offset {:#x} is invalid",
                    l2_pos() * cs
                )));
            }
            return Ok((limit, Piece::Compressed { coffset, csize }));
        }
        let host = entry & OFFSET_MASK;
        let allocated = host != 0 || (self.data_file.is_some() && entry & COPIED != 0);
        if allocated && !host.is_multiple_of(cs) {
            return Err(Error::corrupt(format!(
                "data cluster offset {host:#x} for guest offset {:#x} is not cluster aligned",
                l2_pos() * cs
            )));
        }
        if !ext {
            // qemu's ZERO_ALLOC needs a host offset even with a data file.
            let p = if entry & ZERO != 0 {
                Piece::Zero((host != 0).then_some(host + in_cluster))
            } else if allocated {
                Piece::Data(host + in_cluster)
            } else {
                Piece::Unallocated(None)
            };
            return Ok((limit, p));
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 || (!allocated && alloc != 0) {
            return Err(Error::corrupt(format!(
                "invalid subcluster bitmap {bitmap:#018x} for guest offset {:#x}",
                l2_pos() * cs
            )));
        }
        let sc_size = cs / 32;
        let kind_of = |sc: u64| -> u8 {
            if alloc & (1 << sc) != 0 {
                0
            } else if zero & (1 << sc) != 0 {
                1
            } else {
                2
            }
        };
        let sc = in_cluster / sc_size;
        let k = kind_of(sc);
        let cluster_start = cur - in_cluster;
        let mut next = sc + 1;
        while next < 32 && cluster_start + next * sc_size < limit && kind_of(next) == k {
            next += 1;
        }
        let end = (cluster_start + next * sc_size).min(limit);
        let at = allocated.then_some(host + in_cluster);
        let p = match k {
            0 => Piece::Data(host + in_cluster),
            1 => Piece::Zero(at),
            _ => Piece::Unallocated(at),
        };
        Ok((end, p))
    }

    /// The run starting at `off` (ending before `end`), coalesced within one L2 table;
    /// compressed clusters come one at a time.
    fn lookup(&self, off: u64, end: u64) -> Result<(u64, Piece)> {
        let cs = self.cs;
        let span = cs * self.l2_entries;
        let l1_index = off / span;
        let span_end = end.min((l1_index + 1) * span);
        let Some(table) = self.l2_table(l1_index)? else {
            // Skip the following empty L1 entries too: a sparse image maps in one step.
            let mut next = l1_index + 1;
            while next * span < end
                && self
                    .l1
                    .get(next as usize)
                    .is_some_and(|e| e & OFFSET_MASK == 0)
            {
                next += 1;
            }
            return Ok((end.min(next * span) - off, Piece::Unallocated(None)));
        };
        let cluster_end = |p: u64| (p / cs + 1) * cs;
        let (mut e, first) = self.classify(&table, off, span_end.min(cluster_end(off)))?;
        if matches!(first, Piece::Compressed { .. }) {
            return Ok((e - off, first));
        }
        while e < span_end {
            let (e2, p) = self.classify(&table, e, span_end.min(cluster_end(e)))?;
            // A run keeps to one kind and, where it has host offsets, to one
            // contiguous host range (qemu's count_contiguous_subclusters).
            let same = match (first, p) {
                (Piece::Data(h), Piece::Data(h2))
                | (Piece::Zero(Some(h)), Piece::Zero(Some(h2)))
                | (Piece::Unallocated(Some(h)), Piece::Unallocated(Some(h2))) => {
                    h2 == h + (e - off)
                }
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            e = e2;
        }
        Ok((e - off, first))
    }

    /// qemu's guess that the image was made with preallocation=metadata, made once (as
    /// qemu does on its first block status).
    fn metadata_preallocated(&self) -> bool {
        *self
            .metadata_prealloc
            .get_or_init(|| super::prealloc::metadata_preallocated(&self.file, &self.header))
    }

    fn data_source(&self) -> &HostFile {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        self.data_source().read_exact_at(buf, host, "data cluster")
    }

    fn read_compressed(
        &self,
        buf: &mut [u8],
        coffset: u64,
        csize: u64,
        in_cluster: u64,
    ) -> Result<()> {
        let flen = self.file.len();
        if coffset >= flen {
            return Err(Error::corrupt(format!(
                "compressed cluster at {coffset:#x} lies past the end of the file ({flen} bytes)"
            ))
            .at(coffset));
        }
        // The descriptor rounds up to whole sectors; the last one may extend past EOF.
        let n = csize.min(flen - coffset) as usize;
        let cs = self.cs as usize;
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let (input, out) = &mut *s;
            input.resize(n, 0);
            self.file
                .read_exact_at(input, coffset, "compressed cluster")?;
            if in_cluster == 0 && buf.len() == cs {
                return decompress(self.header.compression(), input, buf)
                    .map_err(|e| e.at(coffset));
            }
            out.resize(cs, 0);
            decompress(self.header.compression(), input, out).map_err(|e| e.at(coffset))?;
            let a = in_cluster as usize;
            buf.copy_from_slice(&out[a..a + buf.len()]);
            Ok(())
        })
    }

    /// Public kind of a piece at guest `off` of `len` bytes; an unallocated range over a
    /// backing image reports Data where the backing image holds data (so a conversion
    /// reads it) and may come back shorter.
    fn public_kind(&self, p: Piece, off: u64, len: u64) -> Result<(u64, MappingKind)> {
        Ok(match p {
            Piece::Zero(_) => (len, MappingKind::Zero),
            Piece::Data(h) if self.data_file.is_none() => {
                (len, MappingKind::Data { host: Some(h) })
            }
            Piece::Data(_) | Piece::Compressed { .. } => (len, MappingKind::Data { host: None }),
            Piece::Unallocated(_) => {
                crate::device::unallocated_kind(self.backing.as_deref(), off, len)?
            }
        })
    }
}

impl BlockDevice for Qcow2Image {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    /// qemu's view: compressed clusters have no host offset, data in an external data file
    /// lives in that file, and unallocated ranges answer from the backing chain one level deeper.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let end = crate::device::map_end(self.size, offset, max_len)?;
        let (len, piece) = self.lookup(offset, end)?;
        let mut st = BlockStatus::data(offset, len);
        let data_file = || self.data_file.as_ref().map(|f| f.path().to_path_buf());
        match piece {
            Piece::Data(h) => {
                st.host = Some(h);
                st.file = data_file();
                // qemu looks into the file only for images it thinks were preallocated
                // with preallocation=metadata (their data clusters may be holes).
                if self.metadata_preallocated() {
                    return Ok(st.refine_by_host(self.data_source()));
                }
            }
            Piece::Compressed { .. } => st.compressed = true,
            Piece::Zero(h) => {
                (st.zero, st.data) = (true, false);
                // A preallocated zero cluster keeps its offset in qemu's answer.
                if h.is_some() {
                    (st.host, st.file) = (h, data_file());
                }
            }
            Piece::Unallocated(h) => {
                (st.present, st.zero, st.data) = (false, true, false);
                if let Some(b) = &self.backing {
                    if offset < b.virtual_size() {
                        let mut bs = b.block_status(offset, len.min(b.virtual_size() - offset))?;
                        if bs.file.is_none() && bs.host.is_some() {
                            bs.file = self.backing_path.clone();
                        }
                        bs.depth += 1;
                        return Ok(bs);
                    }
                }
                // No backing image answers here (none, or past its end): qemu's block
                // layer calls the range zero at this level, depth 0, keeping the offset
                // of a preallocated cluster.
                if h.is_some() {
                    (st.host, st.file) = (h, data_file());
                }
            }
        }
        Ok(st)
    }

    /// A v3 image can hold persistent bitmaps (qemu's
    /// `qcow2_supports_persistent_dirty_bitmap`); a v2 image cannot.
    fn persistent_bitmaps(&self) -> Result<Option<Vec<(String, u64)>>> {
        if self.header.version < 3 {
            return Ok(None);
        }
        super::bitmaps::list(&self.file, &self.header, &self.ext).map(Some)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let size = self.size;
        let end = crate::device::map_end(size, offset, max_len)?;
        let span = self.cs * self.l2_entries;
        let mut run = crate::device::MapRun::new(offset);
        let mut tables = 0;
        let mut last_table = None;
        while run.end() < end {
            let cur = run.end();
            // Each L2 table walked costs a cluster read; stop after a bounded number.
            let l1_index = cur / span;
            let has_table = self
                .l1
                .get(l1_index as usize)
                .is_some_and(|e| e & OFFSET_MASK != 0);
            if has_table && last_table != Some(l1_index) {
                last_table = Some(l1_index);
                tables += 1;
                if tables > MAP_MAX_TABLES {
                    break;
                }
            }
            let (len, piece) = self.lookup(cur, end)?;
            if let Piece::Data(h) = piece {
                self.data_source()
                    .check_range(h, len, "data cluster")
                    .map_err(|e| e.with_field(format!("L2 entry for guest offset {cur:#x}")))?;
            }
            let (len, k) = self.public_kind(piece, cur, len)?;
            if !run.push(len, k) {
                break;
            }
        }
        Ok(run.finish())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len())?;
        let end = offset + buf.len() as u64;
        let mut done = 0usize;
        // A run of data contiguous in the host file, read with one pread when it ends.
        let mut pending: Option<(usize, u64, usize)> = None;
        while done < buf.len() {
            let cur = offset + done as u64;
            let (len, piece) = self.lookup(cur, end)?;
            let n = len as usize;
            if let Piece::Data(h) = piece {
                match &mut pending {
                    Some((_, ph, plen)) if *ph + *plen as u64 == h => *plen += n,
                    _ => {
                        if let Some((a, ph, plen)) = pending.take() {
                            self.read_data(&mut buf[a..a + plen], ph)?;
                        }
                        pending = Some((done, h, n));
                    }
                }
                done += n;
                continue;
            }
            if let Some((a, ph, plen)) = pending.take() {
                self.read_data(&mut buf[a..a + plen], ph)?;
            }
            let part = &mut buf[done..done + n];
            match piece {
                Piece::Zero(_) => part.fill(0),
                Piece::Unallocated(_) => {
                    crate::device::read_unallocated(self.backing.as_deref(), part, cur)?
                }
                Piece::Compressed { coffset, csize } => {
                    self.read_compressed(part, coffset, csize, cur % self.cs)?
                }
                Piece::Data(_) => unreachable!("handled above"),
            }
            done += n;
        }
        if let Some((a, ph, plen)) = pending.take() {
            self.read_data(&mut buf[a..a + plen], ph)?;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let h = &self.header;
        let mut data = serde_json::Map::new();
        let v3 = h.version >= 3;
        data.insert("compat".into(), (if v3 { "1.1" } else { "0.10" }).into());
        data.insert("compression-type".into(), h.compression().name().into());
        if v3 {
            data.insert(
                "lazy-refcounts".into(),
                (h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0).into(),
            );
        }
        data.insert("refcount-bits".into(), h.refcount_bits().into());
        if v3 {
            if let Some(df) = &self.ext.data_file {
                data.insert("data-file".into(), df.clone().into());
                data.insert(
                    "data-file-raw".into(),
                    (h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0).into(),
                );
            }
            data.insert(
                "corrupt".into(),
                (h.incompatible_features & INCOMPAT_CORRUPT != 0).into(),
            );
            data.insert("extended-l2".into(), h.extended_l2().into());
        }
        let dirty = h.incompatible_features & INCOMPAT_DIRTY != 0;
        let mut warnings = Vec::new();
        if dirty {
            warnings.push("dirty bit set: the image was not closed cleanly (refcounts may be stale; data reads are unaffected)".to_string());
        }
        if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
            warnings
                .push("corrupt bit set: qemu found metadata corruption in this image".to_string());
        }
        if !h.size.is_multiple_of(512) {
            warnings.push(format!(
                "virtual size {} is not a multiple of 512; read as {} bytes like qemu",
                h.size, self.size
            ));
        }
        if let Some(b) = &self.ext.bitmaps {
            warnings.push(format!(
                "{} persistent bitmap(s) present (not copied)",
                b.nb_bitmaps
            ));
        }
        let unknown_autoclear =
            h.autoclear_features & !(AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW);
        if unknown_autoclear != 0 {
            warnings.push(format!(
                "unknown autoclear feature bits {unknown_autoclear:#x}"
            ));
        }
        if !self.ext.unknown.is_empty() {
            let t: Vec<String> = self.ext.unknown.iter().map(|t| format!("{t:#x}")).collect();
            warnings.push(format!("unknown header extension(s) {}", t.join(", ")));
        }
        ImageInfo {
            format: "qcow2".into(),
            virtual_size: self.size,
            cluster_size: Some(self.cs),
            dirty: Some(dirty),
            backing_file: self.backing_name.clone(),
            backing_format: self.ext.backing_format.clone(),
            referenced_files: self.ext.data_file.iter().cloned().collect(),
            format_specific: Some(serde_json::json!({"type": "qcow2", "data": data})),
            warnings,
            snapshots: self.snapshots.clone(),
        }
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }
}
