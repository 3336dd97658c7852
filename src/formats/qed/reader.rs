//! Reading QED images: the L1 entries covering the guest are loaded and checked at open
//! (capped); L2 tables, which can be up to 1 GiB each (16 clusters of 64 MiB), are read
//! in pages of at most 64 KiB into a bounded cache, and every entry used is checked
//! against the file before a byte is read through it.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::{
    QedHeader, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, HEADER_SIZE,
};
use crate::device::{
    check_guest_range, BlockDevice, BlockStatus, HostFile, ImageInfo, Mapping, MappingKind,
};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::OpenOptions;

/// Largest part of the L1 table we load.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Bytes of an L2 page read at once (less when a whole table is smaller).
const PAGE_BYTES: u64 = 64 << 10;
/// Pages the L2 cache holds at most (4 MiB).
const CACHE_PAGES: usize = 64;
/// Most cluster lookups one `map` call makes before answering with what it has.
const MAP_MAX_STEPS: u32 = 1 << 16;
/// The L2 entry of a cluster that reads as zeros (and not from the backing file).
const ZERO_CLUSTER: u64 = 1;

/// Where one guest cluster lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Not in this image: zeros, or the backing file's bytes.
    Unallocated,
    /// A zero cluster.
    Zero,
    /// Stored at this host offset (of the guest offset looked up).
    Data(u64),
}

struct PageCache {
    pages: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
}

/// An opened QED image.
pub struct QedImage {
    file: HostFile,
    header: QedHeader,
    cs: u64,
    l1: Vec<u64>,
    page_bytes: u64,
    cache: Mutex<PageCache>,
    backing_name: Option<String>,
    backing: Option<Box<dyn BlockDevice>>,
    backing_path: Option<PathBuf>,
}

impl std::fmt::Debug for QedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QedImage")
            .field("path", &self.file.path())
            .field("header", &self.header)
            .finish()
    }
}

impl QedImage {
    /// Parse the header, check the L1 table's place, load and check the L1 entries that
    /// cover the guest, and open the backing file through `opts`' reference gate
    /// (refused by default).
    pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Self> {
        let head = file.read_vec(0, file.len().min(HEADER_SIZE as u64), "QED header")?;
        let header = QedHeader::parse(&head).map_err(|e| e.with_path(file.path()))?;
        let cs = u64::from(header.cluster_size);
        let mut img = QedImage {
            cs,
            l1: Vec::new(),
            page_bytes: header.table_bytes().min(PAGE_BYTES),
            cache: Mutex::new(PageCache {
                pages: HashMap::new(),
                order: VecDeque::new(),
            }),
            backing_name: None,
            backing: None,
            backing_path: None,
            header,
            file,
        };
        img.check_host(
            header.l1_table_offset,
            header.table_bytes(),
            "L1 table",
            40,
            "l1_table_offset",
            false,
        )?;

        let needed = header.image_size.div_ceil(header.l2_span());
        let l1_bytes = needed * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::limit(format!(
                "QED L1 table of {needed} entries in use ({l1_bytes} bytes) exceeds the {MAX_L1_BYTES}-byte limit"
            ))
            .with_field("image_size")
            .at(48)
            .with_path(img.file.path()));
        }
        let raw = img
            .file
            .read_vec(header.l1_table_offset, l1_bytes, "L1 table")?;
        img.l1 = raw.chunks_exact(8).map(LE::read_u64).collect();
        for (i, &e) in img.l1.iter().enumerate() {
            if e != 0 {
                let at = header.l1_table_offset + i as u64 * 8;
                img.check_host(e, header.table_bytes(), "L2 table", at, "L1 entry", true)?;
            }
        }

        if header.features & F_BACKING_FILE != 0 && header.backing_filename_size > 0 {
            let raw = img
                .file
                .read_vec(
                    u64::from(header.backing_filename_offset),
                    u64::from(header.backing_filename_size),
                    "backing file name",
                )
                .map_err(|e| e.with_field("backing_filename_offset"))?;
            let name = String::from_utf8(raw).map_err(|_| {
                Error::invalid("backing file name is not valid UTF-8")
                    .with_field("backing_filename_offset")
                    .at(u64::from(header.backing_filename_offset))
                    .with_path(img.file.path())
            })?;
            if !opts.no_backing {
                let fmt = (header.features & F_BACKING_FORMAT_NO_PROBE != 0).then_some(Format::Raw);
                img.backing =
                    Some(opts.open_reference(img.file.path(), &name, "backing_file", fmt)?);
                img.backing_path = Some(
                    img.file
                        .path()
                        .parent()
                        .unwrap_or(std::path::Path::new(""))
                        .join(&name),
                );
            }
            img.backing_name = Some(name);
        }
        Ok(img)
    }

    /// The parsed header.
    pub fn header(&self) -> &QedHeader {
        &self.header
    }

    /// Error unless `[host, host+len)`, named by the field or table entry at `at`, is
    /// cluster-aligned, past the header's clusters, inside the file and (unless it is
    /// the L1 table itself, `check_l1` false) clear of the L1 table.
    fn check_host(
        &self,
        host: u64,
        len: u64,
        what: &str,
        at: u64,
        field: &str,
        check_l1: bool,
    ) -> Result<()> {
        let fail = |why: String| {
            Err(
                Error::corrupt(format!("{what} at {host:#x} ({len} bytes) {why}"))
                    .with_field(field.to_string())
                    .at(at)
                    .with_path(self.file.path()),
            )
        };
        if !host.is_multiple_of(self.cs) {
            return fail(format!("is not aligned to the cluster size {}", self.cs));
        }
        if host < self.header.header_bytes() {
            return fail(format!(
                "overlaps the header's {} bytes",
                self.header.header_bytes()
            ));
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
        let l1 = self.header.l1_table_offset;
        if check_l1 && host < l1 + self.header.table_bytes() && l1 < host + len {
            return fail("overlaps the L1 table".into());
        }
        Ok(())
    }

    fn l2_page(&self, page: u64) -> Result<Arc<[u64]>> {
        {
            let c = self.cache.lock().expect("L2 cache lock");
            if let Some(p) = c.pages.get(&page) {
                return Ok(p.clone());
            }
        }
        let raw = self.file.read_vec(page, self.page_bytes, "L2 table")?;
        let p: Arc<[u64]> = raw.chunks_exact(8).map(LE::read_u64).collect();
        let mut c = self.cache.lock().expect("L2 cache lock");
        if c.pages.len() >= CACHE_PAGES {
            if let Some(old) = c.order.pop_front() {
                c.pages.remove(&old);
            }
        }
        if c.pages.insert(page, p.clone()).is_none() {
            c.order.push_back(page);
        }
        Ok(p)
    }

    /// The piece at guest `off` and how many bytes from `off` it covers (to the end of
    /// its cluster, or of its L2 table's span when the L1 entry is empty).
    fn lookup(&self, off: u64) -> Result<(u64, Piece)> {
        let span = self.header.l2_span();
        let l2_offset = self.l1.get((off / span) as usize).copied().unwrap_or(0);
        if l2_offset == 0 {
            return Ok((span - off % span, Piece::Unallocated));
        }
        let index = (off % span) / self.cs;
        let entry_at = l2_offset + index * 8;
        // Pages are counted from the table's start (tables are only cluster-aligned).
        let page = l2_offset + (index * 8) / self.page_bytes * self.page_bytes;
        let e = self.l2_page(page)?[((entry_at - page) / 8) as usize];
        let in_cluster = off % self.cs;
        let len = self.cs - in_cluster;
        match e {
            0 => Ok((len, Piece::Unallocated)),
            ZERO_CLUSTER => Ok((len, Piece::Zero)),
            h => {
                let start = off - in_cluster;
                let used = self.cs.min(self.header.image_size - start);
                self.check_host(h, used, "data cluster", entry_at, "L2 entry", true)?;
                Ok((len, Piece::Data(h + in_cluster)))
            }
        }
    }
}

impl BlockDevice for QedImage {
    fn virtual_size(&self) -> u64 {
        self.header.image_size
    }

    /// qemu's view (block/qed.c `bdrv_qed_co_block_status`): data at a host offset, zero
    /// clusters allocated zeros, unallocated clusters from the backing chain one level deeper.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let end = crate::device::map_end(self.header.image_size, offset, max_len)?;
        let (len, piece) = self.lookup(offset)?;
        let len = len.min(end - offset);
        let mut st = BlockStatus::data(offset, len);
        match piece {
            Piece::Data(h) => st.host = Some(h),
            Piece::Zero => (st.zero, st.data) = (true, false),
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
        let end = crate::device::map_end(self.header.image_size, offset, max_len)?;
        let mut run = crate::device::MapRun::new(offset);
        let mut steps = 0;
        while run.end() < end && steps < MAP_MAX_STEPS {
            steps += 1;
            let cur = run.end();
            let (len, piece) = self.lookup(cur)?;
            let len = len.min(end - cur);
            let (len, k) = match piece {
                Piece::Data(h) => (len, MappingKind::Data { host: Some(h) }),
                Piece::Zero => (len, MappingKind::Zero),
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
        check_guest_range(self.header.image_size, offset, buf.len())?;
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
                Piece::Zero => part.fill(0),
                Piece::Data(h) => self.file.read_exact_at(part, h, "data cluster")?,
            }
            done += n;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let h = &self.header;
        let dirty = h.features & F_NEED_CHECK != 0;
        let mut warnings = Vec::new();
        if dirty {
            warnings.push("need-check flag set: the image was not closed cleanly (qemu checks and repairs it when opening it for writing; reads are unaffected)".to_string());
        }
        if h.compat_features != 0 {
            warnings.push(format!(
                "unknown compatible feature bits {:#x} (ignored)",
                h.compat_features
            ));
        }
        if h.autoclear_features != 0 {
            warnings.push(format!(
                "unknown autoclear feature bits {:#x} (ignored; a writer clears them)",
                h.autoclear_features
            ));
        }
        ImageInfo {
            format: "qed".into(),
            virtual_size: h.image_size,
            cluster_size: Some(self.cs),
            // qemu-img 10 reports a need-check image's dirty-flag false (it checks only
            // when opening for writing); the warning says it.
            dirty: Some(false),
            backing_file: self.backing_name.clone(),
            backing_format: (self.backing_name.is_some()
                && h.features & F_BACKING_FORMAT_NO_PROBE != 0)
                .then(|| "raw".to_string()),
            warnings,
            ..Default::default()
        }
    }

    fn format(&self) -> Format {
        Format::Qed
    }
}
