//! Reading VMDK images: monolithic sparse files (hosted sparse and streamOptimized, with
//! or without markers), legacy COWD and ESXi seSparse extents, descriptor files that
//! concatenate FLAT, SPARSE, VMFS, SESPARSE and ZERO extents, and delta disks reading
//! through their parent. Every file named inside an image (extent, parent) is opened only
//! through the reference gate.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::device::{
    check_guest_range, BlockDevice, BlockStatus, HostFile, ImageInfo, Mapping, MappingKind,
};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::OpenOptions;

use super::descriptor::{looks_like_descriptor, Access, Descriptor, ExtentType};
use super::sparse::{
    CowdHeader, Marker, SeSparseHeader, SparseHeader, COWD_GTES_PER_GT, COWD_MAGIC, FLAG_MARKERS,
    FLAG_ZERO_GRAIN, GD_AT_END, KDMV_MAGIC, MARKER_EOS, MARKER_FOOTER, MAX_DESCRIPTOR_BYTES,
    SECTOR, SESPARSE_MAGIC,
};

/// Bytes of (normalized, 8 bytes per entry) grain tables cached per image before a
/// cache is cleared, shared out between the extents of a multi-extent image.
const GT_CACHE_BYTES: usize = 16 << 20;
/// Total grain directory bytes all extents of one image may load.
const MAX_TOTAL_GD_BYTES: u64 = 4 * super::sparse::MAX_GD_BYTES;

/// Where one grain lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    Unallocated,
    Zero,
    /// Uncompressed grain at this host byte offset.
    Data(u64),
    /// Compressed grain (its marker/header) at this host byte offset.
    Compressed(u64),
    /// A grain table entry no valid image holds.
    Bad(u64),
}

/// Grain table entries are normalized when a table is loaded: 0 unallocated, or one of
/// these tags with the grain's host sector in the low bits.
const TAG_DATA: u64 = 1 << 63;
const TAG_ZERO: u64 = 1 << 62;
const TAG_BAD: u64 = 3 << 62;
const SECTOR_MASK: u64 = (1 << 62) - 1;

/// How a sparse extent's grain table entries are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entries {
    /// 32-bit sector numbers (KDMV, COWD); `zero_grain` makes 1 mean "zeroed".
    Sector32 { zero_grain: bool },
    /// ESXi seSparse 64-bit entries; allocated grains are counted from `grains` (sectors).
    SeSparse { grains: u64, grain_sectors: u64 },
}

/// A sparse extent: grain directory loaded up front (bounded), grain tables cached.
#[derive(Debug)]
struct SparseExtent {
    file: Arc<HostFile>,
    /// Extent size in bytes.
    size: u64,
    /// Grain size in bytes.
    grain: u64,
    gtes: u64,
    gd: Vec<u32>,
    compressed: bool,
    markers: bool,
    entries: Entries,
    cache: Mutex<HashMap<usize, Arc<Vec<u64>>>>,
    /// How many extents share the image's grain table cache budget.
    cache_share: usize,
}

impl SparseExtent {
    fn from_kdmv(file: Arc<HostFile>, h: &SparseHeader) -> Result<Self> {
        h.validate(file.len())
            .map_err(|e| e.with_path(file.path()))?;
        let entries = h.gd_entries()?;
        let gd = read_u32s(&file, h.gd_offset * SECTOR, entries, "grain directory")?;
        Ok(SparseExtent {
            size: h.capacity * SECTOR,
            grain: h.grain_size * SECTOR,
            gtes: u64::from(h.num_gtes_per_gt),
            gd,
            compressed: h.compressed(),
            markers: h.flags & FLAG_MARKERS != 0,
            entries: Entries::Sector32 {
                zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            },
            cache: Mutex::new(HashMap::new()),
            cache_share: 1,
            file,
        })
    }

    fn from_cowd(file: Arc<HostFile>, h: &CowdHeader) -> Result<Self> {
        h.validate(file.len())
            .map_err(|e| e.with_path(file.path()))?;
        let gd = read_u32s(
            &file,
            u64::from(h.gd_offset) * SECTOR,
            u64::from(h.gd_entries),
            "grain directory",
        )?;
        Ok(SparseExtent {
            size: u64::from(h.capacity) * SECTOR,
            grain: u64::from(h.grain_size) * SECTOR,
            gtes: COWD_GTES_PER_GT,
            gd,
            compressed: false,
            markers: false,
            entries: Entries::Sector32 { zero_grain: false },
            cache: Mutex::new(HashMap::new()),
            cache_share: 1,
            file,
        })
    }

    fn from_sesparse(file: Arc<HostFile>) -> Result<Self> {
        let head = file.read_vec(0, 512, "seSparse header")?;
        let h = SeSparseHeader::parse(&head).map_err(|e| e.with_path(file.path()))?;
        let voff = h
            .volatile_header_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| {
                Error::corrupt("seSparse volatile header offset overflows")
                    .with_field("volatile_header_offset")
            })?;
        SeSparseHeader::check_volatile(&file.read_vec(voff, 512, "seSparse volatile header")?)?;
        let entries = h.gd_entries()?;
        if h.capacity.checked_mul(SECTOR).is_none() {
            return Err(Error::limit("seSparse capacity overflows").with_field("capacity"));
        }
        let gd_off = h.grain_dir_offset.checked_mul(SECTOR).ok_or_else(|| {
            Error::corrupt("seSparse grain directory offset overflows")
                .with_field("grain_dir_offset")
        })?;
        let raw = file.read_vec(gd_off, entries * 8, "seSparse grain directory")?;
        // Directory entries become grain table sectors (which qemu requires to fit 32 bits).
        let mut gd = Vec::with_capacity(entries as usize);
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let v = LE::read_u64(c);
            if v == 0 {
                gd.push(0);
                continue;
            }
            let sector = (v & 0xffff_ffff_0000_0000 == 0x1000_0000_0000_0000)
                .then(|| (v & 0xffff_ffff) * 64)
                .and_then(|x| x.checked_add(h.grain_tables_offset))
                .and_then(|x| u32::try_from(x).ok())
                .filter(|&x| x != 0);
            match sector {
                Some(x) => gd.push(x),
                None => {
                    return Err(Error::corrupt(format!(
                        "seSparse grain directory entry {i} is invalid ({v:#x})"
                    ))
                    .with_field("grain directory")
                    .at(gd_off + i as u64 * 8))
                }
            }
        }
        Ok(SparseExtent {
            size: h.capacity * SECTOR,
            grain: h.grain_size * SECTOR,
            gtes: 4096,
            gd,
            compressed: false,
            markers: false,
            entries: Entries::SeSparse {
                grains: h.grains_offset,
                grain_sectors: h.grain_size,
            },
            cache: Mutex::new(HashMap::new()),
            cache_share: 1,
            file,
        })
    }

    /// The grain table `i` (normalized entries), or None when its directory entry is 0.
    fn table(&self, i: usize) -> Result<Option<Arc<Vec<u64>>>> {
        let Some(&sector) = self.gd.get(i) else {
            return Err(Error::corrupt(format!(
                "grain directory has no entry {i} for the extent's capacity"
            ))
            .with_path(self.file.path()));
        };
        if sector == 0 {
            return Ok(None);
        }
        if let Some(t) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&i) {
            return Ok(Some(t.clone()));
        }
        let off = u64::from(sector) * SECTOR;
        let field = || format!("grain directory entry {i}");
        let t: Vec<u64> = match self.entries {
            Entries::Sector32 { zero_grain } => {
                read_u32s(&self.file, off, self.gtes, "grain table")
                    .map_err(|e| e.with_field(field()))?
                    .into_iter()
                    .map(|r| match r {
                        0 => 0,
                        1 if zero_grain => TAG_ZERO,
                        r => TAG_DATA | u64::from(r),
                    })
                    .collect()
            }
            Entries::SeSparse {
                grains,
                grain_sectors,
            } => {
                let raw = self
                    .file
                    .read_vec(off, self.gtes * 8, "grain table")
                    .map_err(|e| e.with_field(field()))?;
                raw.chunks_exact(8)
                    .map(|c| {
                        let v = LE::read_u64(c);
                        match v >> 60 {
                            0 if v == 0 => 0,
                            1 | 2 => TAG_ZERO,
                            3 => {
                                let cluster = ((v & 0x0fff_0000_0000_0000) >> 48)
                                    | ((v & 0x0000_ffff_ffff_ffff) << 12);
                                cluster
                                    .checked_mul(grain_sectors)
                                    .and_then(|x| x.checked_add(grains))
                                    .filter(|x| *x <= SECTOR_MASK / SECTOR)
                                    .map_or(TAG_BAD | (v & SECTOR_MASK), |x| TAG_DATA | x)
                            }
                            _ => TAG_BAD | (v & SECTOR_MASK),
                        }
                    })
                    .collect()
            }
        };
        let t = Arc::new(t);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let cap = (GT_CACHE_BYTES / (self.gtes as usize * 8) / self.cache_share).max(4);
        if c.len() >= cap {
            c.clear();
        }
        c.insert(i, t.clone());
        Ok(Some(t))
    }

    fn classify(&self, e: u64) -> Grain {
        if e == 0 {
            return Grain::Unallocated;
        }
        match e & !SECTOR_MASK {
            TAG_ZERO => Grain::Zero,
            TAG_DATA if self.compressed => Grain::Compressed((e & SECTOR_MASK) * SECTOR),
            TAG_DATA => Grain::Data((e & SECTOR_MASK) * SECTOR),
            _ => Grain::Bad(e & SECTOR_MASK),
        }
    }

    fn grain_at(&self, off: u64) -> Result<Grain> {
        let g = off / self.grain;
        let Some(t) = self.table((g / self.gtes) as usize)? else {
            return Ok(Grain::Unallocated);
        };
        match self.classify(t[(g % self.gtes) as usize]) {
            Grain::Bad(v) => Err(Error::corrupt(format!(
                "grain table entry for guest offset {off:#x} is invalid ({v:#x})"
            ))
            .with_field("grain table entry")
            .with_path(self.file.path())),
            g => Ok(g),
        }
    }

    /// Map `[off, off+max)` (extent-relative, inside the extent): length and kind of the
    /// longest run of one kind (host-contiguous for uncompressed data).
    fn map(&self, off: u64, max: u64, in_main: bool) -> Result<(u64, MappingKind)> {
        let end = self.size.min(off.saturating_add(max));
        let first = self.grain_at(off)?;
        let kind_of = |g: Grain, at: u64| match g {
            // grain_at never returns Bad.
            Grain::Unallocated | Grain::Bad(_) => MappingKind::Unallocated,
            Grain::Zero => MappingKind::Zero,
            Grain::Data(h) => MappingKind::Data {
                host: in_main.then_some(h + at % self.grain),
            },
            Grain::Compressed(_) => MappingKind::Data { host: None },
        };
        let kind = kind_of(first, off);
        let mut pos = (off / self.grain + 1) * self.grain;
        let mut expect_host = match first {
            Grain::Data(h) => Some(h + self.grain),
            _ => None,
        };
        'outer: while pos < end {
            let g = pos / self.grain;
            let ti = (g / self.gtes) as usize;
            let table = self.table(ti)?;
            let span_end = ((ti as u64 + 1) * self.gtes * self.grain).min(end);
            match table {
                None => {
                    if first != Grain::Unallocated {
                        break;
                    }
                    pos = span_end;
                }
                Some(t) => {
                    while pos < span_end {
                        let gi = ((pos / self.grain) % self.gtes) as usize;
                        let cur = self.classify(t[gi]);
                        let same = match (first, cur) {
                            (Grain::Unallocated, Grain::Unallocated) => true,
                            (Grain::Zero, Grain::Zero) => true,
                            (Grain::Compressed(_), Grain::Compressed(_)) => true,
                            (Grain::Data(_), Grain::Data(h)) => Some(h) == expect_host,
                            _ => false,
                        };
                        if !same {
                            break 'outer;
                        }
                        if let Grain::Data(h) = cur {
                            expect_host = Some(h + self.grain);
                        }
                        pos += self.grain;
                    }
                }
            }
        }
        Ok((pos.min(end) - off, kind))
    }

    /// Read extent-relative `[off, off+buf.len())`.
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        let mut scratch: Vec<u8> = Vec::new();
        while done < buf.len() {
            let pos = off + done as u64;
            if let Grain::Compressed(h) = self.grain_at(pos)? {
                let a = (pos % self.grain) as usize;
                let n = (self.grain as usize - a).min(buf.len() - done);
                let short = |got: usize| {
                    Error::corrupt(format!(
                        "compressed grain at {h:#x} inflates to {got} bytes, fewer than the {} needed",
                        a + n
                    ))
                    .at(h)
                    .with_path(self.file.path())
                };
                if a == 0 && n == self.grain as usize {
                    // A whole grain inflates straight into the caller's buffer.
                    let got = self.inflate_grain(h, &mut buf[done..done + n])?;
                    if got < n {
                        return Err(short(got));
                    }
                } else {
                    scratch.resize(self.grain as usize, 0);
                    let got = self.inflate_grain(h, &mut scratch)?;
                    let src = scratch.get(a..a + n).filter(|_| got >= a + n);
                    buf[done..done + n].copy_from_slice(src.ok_or_else(|| short(got))?);
                }
                done += n;
                continue;
            }
            // Uncompressed runs that are contiguous on the host are read in one call.
            let (run, kind) = self.map(pos, (buf.len() - done) as u64, true)?;
            let n = run.min((buf.len() - done) as u64) as usize;
            let part = &mut buf[done..done + n];
            match kind {
                MappingKind::Data { host: Some(h) } => self.read_plain(part, h)?,
                _ => part.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Read uncompressed grain data; bytes past the end of the file read as zeros (as in
    /// qemu) as long as the data starts inside the file.
    fn read_plain(&self, part: &mut [u8], host: u64) -> Result<()> {
        let len = self.file.len();
        if host >= len {
            return Err(Error::corrupt(format!(
                "grain at host offset {host:#x} lies past the end of the file ({len} bytes)"
            ))
            .with_field("grain table entry")
            .at(host)
            .with_path(self.file.path()));
        }
        let avail = (len - host).min(part.len() as u64) as usize;
        self.file
            .read_exact_at(&mut part[..avail], host, "grain data")?;
        part[avail..].fill(0);
        Ok(())
    }

    /// Inflate the compressed grain whose header is at `host` into `out` (one grain
    /// long); returns the bytes produced.
    fn inflate_grain(&self, host: u64, out: &mut [u8]) -> Result<usize> {
        thread_local! {
            /// Reused per reading thread: a fresh inflater and input buffer per grain
            /// cost allocations and page faults on every grain.
            static INFLATE: std::cell::RefCell<(flate2::Decompress, Vec<u8>)> =
                std::cell::RefCell::new((flate2::Decompress::new(true), Vec::new()));
        }
        let flen = self.file.len();
        let (data_off, data_len) = if self.markers {
            let mut hdr = [0u8; 12];
            self.file
                .read_exact_at(&mut hdr, host, "compressed grain header")?;
            let m = Marker::parse(&hdr)?;
            let size = u64::from(m.size);
            if size == 0 || size > 2 * self.grain {
                return Err(Error::corrupt(format!(
                    "compressed grain size {size} is invalid (grain is {} bytes)",
                    self.grain
                ))
                .with_field("grain marker size")
                .at(host)
                .with_path(self.file.path()));
            }
            (host + 12, size)
        } else {
            (host, (2 * self.grain).min(flen.saturating_sub(host)))
        };
        self.file
            .check_range(data_off, data_len, "compressed grain")?;
        INFLATE.with(|cell| {
            let (z, data) = &mut *cell.borrow_mut();
            data.resize(data_len as usize, 0);
            self.file
                .read_exact_at(data, data_off, "compressed grain")?;
            z.reset(true);
            let st = z
                .decompress(data, out, flate2::FlushDecompress::Finish)
                .map_err(|e| {
                    Error::corrupt(format!("compressed grain does not inflate: {e}"))
                        .at(host)
                        .with_path(self.file.path())
                })?;
            if st != flate2::Status::StreamEnd {
                return Err(Error::corrupt(
                    "compressed grain is truncated or inflates past the grain size",
                )
                .at(host)
                .with_path(self.file.path()));
            }
            Ok(z.total_out() as usize)
        })
    }
}

/// Read `n` little-endian u32s at `off` (bounds-checked against the file).
fn read_u32s(file: &HostFile, off: u64, n: u64, what: &str) -> Result<Vec<u32>> {
    let bytes = file.read_vec(off, n * 4, what)?;
    let mut v = vec![0u32; n as usize];
    LE::read_u32_into(&bytes, &mut v);
    Ok(v)
}

#[derive(Debug)]
enum ExtentData {
    Sparse(SparseExtent),
    Flat {
        file: Arc<HostFile>,
        offset: u64,
    },
    Zero,
    /// Described from the descriptor only: opened for `info` (no backing) while the
    /// reference gate refuses the extent's file. Mapping or reading it is an error.
    Unopened(String),
}

#[derive(Debug)]
struct Extent {
    /// Guest byte offset of the extent's start.
    start: u64,
    size: u64,
    data: ExtentData,
    /// Whether the extent's file is the image file itself (host offsets meaningful).
    in_main: bool,
    info: serde_json::Value,
}

impl Extent {
    /// The only extent of an image that is one sparse file (`path`), covering it all.
    fn whole_file(sparse: SparseExtent, extent_type: &str, path: &Path) -> Extent {
        let name = path.to_string_lossy().into_owned();
        let info = extent_info(
            &name,
            extent_type,
            sparse.size,
            Some(sparse.grain),
            sparse.compressed,
        );
        Extent {
            start: 0,
            size: sparse.size,
            in_main: true,
            data: ExtentData::Sparse(sparse),
            info,
        }
    }
}

/// An opened VMDK image (one or more extents).
pub struct VmdkImage {
    size: u64,
    extents: Vec<Extent>,
    info: ImageInfo,
    /// The parent of a delta disk (unallocated grains read from it).
    parent: Option<Box<dyn BlockDevice>>,
    /// Where the parent was opened from (named in `map`'s human output).
    parent_path: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for VmdkImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmdkImage")
            .field("size", &self.size)
            .field("extents", &self.extents)
            .field("parent", &self.parent.as_ref().map(|p| p.virtual_size()))
            .finish()
    }
}

fn extent_info(
    file: &str,
    kind: &str,
    size: u64,
    cluster: Option<u64>,
    compressed: bool,
) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    if compressed {
        m.insert("compressed".into(), true.into());
    }
    m.insert("virtual-size".into(), size.into());
    m.insert("filename".into(), file.into());
    if let Some(c) = cluster {
        m.insert("cluster-size".into(), c.into());
    }
    m.insert("format".into(), kind.into());
    serde_json::Value::Object(m)
}

/// Read the KDMV header, replacing it with the footer copy when `gdOffset` is GD_AT_END.
pub(super) fn read_kdmv_header(file: &HostFile) -> Result<SparseHeader> {
    let head = file.read_vec(
        0,
        SparseHeader::SIZE.min(file.len() as usize) as u64,
        "header",
    )?;
    let h = SparseHeader::parse(&head)?;
    if h.gd_offset != GD_AT_END {
        return Ok(h);
    }
    // The footer: a footer marker, the header copy, the end-of-stream marker in the last
    // three sectors.
    let len = file.len();
    if len < 4 * SECTOR {
        return Err(
            Error::corrupt("gdOffset is GD_AT_END but the file is too short for a footer")
                .with_field("gdOffset")
                .at(56),
        );
    }
    let foot = file.read_vec(len - 3 * SECTOR, 3 * SECTOR, "footer")?;
    let fm = Marker::parse(&foot[..16])?;
    let eos = Marker::parse(&foot[1024..1040])?;
    if fm.size != 0
        || fm.kind != MARKER_FOOTER
        || eos.val != 0
        || eos.size != 0
        || eos.kind != MARKER_EOS
    {
        return Err(Error::corrupt(
            "invalid footer: expected footer marker, footer header and end-of-stream marker in the last 1536 bytes",
        )
        .with_field("footer")
        .at(len - 3 * SECTOR));
    }
    let f = SparseHeader::parse(&foot[512..1024])
        .map_err(|e| e.with_field("footer").at(len - 2 * SECTOR))?;
    if f.gd_offset == GD_AT_END {
        return Err(Error::corrupt("the footer's gdOffset is GD_AT_END too")
            .with_field("footer gdOffset")
            .at(len - 2 * SECTOR + 56));
    }
    Ok(f)
}

/// Read an embedded descriptor (bounded by its size field and the file).
fn read_embedded_descriptor(file: &HostFile, h: &SparseHeader) -> Result<Option<Descriptor>> {
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Ok(None);
    }
    let len = h.desc_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR_BYTES);
    let off = h.desc_offset.checked_mul(SECTOR).ok_or_else(|| {
        Error::corrupt("descriptorOffset overflows")
            .with_field("descriptorOffset")
            .at(28)
    })?;
    let raw = file.read_vec(off, len, "embedded descriptor")?;
    Descriptor::parse(&raw).map(Some)
}

/// Whether the embedded descriptor's text mentions a parent file at all.
fn embedded_descriptor_names_parent(file: &HostFile, h: &SparseHeader) -> bool {
    let len = h.desc_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR_BYTES);
    h.desc_offset
        .checked_mul(SECTOR)
        .and_then(|off| file.read_vec(off, len, "embedded descriptor").ok())
        .is_some_and(|raw| raw.windows(18).any(|w| w == b"parentFileNameHint"))
}

/// Open a VMDK image.
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let file = Arc::new(file);
    let len = file.len();
    if len < 4 {
        return Err(Error::invalid("file is too small to be a VMDK image"));
    }
    let head = file.read_vec(0, len.min(512), "header")?;
    let magic32 = LE::read_u32(&head[..4]);
    let path = file.path().to_path_buf();
    if magic32 == KDMV_MAGIC {
        let h = read_kdmv_header(&file)?;
        if h.capacity == 0 && h.desc_offset != 0 {
            // Either a sparse file whose embedded descriptor lists the extents (qemu's
            // reading), or an empty monolithic image (which qemu cannot open).
            let d = read_embedded_descriptor(&file, &h)?
                .ok_or_else(|| Error::invalid("empty embedded descriptor"))?;
            let self_contained = matches!(
                d.create_type.as_deref(),
                Some("monolithicSparse" | "streamOptimized")
            );
            if !self_contained {
                return open_descriptor(&path, d, opts);
            }
        }
        // A descriptor we cannot parse is ignored (the grains are all in this file),
        // unless it names a parent: reading a delta disk without its parent would give
        // the parent's ranges as zeros, silently.
        let desc = match read_embedded_descriptor(&file, &h) {
            Ok(d) => d,
            Err(e) if embedded_descriptor_names_parent(&file, &h) => {
                return Err(Error::corrupt(format!(
                    "the embedded descriptor names a parent image but cannot be read: {}",
                    e.message()
                ))
                .with_field(e.field().unwrap_or("descriptor").to_string()))
            }
            Err(_) => None,
        };
        let sparse = SparseExtent::from_kdmv(file.clone(), &h)?;
        let create_type = if sparse.compressed {
            "streamOptimized".to_string()
        } else {
            "monolithicSparse".to_string()
        };
        let mut img = finish(
            vec![Extent::whole_file(sparse, "", &path)],
            desc.unwrap_or_default(),
            Some(create_type),
            &path,
            opts,
        )?;
        if h.unclean_shutdown {
            img.info
                .warnings
                .push("the header's uncleanShutdown flag is set (not closed cleanly)".into());
        }
        return Ok(Box::new(img));
    }
    if magic32 == COWD_MAGIC {
        let h = CowdHeader::parse(&head)?;
        let sparse = SparseExtent::from_cowd(file.clone(), &h)?;
        return bare_sparse(sparse, "", "vmfsSparse", &path, opts);
    }
    if head.len() >= 8 && LE::read_u64(&head[..8]) == SESPARSE_MAGIC {
        // A bare seSparse extent (normally reached through its descriptor).
        let sparse = SparseExtent::from_sesparse(file.clone())?;
        return bare_sparse(sparse, "SESPARSE", "seSparse", &path, opts);
    }
    if len > MAX_DESCRIPTOR_BYTES {
        return Err(Error::limit(format!(
            "not a sparse VMDK and too large ({len} bytes) for a descriptor file (1 MiB limit)"
        ))
        .with_field("descriptor"));
    }
    let raw = file.read_vec(0, len, "descriptor")?;
    if !looks_like_descriptor(&raw) && !raw.starts_with(b"# Disk DescriptorFile") {
        return Err(
            Error::invalid("not a VMDK image: no KDMV/COWD magic and no descriptor text").at(0),
        );
    }
    let d = Descriptor::parse(&raw)?;
    open_descriptor(&path, d, opts)
}

/// Build the extents a descriptor lists; every file goes through the reference gate.
/// The `createType`s a descriptor that lists extents may have: qemu-img's list (checked
/// against qemu-img 10: it refuses every other value, and so does VMware). A type we do not
/// know says the extent lines may mean something else (a raw device map, a partitioned
/// device), so reading them anyway could read the wrong bytes.
const DESCRIPTOR_CREATE_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

pub(super) fn check_descriptor_create_type(create_type: Option<&str>) -> Result<()> {
    match create_type {
        None => Err(Error::invalid(
            "the VMDK descriptor has no createType line (invalid VMDK image descriptor)",
        )
        .with_field("createType")),
        Some(t) if DESCRIPTOR_CREATE_TYPES.contains(&t) => Ok(()),
        Some(t) => Err(Error::unsupported(format!(
            "unsupported VMDK image type '{t}' (a descriptor file may be one of: {})",
            DESCRIPTOR_CREATE_TYPES.join(", ")
        ))
        .with_field("createType")),
    }
}

fn open_descriptor(
    image: &Path,
    d: Descriptor,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockDevice>> {
    check_descriptor_create_type(d.create_type.as_deref())?;
    if d.extents.is_empty() {
        return Err(Error::invalid("VMDK descriptor lists no extents").with_field("descriptor"));
    }
    let mut extents = Vec::with_capacity(d.extents.len());
    let mut start = 0u64;
    let cache_share = d.extents.len();
    let mut gd_bytes = 0u64;
    for (i, e) in d.extents.iter().enumerate() {
        let field = format!("extent {i}");
        let declared = e.sectors.checked_mul(SECTOR).ok_or_else(|| {
            Error::limit("extent size overflows 64 bits").with_field(field.clone())
        })?;
        let name = e.file.clone().unwrap_or_default();
        let open_file = || -> Result<Arc<HostFile>> {
            Ok(Arc::new(opts.open_reference_file(image, &name, &field)?))
        };
        if opts.no_backing && !matches!(e.kind, ExtentType::Zero | ExtentType::Other(_)) {
            // `info` describes extents like qemu-img info even when their files may not be
            // opened: name, type and the descriptor's size.
            if let Err(err) = opts.resolve_reference(image, &name, &field) {
                if err.kind() == crate::ErrorKind::UnsafeReference && e.access != Access::NoAccess {
                    extents.push(Extent {
                        start,
                        size: declared,
                        data: ExtentData::Unopened(err.to_string()),
                        in_main: false,
                        info: extent_info(&name, e.kind.name(), declared, None, false),
                    });
                    start = start
                        .checked_add(declared)
                        .ok_or_else(|| Error::limit("total extent size overflows 64 bits"))?;
                    continue;
                }
            }
        }
        let (size, data, info) = match (&e.kind, e.access) {
            (_, Access::NoAccess) | (ExtentType::Zero, _) => (
                declared,
                ExtentData::Zero,
                extent_info(&name, e.kind.name(), declared, None, false),
            ),
            (ExtentType::Flat | ExtentType::Vmfs, _) => {
                let f = open_file()?;
                let offset = e.offset.checked_mul(SECTOR).ok_or_else(|| {
                    Error::limit("flat extent offset overflows").with_field(field.clone())
                })?;
                (
                    declared,
                    ExtentData::Flat { file: f, offset },
                    extent_info(&name, e.kind.name(), declared, None, false),
                )
            }
            (ExtentType::Sparse | ExtentType::VmfsSparse, _) => {
                let f = open_file()?;
                let head = f.read_vec(0, f.len().min(512), "extent header")?;
                if head.len() < 4 {
                    return Err(Error::invalid("sparse extent file is too small")
                        .with_field(field.clone())
                        .with_path(f.path()));
                }
                let sparse = match LE::read_u32(&head[..4]) {
                    KDMV_MAGIC => {
                        let h = read_kdmv_header(&f).map_err(|e| e.with_path(f.path()))?;
                        if h.capacity == 0 {
                            return Err(Error::invalid(
                                "sparse extent holds a descriptor instead of data",
                            )
                            .with_field(field.clone())
                            .with_path(f.path()));
                        }
                        SparseExtent::from_kdmv(f.clone(), &h)?
                    }
                    COWD_MAGIC => SparseExtent::from_cowd(f.clone(), &CowdHeader::parse(&head)?)?,
                    _ => {
                        return Err(Error::invalid("extent file is not a sparse VMDK extent")
                            .with_field(field.clone())
                            .with_path(f.path()))
                    }
                };
                let mut sparse = sparse;
                sparse.cache_share = cache_share;
                gd_bytes += sparse.gd.len() as u64 * 4;
                if gd_bytes > MAX_TOTAL_GD_BYTES {
                    return Err(Error::limit(format!(
                        "the extents' grain directories exceed {} MiB in total",
                        MAX_TOTAL_GD_BYTES >> 20
                    ))
                    .with_field(field.clone()));
                }
                let info = extent_info(
                    &name,
                    e.kind.name(),
                    sparse.size,
                    Some(sparse.grain),
                    sparse.compressed,
                );
                // Like qemu, the sparse header's capacity is the extent's size.
                (sparse.size, ExtentData::Sparse(sparse), info)
            }
            (ExtentType::SeSparse, _) => {
                let f = open_file()?;
                let mut sparse =
                    SparseExtent::from_sesparse(f).map_err(|e| e.with_field(field.clone()))?;
                sparse.cache_share = cache_share;
                gd_bytes += sparse.gd.len() as u64 * 4;
                if gd_bytes > MAX_TOTAL_GD_BYTES {
                    return Err(Error::limit(
                        "the extents' grain directories are too big in total",
                    )
                    .with_field(field.clone()));
                }
                let info =
                    extent_info(&name, e.kind.name(), sparse.size, Some(sparse.grain), false);
                (sparse.size, ExtentData::Sparse(sparse), info)
            }
            (ExtentType::Other(t), _) => {
                return Err(Error::unsupported(format!("VMDK extent type '{t}'")).with_field(field))
            }
        };
        extents.push(Extent {
            start,
            size,
            data,
            in_main: false,
            info,
        });
        start = start
            .checked_add(size)
            .ok_or_else(|| Error::limit("total extent size overflows 64 bits"))?;
    }
    let ct = d.create_type.clone();
    Ok(Box::new(finish(extents, d, ct, image, opts)?))
}

/// An image made of one sparse extent file opened directly (COWD, bare seSparse), with
/// no descriptor.
fn bare_sparse(
    sparse: SparseExtent,
    extent_type: &str,
    create_type: &str,
    path: &Path,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockDevice>> {
    Ok(Box::new(finish(
        vec![Extent::whole_file(sparse, extent_type, path)],
        Descriptor::default(),
        Some(create_type.into()),
        path,
        opts,
    )?))
}

fn finish(
    extents: Vec<Extent>,
    d: Descriptor,
    create_type: Option<String>,
    image: &Path,
    opts: &OpenOptions,
) -> Result<VmdkImage> {
    // A delta disk reads unallocated grains from its parent, which is opened only
    // through the reference gate (refused by default) and must carry the CID recorded
    // as our parentCID, as qemu checks.
    let parent = match &d.parent_hint {
        None => None,
        Some(_) if opts.no_backing => None,
        Some(hint) => {
            let p = opts.open_reference(image, hint, "parentFileNameHint", Some(Format::Vmdk))?;
            let pcid = p
                .info()
                .format_specific
                .and_then(|v| v["data"]["cid"].as_u64());
            if pcid != d.parent_cid.map(u64::from) {
                return Err(Error::corrupt(format!(
                    "parent '{hint}' has CID {pcid:x?}, the image expects parentCID {:x?}",
                    d.parent_cid
                ))
                .with_field("parentCID"));
            }
            Some(p)
        }
    };
    let size = extents.last().map(|e| e.start + e.size).unwrap_or(0);
    let cluster = extents.iter().find_map(|e| match &e.data {
        ExtentData::Sparse(s) => Some(s.grain),
        _ => None,
    });
    let mut data = serde_json::Map::new();
    if let Some(c) = d.cid {
        data.insert("cid".into(), c.into());
    }
    if let Some(c) = d.parent_cid {
        data.insert("parent-cid".into(), c.into());
    }
    let ct = create_type.or(d.create_type.clone()).unwrap_or_default();
    data.insert("create-type".into(), ct.into());
    data.insert(
        "extents".into(),
        serde_json::Value::Array(extents.iter().map(|e| e.info.clone()).collect()),
    );
    if let Some(a) = d.ddb("adapterType") {
        data.insert("adapter-type".into(), a.into());
    }
    if let Some(v) = d.ddb("virtualHWVersion") {
        data.insert("hwversion".into(), v.into());
    }
    let referenced = extents
        .iter()
        .filter(|e| !e.in_main)
        .filter_map(|e| e.info.get("filename").and_then(|f| f.as_str()))
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect::<Vec<_>>();
    let info = ImageInfo {
        format: "vmdk".into(),
        virtual_size: size,
        cluster_size: cluster,
        dirty: Some(false),
        backing_file: d.parent_hint.clone(),
        backing_format: d.parent_hint.as_ref().map(|_| "vmdk".to_string()),
        referenced_files: referenced,
        format_specific: Some(serde_json::json!({"type": "vmdk", "data": data})),
        ..Default::default()
    };
    let parent_path = d
        .parent_hint
        .as_ref()
        .filter(|_| parent.is_some())
        .map(|n| image.parent().unwrap_or(Path::new("")).join(n));
    Ok(VmdkImage {
        size,
        extents,
        info,
        parent,
        parent_path,
    })
}

impl VmdkImage {
    fn extent_index(&self, off: u64) -> usize {
        // Zero-sized extents are skipped by looking for the last one starting at or
        // before `off` whose range contains it.
        let i = self.extents.partition_point(|e| e.start <= off);
        let mut j = i.saturating_sub(1);
        while j + 1 < self.extents.len() && self.extents[j].start + self.extents[j].size <= off {
            j += 1;
        }
        j
    }

    fn map_in(&self, e: &Extent, rel: u64, max: u64) -> Result<(u64, MappingKind)> {
        let max = max.min(e.size - rel);
        match &e.data {
            ExtentData::Zero => Ok((max, MappingKind::Zero)),
            ExtentData::Flat { file, offset } => {
                let host = offset.saturating_add(rel);
                let flen = file.len();
                if host >= flen {
                    // Past the end of the flat file: reads as zeros (as qemu does).
                    Ok((max, MappingKind::Unallocated))
                } else {
                    Ok((
                        max.min(flen - host),
                        MappingKind::Data {
                            host: e.in_main.then_some(host),
                        },
                    ))
                }
            }
            ExtentData::Sparse(s) => s.map(rel, max, e.in_main),
            ExtentData::Unopened(why) => Err(Error::unsafe_ref(why.clone())),
        }
    }
}

impl VmdkImage {
    /// This image's own mapping (no parent lookup).
    fn map_own(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = crate::device::map_end(self.size, offset, max_len)?;
        let mut i = self.extent_index(offset);
        let e = &self.extents[i];
        let (mut len, kind) = self.map_in(e, offset - e.start, end - offset)?;
        // Coalesce across extent boundaries when the kinds agree (never host offsets).
        while offset + len < end && offset + len == e_end(&self.extents[i]) {
            i += 1;
            let Some(n) = self.extents.get(i) else { break };
            if n.size == 0 {
                continue;
            }
            let (l2, k2) = self.map_in(n, 0, end - offset - len)?;
            let same = match (kind, k2) {
                (MappingKind::Data { host: None }, MappingKind::Data { host: None }) => true,
                (MappingKind::Data { .. }, _) | (_, MappingKind::Data { .. }) => false,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            len += l2;
            if l2 < n.size {
                break;
            }
        }
        Ok(Mapping { offset, len, kind })
    }

    /// Read this image's own bytes (unallocated ranges as zeros).
    fn read_own(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = &self.extents[self.extent_index(pos)];
            let rel = pos - e.start;
            let n = ((e.size - rel).min((buf.len() - done) as u64)) as usize;
            let part = &mut buf[done..done + n];
            match &e.data {
                ExtentData::Zero => part.fill(0),
                ExtentData::Flat { file, offset } => {
                    let host = offset.saturating_add(rel);
                    let avail = file.len().saturating_sub(host).min(n as u64) as usize;
                    file.read_exact_at(&mut part[..avail], host, "flat extent data")?;
                    part[avail..].fill(0);
                }
                ExtentData::Sparse(s) => s.read(part, rel)?,
                ExtentData::Unopened(why) => return Err(Error::unsafe_ref(why.clone())),
            }
            done += n;
        }
        Ok(())
    }
}

impl BlockDevice for VmdkImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    /// qemu's view, one extent at a time: a flat extent is data where its file holds
    /// bytes and zero data over the file's holes (as qemu's file driver says), a sparse
    /// extent's grains are data, compressed, zero or unallocated (then the parent's, one
    /// level deeper).
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let end = crate::device::map_end(self.size, offset, max_len)?;
        let e = &self.extents[self.extent_index(offset)];
        let rel = offset - e.start;
        let max = (end - offset).min(e.size - rel);
        let mut st = BlockStatus::data(offset, max);
        let (host, file) = match &e.data {
            ExtentData::Zero => {
                (st.zero, st.data) = (true, false);
                return Ok(st);
            }
            ExtentData::Unopened(why) => return Err(Error::unsafe_ref(why.clone())),
            ExtentData::Flat { file, offset: base } => {
                let host = base.saturating_add(rel);
                if host >= file.len() {
                    (st.zero, st.data) = (true, false);
                    return Ok(st);
                }
                st.len = max.min(file.len() - host);
                if let Some((hole, n)) = file.hole_extent(host, st.len) {
                    st.len = n;
                    st.zero = hole;
                }
                (host, file)
            }
            ExtentData::Sparse(sp) => {
                let (len, kind) = sp.map(rel, max, true)?;
                st.len = len;
                st = st.end_in_units(self.size, sp.grain);
                match kind {
                    MappingKind::Data { host: Some(h) } => (h, &sp.file),
                    MappingKind::Data { host: None } => {
                        st.compressed = true;
                        return Ok(st);
                    }
                    MappingKind::Zero => {
                        (st.zero, st.data) = (true, false);
                        return Ok(st);
                    }
                    _ => {
                        (st.present, st.zero, st.data) = (false, true, false);
                        if let Some(p) = &self.parent {
                            if offset < p.virtual_size() {
                                let n = st.len.min(p.virtual_size() - offset);
                                let mut ps = p.block_status(offset, n)?;
                                if ps.file.is_none() && ps.host.is_some() {
                                    ps.file = self.parent_path.clone();
                                }
                                ps.depth += 1;
                                return Ok(ps);
                            }
                        }
                        // Past the parent's end (or without one) qemu's block layer calls
                        // the range zero at this level: depth 0.
                        return Ok(st);
                    }
                }
            }
        };
        st.host = Some(host);
        if !e.in_main {
            st.file = Some(file.path().to_path_buf());
        }
        Ok(st)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let m = self.map_own(offset, max_len)?;
        let Some(p) = &self.parent else {
            return Ok(m);
        };
        if m.kind != MappingKind::Unallocated || offset >= p.virtual_size() {
            return Ok(m);
        }
        let pm = p.map(offset, m.len.min(p.virtual_size() - offset))?;
        Ok(Mapping {
            offset,
            len: pm.len.min(m.len),
            kind: match pm.kind {
                MappingKind::Data { .. } => MappingKind::Data { host: None },
                k => k,
            },
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len())?;
        let Some(p) = &self.parent else {
            return self.read_own(buf, offset);
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let m = self.map_own(pos, (buf.len() - done) as u64)?;
            let n = m.len.min((buf.len() - done) as u64) as usize;
            let part = &mut buf[done..done + n];
            if m.kind == MappingKind::Unallocated {
                let avail = p.virtual_size().saturating_sub(pos).min(n as u64) as usize;
                p.read_at(&mut part[..avail], pos)?;
                part[avail..].fill(0);
            } else {
                self.read_own(part, pos)?;
            }
            done += n;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        self.info.clone()
    }

    fn format(&self) -> Format {
        Format::Vmdk
    }
}

fn e_end(e: &Extent) -> u64 {
    e.start + e.size
}
