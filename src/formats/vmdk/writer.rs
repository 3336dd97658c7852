//! Writing monolithicSparse VMDK (qemu's layout: header, embedded descriptor, redundant
//! grain directory and tables, grain directory and tables, then grains), plus the create
//! options and the embedded descriptor shared with the streamOptimized writer.

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::options::{CreateOptions, OptionHelp};
use crate::writer::{write_all_at, ImageWriter, Sink};

use super::sparse::{
    SparseHeader, CHECK_BYTES, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, GTES_PER_GT,
    MAX_GD_BYTES, SECTOR,
};

/// Options `-O vmdk` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[
    OptionHelp {
        name: "subformat",
        kind: "string",
        help: "monolithicSparse (default) or streamOptimized (VMware/ESXi/AWS import format)",
    },
    OptionHelp {
        name: "adapter_type",
        kind: "string",
        help: "ide (default; lsilogic for streamOptimized), lsilogic, buslogic or legacyESX",
    },
    OptionHelp {
        name: "hwversion",
        kind: "string",
        help: "ddb.virtualHWVersion to record (default 4)",
    },
    OptionHelp {
        name: "compat6",
        kind: "bool",
        help: "VMDK version 6 image (hwversion 6; cannot be combined with hwversion)",
    },
    OptionHelp {
        name: "toolsversion",
        kind: "string",
        help: "ddb.toolsVersion to record (default 2147483647)",
    },
    OptionHelp {
        name: "zeroed_grain",
        kind: "bool",
        help: "enable zeroed-grain grain table entries (header version 2)",
    },
    OptionHelp {
        name: "compression_level",
        kind: "number",
        help: "deflate level 0-9 for streamOptimized grains (default 2: within 1% of level 6 size, faster)",
    },
];

/// Grain size we write: 128 sectors (64 KiB), like VMware and qemu.
pub const GRAIN_SECTORS: u64 = 128;
/// Descriptor space reserved in monolithicSparse files (sectors), like qemu.
pub(super) const DESC_SECTORS: u64 = 20;

/// Which kind of file to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Subformat {
    /// Hosted sparse extent with embedded descriptor and redundant grain directory.
    MonolithicSparse,
    /// Compressed, marker-delimited stream (VMware's OVF/OVA disk format).
    StreamOptimized,
}

/// The parsed create options.
#[derive(Debug, Clone)]
pub struct VmdkOptions {
    /// Output subformat.
    pub subformat: Subformat,
    /// ddb.adapterType.
    pub adapter: String,
    /// ddb.virtualHWVersion.
    pub hwversion: String,
    /// ddb.toolsVersion.
    pub toolsversion: String,
    /// Header version 2 with the zeroed-grain flag.
    pub zeroed_grain: bool,
    /// Deflate level for compressed grains.
    pub level: u32,
    /// Capacity in sectors (the size rounded up to whole sectors).
    pub capacity: u64,
    /// The output's file name, for the descriptor's extent line.
    pub extent_name: String,
    /// `-c` was asked for a subformat whose grains are never compressed.
    pub uncompressed_c: bool,
}

impl VmdkOptions {
    /// Parse and check `opts` the way qemu-img does; `dest` is the output path (its file
    /// name goes into the descriptor's extent line).
    pub fn parse(opts: &CreateOptions, dest: &std::path::Path) -> Result<Self> {
        let subformat = match opts.str_option("subformat").unwrap_or("monolithicSparse") {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "streamOptimized" => Subformat::StreamOptimized,
            s @ ("monolithicFlat" | "twoGbMaxExtentSparse" | "twoGbMaxExtentFlat") => {
                return Err(Error::unsupported(format!(
                    "writing subformat {s} (several files) is not supported; use monolithicSparse or streamOptimized"
                )))
            }
            s => {
                return Err(Error::arg(format!(
                    "option subformat: '{s}' is not monolithicSparse or streamOptimized"
                )))
            }
        };
        let adapter = match opts.str_option("adapter_type") {
            None if subformat == Subformat::StreamOptimized => "lsilogic",
            None => "ide",
            Some(a @ ("ide" | "lsilogic" | "buslogic" | "legacyESX")) => a,
            Some(a) => {
                return Err(Error::arg(format!(
                    "option adapter_type: '{a}' is not ide, lsilogic, buslogic or legacyESX"
                )))
            }
        }
        .to_string();
        let compat6 = opts.bool_option("compat6")?.unwrap_or(false);
        let hw = opts.str_option("hwversion").filter(|h| *h != "undefined");
        let hwversion = match (compat6, hw) {
            (true, Some(_)) => {
                return Err(Error::arg("compat6 cannot be enabled with hwversion set"))
            }
            (true, None) => "6".to_string(),
            (false, Some(h)) => {
                check_text("hwversion", h)?;
                h.to_string()
            }
            (false, None) => "4".to_string(),
        };
        let toolsversion = opts
            .str_option("toolsversion")
            .unwrap_or("2147483647")
            .to_string();
        check_text("toolsversion", &toolsversion)?;
        let level = match opts.str_option("compression_level") {
            // With zlib-rs, level 2 output is under 1% larger than level 6 (qemu's) at about
            // 70% of its CPU time; level 1 would be 10% larger (standard workload).
            None => 2,
            Some(l) => match l.parse::<u32>() {
                Ok(n) if n <= 9 => n,
                _ => {
                    return Err(Error::arg(format!(
                        "option compression_level: '{l}' is not 0-9"
                    )))
                }
            },
        };
        // Like qemu's vmdk driver, which compresses only the grains of a compressed
        // (streamOptimized) extent: `-c` with monolithicSparse is accepted and the
        // grains are stored as they are. The writer says so in a note.
        let uncompressed_c = opts.compress && subformat != Subformat::StreamOptimized;
        if opts.size == 0 {
            // qemu-img creates such a file but neither it nor VMware can open it: an
            // extent of 0 sectors is refused by both.
            return Err(Error::arg(
                "a vmdk cannot be 0 bytes: qemu-img and VMware refuse to open an extent of 0 sectors",
            ));
        }
        let capacity = opts.size.div_ceil(SECTOR);
        // Grain directory entries for 64 KiB grains and 512-entry tables.
        let gd_entries = capacity.div_ceil(GRAIN_SECTORS * u64::from(GTES_PER_GT));
        if gd_entries * 4 > MAX_GD_BYTES {
            return Err(Error::limit(format!(
                "a {} byte VMDK needs a grain directory over the {} MiB limit",
                opts.size,
                MAX_GD_BYTES >> 20
            )));
        }
        Ok(VmdkOptions {
            subformat,
            adapter,
            hwversion,
            toolsversion,
            zeroed_grain: opts.bool_option("zeroed_grain")?.unwrap_or(false),
            level,
            capacity,
            extent_name: extent_name(dest),
            uncompressed_c,
        })
    }

    /// The embedded descriptor text.
    pub fn descriptor(&self, create_type: &str, extent_name: &str) -> String {
        let heads: u64 = if self.adapter == "ide" { 16 } else { 255 };
        let stream = self.subformat == Subformat::StreamOptimized;
        let cylinders = if stream {
            // VMware's own stream writer: rounded up, at least 1, capped at 65535.
            self.capacity.div_ceil(63 * heads).clamp(1, 65535)
        } else {
            // qemu's formula, for byte-for-byte familiar monolithicSparse descriptors.
            self.capacity / (63 * heads)
        };
        let encoding = if stream { "encoding=\"UTF-8\"\n" } else { "" };
        // VMware's stream writer also records a content id the importers may compare.
        let long_id = if stream {
            format!(
                "ddb.longContentID = \"{:08x}{:08x}{:08x}{:08x}\"\n",
                new_cid(),
                new_cid(),
                new_cid(),
                new_cid()
            )
        } else {
            String::new()
        };
        format!(
            "# Disk DescriptorFile\nversion=1\n{encoding}CID={:08x}\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n\
             # Extent description\nRW {} SPARSE \"{extent_name}\"\n\n\
             # The Disk Data Base\n#DDB\n\n{long_id}\
             ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
             ddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            new_cid(),
            self.capacity,
            self.hwversion,
            self.adapter,
            self.toolsversion
        )
    }
}

/// Values go into quoted descriptor lines: refuse quotes and line breaks.
fn check_text(key: &str, v: &str) -> Result<()> {
    if v.is_empty() || v.len() > 64 || v.chars().any(|c| c == '"' || c.is_control()) {
        return Err(Error::arg(format!(
            "option {key}: '{v}' must be 1-64 printable characters without quotes"
        )));
    }
    Ok(())
}

/// A content id that is neither of the reserved values 0xffffffff / 0xfffffffe.
fn new_cid() -> u32 {
    let b = crate::writer::random_uuid_v4();
    let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    // 0xfffffffe/0xffffffff mean "no parent" / "unset" in CID fields.
    v & 0x7fff_ffff
}

/// The descriptor's extent name for an output at `dest`: its file name, unless that cannot
/// stand between the descriptor's quotes.
fn extent_name(dest: &std::path::Path) -> String {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `-` (stdout) names no file: a reader of the stream gets the usual default.
    if name.is_empty() || name == "-" || name.contains('"') || name.chars().any(char::is_control) {
        "disk.vmdk".to_string()
    } else {
        name
    }
}

/// Sector layout of a monolithicSparse file (shared with the planned sequential writer,
/// [`super::planned`], so both give the same bytes).
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub gt_count: u64,
    pub gd_sectors: u64,
    pub rgd: u64,
    pub gd: u64,
    pub grain_offset: u64,
}

impl Layout {
    pub fn new(capacity: u64) -> Self {
        let grains = capacity.div_ceil(GRAIN_SECTORS);
        let gt_count = grains.div_ceil(u64::from(GTES_PER_GT));
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
        let gt_sectors = u64::from(GTES_PER_GT) * 4 / SECTOR;
        let rgd = 1 + DESC_SECTORS;
        let gd = rgd + gd_sectors + gt_sectors * gt_count;
        let grain_offset =
            (gd + gd_sectors + gt_sectors * gt_count).next_multiple_of(GRAIN_SECTORS);
        Layout {
            gt_count,
            gd_sectors,
            rgd,
            gd,
            grain_offset,
        }
    }
    /// First sector of grain table `i` in the primary (`redundant == false`) or redundant copy.
    pub fn gt_sector(&self, i: u64, redundant: bool) -> u64 {
        let base = if redundant { self.rgd } else { self.gd };
        base + self.gd_sectors + i * (u64::from(GTES_PER_GT) * 4 / SECTOR)
    }
}

/// The monolithicSparse writer: grains are appended in guest order after the metadata;
/// each grain table is written (twice) as soon as the guest offsets move past it.
#[derive(Debug)]
pub struct SparseWriter {
    file: Sink,
    opts: VmdkOptions,
    layout: Layout,
    next_sector: u64,
    cur_gt: Option<u64>,
    gt: Vec<u32>,
    desc: String,
}

impl SparseWriter {
    /// A writer over the empty `file`.
    pub fn new(file: Sink, opts: VmdkOptions) -> Result<Self> {
        let layout = Layout::new(opts.capacity);
        let desc = opts.descriptor("monolithicSparse", &opts.extent_name);
        if desc.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(Error::arg("descriptor does not fit in 20 sectors"));
        }
        Ok(SparseWriter {
            file,
            layout,
            next_sector: layout.grain_offset,
            cur_gt: None,
            gt: vec![0; GTES_PER_GT as usize],
            desc,
            opts,
        })
    }

    fn flush_gt(&mut self) -> Result<()> {
        if let Some(i) = self.cur_gt.take() {
            let mut b = vec![0u8; self.gt.len() * 4];
            LE::write_u32_into(&self.gt, &mut b);
            for red in [true, false] {
                let off = self.layout.gt_sector(i, red) * SECTOR;
                write_all_at(&self.file, &b, off, "grain table")?;
            }
            self.gt.fill(0);
        }
        Ok(())
    }

    fn header(&self) -> SparseHeader {
        sparse_header(&self.opts, &self.layout)
    }
}

/// The header of a monolithicSparse file of `opts` laid out as `layout`.
pub(super) fn sparse_header(opts: &VmdkOptions, layout: &Layout) -> SparseHeader {
    let z = opts.zeroed_grain;
    SparseHeader {
        version: if z { 2 } else { 1 },
        flags: FLAG_NL_DETECT | FLAG_RGD | if z { FLAG_ZERO_GRAIN } else { 0 },
        capacity: opts.capacity,
        grain_size: GRAIN_SECTORS,
        desc_offset: 1,
        desc_size: DESC_SECTORS,
        num_gtes_per_gt: GTES_PER_GT,
        rgd_offset: layout.rgd,
        gd_offset: layout.gd,
        overhead: layout.grain_offset,
        unclean_shutdown: false,
        check_bytes: CHECK_BYTES,
        compress_algorithm: 0,
    }
}

impl ImageWriter for SparseWriter {
    fn granularity(&self) -> u64 {
        GRAIN_SECTORS * SECTOR
    }

    fn virtual_size(&self) -> u64 {
        self.opts.capacity * SECTOR
    }

    fn warnings(&self) -> Vec<String> {
        if self.opts.uncompressed_c {
            vec![
                "compression has no effect on subformat monolithicSparse: like qemu-img, only streamOptimized grains are compressed".to_string(),
            ]
        } else {
            Vec::new()
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let grain = GRAIN_SECTORS * SECTOR;
        if !offset.is_multiple_of(grain) || offset + data.len() as u64 > self.virtual_size() {
            return Err(Error::arg(format!(
                "vmdk write of {} bytes at {offset:#x} is not grain-aligned or runs past the end",
                data.len()
            )));
        }
        let grains = (data.len() as u64).div_ceil(grain);
        if self.next_sector + grains * GRAIN_SECTORS > u64::from(u32::MAX) {
            return Err(Error::limit(
                "monolithicSparse VMDK cannot hold more than 2 TiB of allocated data",
            ));
        }
        write_all_at(&self.file, data, self.next_sector * SECTOR, "grain data")?;
        for k in 0..grains {
            let g = offset / grain + k;
            let ti = g / u64::from(GTES_PER_GT);
            if self.cur_gt != Some(ti) {
                self.flush_gt()?;
                self.cur_gt = Some(ti);
            }
            self.gt[(g % u64::from(GTES_PER_GT)) as usize] = self.next_sector as u32;
            self.next_sector += GRAIN_SECTORS;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush_gt()?;
        let l = self.layout;
        write_all_at(&self.file, &self.header().to_bytes(), 0, "VMDK header")?;
        write_all_at(&self.file, self.desc.as_bytes(), SECTOR, "VMDK descriptor")?;
        for red in [true, false] {
            let gd: Vec<u32> = (0..l.gt_count)
                .map(|i| l.gt_sector(i, red) as u32)
                .collect();
            let mut b = vec![0u8; gd.len() * 4];
            LE::write_u32_into(&gd, &mut b);
            let at = if red { l.rgd } else { l.gd };
            write_all_at(&self.file, &b, at * SECTOR, "grain directory")?;
        }
        self.file
            .set_len(self.next_sector * SECTOR)
            .map_err(|e| Error::io("setting output length", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu() {
        // qemu-img create -f vmdk x 1G: rgd 21, gd 21+1+16*4=86, grains at 256.
        let l = Layout::new((1u64 << 30) / 512);
        assert_eq!(l.gt_count, 32);
        assert_eq!((l.rgd, l.gd, l.grain_offset), (21, 21 + 1 + 32 * 4, 384));
        let l = Layout::new(0);
        assert_eq!((l.gt_count, l.grain_offset), (0, 128));
    }

    #[test]
    fn options_are_checked() {
        let o = CreateOptions::new(1 << 20);
        let v = VmdkOptions::parse(&o, std::path::Path::new("x.vmdk")).unwrap();
        assert_eq!((v.adapter.as_str(), v.hwversion.as_str()), ("ide", "4"));
        let o = CreateOptions::new(1 << 20)
            .option("compat6", "on")
            .option("hwversion", "7");
        assert!(VmdkOptions::parse(&o, std::path::Path::new("x.vmdk")).is_err());
        let o = CreateOptions::new(1 << 20).option("adapter_type", "scsi");
        assert!(VmdkOptions::parse(&o, std::path::Path::new("x.vmdk")).is_err());
        let o = CreateOptions::new(1 << 20).option("subformat", "streamOptimized");
        let v = VmdkOptions::parse(&o, std::path::Path::new("x.vmdk")).unwrap();
        assert_eq!(v.adapter, "lsilogic");
        assert!(v
            .descriptor("streamOptimized", "x.vmdk")
            .contains("createType=\"streamOptimized\""));
        let o = CreateOptions::new(1 << 20).option("toolsversion", "a\"b");
        assert!(VmdkOptions::parse(&o, std::path::Path::new("x.vmdk")).is_err());
    }
}
