//! Reading qcow (version 1) images: the L1 table is loaded and checked at open (one entry
//! per L1 span, capped), L2 tables are read on demand into a bounded cache, and every
//! entry used is checked against the file before a byte is read through it.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use byteorder::{BigEndian as BE, ByteOrder};

use super::header::{Qcow1Header, HEADER_SIZE, OFLAG_COMPRESSED};
use crate::device::{
    check_guest_range, BlockDevice, BlockStatus, HostFile, ImageInfo, Mapping, MappingKind,
};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::OpenOptions;

/// Largest L1 table we load (4 Mi entries: 8 TiB with qemu's smallest default span of 2 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Bytes of L2 tables the cache holds at most (and at least 16 tables, as qemu's cache).
const L2_CACHE_BYTES: u64 = 4 << 20;
/// Most cluster lookups one `map` call makes before answering with what it has.
const MAP_MAX_STEPS: u32 = 1 << 16;

/// Where one guest cluster lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Not in this image: zeros, or the backing file's bytes.
    Unallocated,
    /// Stored at this host offset (of the guest offset looked up, not the cluster start).
    Data(u64),
    /// Stored raw-deflated: `csize` bytes at `coffset`.
    Compressed { coffset: u64, csize: u64 },
}

struct L2Cache {
    tables: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
    cap: usize,
}

/// An opened qcow (version 1) image.
pub struct Qcow1Image {
    file: HostFile,
    header: Qcow1Header,
    size: u64,
    cs: u64,
    l1: Vec<u64>,
    /// Host ranges that hold metadata (header, backing name, L1 table): no table or
    /// cluster may overlap them.
    reserved: Vec<(u64, u64, &'static str)>,
    cache: Mutex<L2Cache>,
    /// The last cluster inflated: guest reads come in pieces smaller than a cluster.
    inflated: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    backing_name: Option<String>,
    backing: Option<Box<dyn BlockDevice>>,
    backing_path: Option<PathBuf>,
}

impl std::fmt::Debug for Qcow1Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow1Image")
            .field("path", &self.file.path())
            .field("header", &self.header)
            .finish()
    }
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl Qcow1Image {
    /// Parse the header, read the backing file name, load and check the L1 table, and
    /// open the backing file through `opts`' reference gate (refused by default).
    pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Self> {
        let head = file.read_vec(0, file.len().min(HEADER_SIZE as u64), "qcow header")?;
        let header = Qcow1Header::parse(&head).map_err(|e| e.with_path(file.path()))?;
        let cs = header.cluster_size();
        let mut reserved = vec![(0, HEADER_SIZE as u64, "the header")];

        let backing_name = if header.backing_file_offset != 0 && header.backing_file_size != 0 {
            let len = u64::from(header.backing_file_size);
            let raw = file
                .read_vec(header.backing_file_offset, len, "backing file name")
                .map_err(|e| e.with_field("backing_file_offset"))?;
            reserved.push((header.backing_file_offset, len, "the backing file name"));
            Some(String::from_utf8(raw).map_err(|_| {
                Error::invalid("backing file name is not valid UTF-8")
                    .with_field("backing_file_offset")
                    .at(header.backing_file_offset)
                    .with_path(file.path())
            })?)
        } else {
            None
        };

        let entries = header.l1_entries()?;
        let l1_bytes = entries * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::limit(format!(
                "qcow L1 table of {entries} entries ({l1_bytes} bytes) exceeds the {MAX_L1_BYTES}-byte limit"
            ))
            .with_field("size")
            .at(24)
            .with_path(file.path()));
        }
        let raw = file
            .read_vec(header.l1_table_offset, l1_bytes, "L1 table")
            .map_err(|e| e.with_field("l1_table_offset"))?;
        reserved.push((header.l1_table_offset, l1_bytes, "the L1 table"));
        let l1: Vec<u64> = raw.chunks_exact(8).map(BE::read_u64).collect();
        let l2_bytes = header.l2_entries() * 8;
        let mut img = Qcow1Image {
            size: header.virtual_size(),
            cs,
            l1,
            reserved,
            cache: Mutex::new(L2Cache {
                tables: HashMap::new(),
                order: VecDeque::new(),
                cap: (L2_CACHE_BYTES / l2_bytes).max(16) as usize,
            }),
            inflated: Mutex::new(None),
            backing_name,
            backing: None,
            backing_path: None,
            header,
            file,
        };
        for (i, &e) in img.l1.iter().enumerate() {
            if e != 0 {
                let at = img.header.l1_table_offset + i as u64 * 8;
                img.check_host(e, l2_bytes, "L2 table", at, cs)?;
            }
        }
        if let (Some(name), false) = (&img.backing_name, opts.no_backing) {
            img.backing = Some(opts.open_reference(img.file.path(), name, "backing_file", None)?);
            img.backing_path = Some(
                img.file
                    .path()
                    .parent()
                    .unwrap_or(std::path::Path::new(""))
                    .join(name),
            );
        }
        Ok(img)
    }

    /// The parsed header.
    pub fn header(&self) -> &Qcow1Header {
        &self.header
    }

    /// Error unless `[host, host+len)`, named by the table entry at `entry_at`, is
    /// aligned to `align`, inside the file and clear of the header, backing name and L1 table.
    fn check_host(&self, host: u64, len: u64, what: &str, entry_at: u64, align: u64) -> Result<()> {
        let fail = |why: String| {
            Err(
                Error::corrupt(format!("{what} at {host:#x} ({len} bytes) {why}"))
                    .with_field(format!(
                        "{} entry",
                        if what == "L2 table" { "L1" } else { "L2" }
                    ))
                    .at(entry_at)
                    .with_path(self.file.path()),
            )
        };
        if !host.is_multiple_of(align) {
            return fail(format!("is not aligned to {align} bytes"));
        }
        if host
            .checked_add(len)
            .is_none_or(|end| end > self.file.len())
        {
            return fail(format!(
                "runs past the end of the file ({} bytes)",
                self.file.len()
            ));
        }
        if let Some((_, _, name)) = self
            .reserved
            .iter()
            .find(|&&(o, l, _)| overlaps(host, len, o, l))
        {
            return fail(format!("overlaps {name}"));
        }
        Ok(())
    }

    fn l2_table(&self, l2_offset: u64) -> Result<Arc<[u64]>> {
        {
            let c = self.cache.lock().expect("L2 cache lock");
            if let Some(t) = c.tables.get(&l2_offset) {
                return Ok(t.clone());
            }
        }
        let bytes = self.header.l2_entries() * 8;
        let raw = self.file.read_vec(l2_offset, bytes, "L2 table")?;
        let t: Arc<[u64]> = raw.chunks_exact(8).map(BE::read_u64).collect();
        let mut c = self.cache.lock().expect("L2 cache lock");
        if c.tables.len() >= c.cap {
            if let Some(old) = c.order.pop_front() {
                c.tables.remove(&old);
            }
        }
        if c.tables.insert(l2_offset, t.clone()).is_none() {
            c.order.push_back(l2_offset);
        }
        Ok(t)
    }

    /// The piece at guest `off` and how many bytes from `off` it covers (to the end of
    /// its cluster, or of its L1 span when that has no L2 table).
    fn lookup(&self, off: u64) -> Result<(u64, Piece)> {
        let span = self.header.l1_span();
        let l1_index = (off / span) as usize;
        let l2_offset = self.l1.get(l1_index).copied().unwrap_or(0);
        if l2_offset == 0 {
            return Ok((span - off % span, Piece::Unallocated));
        }
        let l2_index = ((off % span) / self.cs) as usize;
        let e = self.l2_table(l2_offset)?[l2_index];
        let in_cluster = off % self.cs;
        let len = self.cs - in_cluster;
        let entry_at = l2_offset + l2_index as u64 * 8;
        if e == 0 {
            return Ok((len, Piece::Unallocated));
        }
        let cb = u32::from(self.header.cluster_bits);
        if e & OFLAG_COMPRESSED != 0 {
            let coffset = e & ((1u64 << (63 - cb)) - 1);
            let csize = (e >> (63 - cb)) & (self.cs - 1);
            if csize == 0 {
                return Err(Error::corrupt(format!(
                    "compressed cluster at {coffset:#x} for guest offset {off:#x} has size 0"
                ))
                .with_field("L2 entry")
                .at(entry_at)
                .with_path(self.file.path()));
            }
            self.check_host(coffset, csize, "compressed cluster", entry_at, 1)?;
            return Ok((len, Piece::Compressed { coffset, csize }));
        }
        let start = off - in_cluster;
        let used = self.cs.min(self.size - start);
        self.check_host(e, used, "data cluster", entry_at, self.cs)?;
        Ok((len, Piece::Data(e + in_cluster)))
    }

    fn inflate(&self, coffset: u64, csize: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((o, d)) = &*self.inflated.lock().expect("inflate cache lock") {
            if *o == coffset {
                return Ok(d.clone());
            }
        }
        let input = self.file.read_vec(coffset, csize, "compressed cluster")?;
        let mut out = vec![0u8; self.cs as usize];
        let mut d = flate2::Decompress::new(false);
        let r = d.decompress(&input, &mut out, flate2::FlushDecompress::Finish);
        // Like qemu: a whole cluster out is success even when the stream goes on.
        match r {
            Ok(_) if d.total_out() == self.cs => {}
            Ok(_) => {
                return Err(Error::corrupt(format!(
                    "compressed cluster inflates to {} bytes instead of {}",
                    d.total_out(),
                    self.cs
                ))
                .at(coffset)
                .with_path(self.file.path()))
            }
            Err(e) => {
                return Err(Error::corrupt(format!(
                    "compressed cluster is not valid deflate data: {e}"
                ))
                .at(coffset)
                .with_path(self.file.path()))
            }
        }
        let out = Arc::new(out);
        *self.inflated.lock().expect("inflate cache lock") = Some((coffset, out.clone()));
        Ok(out)
    }
}

impl BlockDevice for Qcow1Image {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    /// qemu's view (block/qcow.c `qcow_co_block_status`): data at a host offset,
    /// compressed clusters as compressed data without one, unallocated
    /// clusters from the backing chain one level deeper.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let end = crate::device::map_end(self.size, offset, max_len)?;
        let (len, piece) = self.lookup(offset)?;
        let len = len.min(end - offset);
        let mut st = BlockStatus::data(offset, len);
        match piece {
            Piece::Data(h) => st.host = Some(h),
            Piece::Compressed { .. } => st.compressed = true,
            Piece::Unallocated => {
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
                    // Past the backing image's end qemu 10 answers at this level.
                }
            }
        }
        Ok(st)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = crate::device::map_end(self.size, offset, max_len)?;
        let mut run = crate::device::MapRun::new(offset);
        let mut steps = 0;
        while run.end() < end && steps < MAP_MAX_STEPS {
            steps += 1;
            let cur = run.end();
            let (len, piece) = self.lookup(cur)?;
            let len = len.min(end - cur);
            let (len, k) = match piece {
                Piece::Data(h) => (len, MappingKind::Data { host: Some(h) }),
                Piece::Compressed { .. } => (len, MappingKind::Data { host: None }),
                Piece::Unallocated => {
                    crate::device::unallocated_kind(self.backing.as_deref(), cur, len)?
                }
            };
            if !run.push(len, k) {
                break;
            }
        }
        Ok(run.finish())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let cur = offset + done as u64;
            let (len, piece) = self.lookup(cur)?;
            let n = len.min((buf.len() - done) as u64) as usize;
            let part = &mut buf[done..done + n];
            match piece {
                Piece::Unallocated => {
                    crate::device::read_unallocated(self.backing.as_deref(), part, cur)?
                }
                Piece::Data(h) => self.file.read_exact_at(part, h, "data cluster")?,
                Piece::Compressed { coffset, csize } => {
                    let c = self.inflate(coffset, csize)?;
                    let a = (cur % self.cs) as usize;
                    part.copy_from_slice(&c[a..a + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let mut warnings = Vec::new();
        if !self.header.size.is_multiple_of(512) {
            warnings.push(format!(
                "virtual size {} is not a multiple of 512; read as {} bytes like qemu",
                self.header.size, self.size
            ));
        }
        ImageInfo {
            format: "qcow".into(),
            virtual_size: self.size,
            cluster_size: Some(self.cs),
            dirty: Some(false),
            backing_file: self.backing_name.clone(),
            warnings,
            ..Default::default()
        }
    }

    fn format(&self) -> Format {
        Format::Qcow
    }
}
