//! qemu's `qcow2_measure`: the size a qcow2 output of a source needs, by qemu's formula
//! (metadata for a fully allocated image of the virtual size, plus the source's data
//! clusters), so the numbers equal qemu-img measure's.

use super::header::MAX_L1_BYTES;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::options::{CreateOptions, QemuOptKind};

/// qemu's `qcow2_refcount_metadata_size`: refcount blocks and table clusters needed to
/// count `clusters` clusters and themselves (the fixed point).
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// qemu's `qcow2_calc_prealloc_size`: header, every L2 and L1 entry, refcounts, data.
fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.next_multiple_of(cs);
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).next_multiple_of(cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

/// The options qemu's qcow2 driver declares for creation (besides the file protocol's),
/// all of which qemu-img measure accepts; the formula reads only some of them.
pub(crate) const QEMU_OPTIONS: &[(&str, QemuOptKind)] = &[
    ("size", QemuOptKind::Size),
    ("compat", QemuOptKind::Str),
    ("backing_file", QemuOptKind::Str),
    ("backing_fmt", QemuOptKind::Str),
    ("data_file", QemuOptKind::Str),
    ("data_file_raw", QemuOptKind::Bool),
    ("encryption", QemuOptKind::Bool),
    ("encrypt.format", QemuOptKind::Str),
    ("encrypt.key-secret", QemuOptKind::Str),
    ("encrypt.cipher-alg", QemuOptKind::Str),
    ("encrypt.cipher-mode", QemuOptKind::Str),
    ("encrypt.ivgen-alg", QemuOptKind::Str),
    ("encrypt.ivgen-hash-alg", QemuOptKind::Str),
    ("encrypt.hash-alg", QemuOptKind::Str),
    ("encrypt.iter-time", QemuOptKind::Number),
    ("cluster_size", QemuOptKind::Size),
    ("extended_l2", QemuOptKind::Bool),
    ("preallocation", QemuOptKind::Str),
    ("lazy_refcounts", QemuOptKind::Bool),
    ("refcount_bits", QemuOptKind::Number),
    ("compression_type", QemuOptKind::Str),
];

/// What qemu's `qcow2_measure` reads of the options, checked as it checks them.
struct Params {
    cs: u64,
    refcount_order: u32,
    extended_l2: bool,
    version: u32,
    /// preallocation=falloc or full: every data cluster is written.
    prealloc_data: bool,
    has_backing_file: bool,
}

fn params(opts: &CreateOptions) -> Result<Params> {
    let arg = |m: &str| Err(Error::arg(m.to_string()));
    let extended_l2 = opts.bool_option("extended_l2")?.unwrap_or(false);
    let cs = opts.size_option("cluster_size")?.unwrap_or(64 << 10);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return arg("Cluster size must be a power of two between 512 and 2048k");
    }
    if extended_l2 && cs < 16 << 10 {
        return arg(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        );
    }
    let version = match opts.str_option("compat") {
        None | Some("1.1") => 3,
        Some("0.10") => 2,
        Some(other) => return arg(&format!("Invalid compatibility level: '{other}'")),
    };
    let refcount_bits = opts.number_option("refcount_bits")?.unwrap_or(16);
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return arg("Refcount width must be a power of two and may not exceed 64 bits");
    }
    if version < 3 && refcount_bits != 16 {
        return arg(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use compat=1.1 or greater)",
        );
    }
    let prealloc_data = match opts.str_option("preallocation").unwrap_or("off") {
        "off" | "metadata" => false,
        "falloc" | "full" => true,
        other => return arg(&format!("invalid parameter value: {other}")),
    };
    if opts.str_option("encrypt.format") == Some("luks") {
        return Err(Error::unsupported(
            "measure -o encrypt.format=luks: encrypted qcow2 images are not supported",
        ));
    }
    Ok(Params {
        cs,
        refcount_order: refcount_bits.trailing_zeros(),
        extended_l2,
        version,
        prealloc_data,
        has_backing_file: opts.str_option("backing_file").is_some(),
    })
}

/// (required, fully allocated, bitmaps) of a qcow2 with `opts` holding `src`'s data, or,
/// with `src` None, of an empty guest of `size` bytes (`--size`), as qemu's
/// `qcow2_measure` computes them. `size` is the size the options name (0 with a source
/// and no `-o size`): qemu checks its L1 table limit against it only. Data is counted
/// the way qemu counts it: whole clusters touched by ranges stored as data that do not
/// read as zeros (all of them with `backing_file`: the new image's backing is unknown).
/// The bitmaps are the source's persistent bitmaps, for a v3 output of a source that can
/// hold them.
pub fn measure(
    src: Option<&dyn BlockDevice>,
    size: u64,
    opts: &CreateOptions,
) -> Result<(u64, u64, Option<u64>)> {
    let p = params(opts)?;
    let cs = p.cs;
    let l2e = if p.extended_l2 { 16 } else { 8 };
    // qemu's check: one 8-byte L1 entry per L2 table.
    let l2_tables = size.div_ceil(cs).div_ceil(cs / l2e);
    if l2_tables * 8 > MAX_L1_BYTES {
        return Err(Error::arg(
            "The image size is too large (try using a larger cluster size)",
        ));
    }
    let mut virtual_size = size.next_multiple_of(cs);
    let mut data = 0u64;
    if let Some(dev) = src {
        let end = dev.virtual_size();
        virtual_size = end.next_multiple_of(cs);
        if p.has_backing_file {
            data = virtual_size;
        } else {
            let mut off = 0u64;
            while off < end {
                let st = crate::device::qemu_block_status(dev, off, end - off)?;
                let mut len = st.len.max(1);
                if !st.zero && st.data && st.present {
                    len = (off + len).next_multiple_of(cs) - off;
                    data += off % cs + len;
                }
                off += len;
            }
        }
    }
    if p.prealloc_data {
        data = virtual_size;
    }
    let full = prealloc_size(virtual_size, cs, p.refcount_order, p.extended_l2);
    let required = full - virtual_size + data;
    let bitmaps = match src {
        Some(dev) if p.version >= 3 => dev
            .persistent_bitmaps()?
            .map(|list| bitmaps_size(&list, dev.virtual_size(), cs)),
        _ => None,
    };
    Ok((required, full, bitmaps))
}

/// qemu's `qcow2_get_persistent_dirty_bitmap_size`: each bitmap's clusters and its table,
/// as if fully allocated, plus the directory, for a guest of `size` bytes.
fn bitmaps_size(list: &[(String, u64)], size: u64, cs: u64) -> u64 {
    let mut total = 0u64;
    let mut dir = 0u64;
    for (name, granularity) in list {
        let bytes = size.div_ceil(*granularity).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs + (clusters * 8).next_multiple_of(cs);
        dir += (24 + name.len() as u64).next_multiple_of(8);
    }
    total + dir.next_multiple_of(cs)
}
