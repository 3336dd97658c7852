//! Writing qcow2 (`-O qcow2`).
//!
//! Layout: cluster 0 holds the header, the active L1 table follows (its size is known
//! from the virtual size), then data clusters are appended in the order they arrive,
//! each L2 table right after the data it maps: a write into the range of a later L2
//! table first appends the tables of the ranges before it (so at most one table is in
//! memory) and sets their L1 entries in place. Writes are split at L2 ranges, so the
//! layout depends only on which clusters are written, not on how the engine batches
//! them: the sequential writer ([`super::stream`]) computes this same layout from a plan
//! and gives the same bytes. `finish` appends the refcount blocks and the refcount
//! table, computed from a run-length list of every allocated cluster, then writes the
//! header. Every cluster is referenced exactly as often as its refcount says, so
//! `qemu-img check` finds neither errors nor leaks.

use std::collections::BTreeMap;
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};

use super::compress;
use super::header::*;
use super::reader::{COMPRESSED, COPIED};
use crate::error::{Error, Result};
use crate::options::{CreateOptions, OptionHelp};
use crate::writer::{write_all_at, Encoder, ImageWriter, Sink};

/// Options `-O qcow2` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[
    OptionHelp {
        name: "compat",
        kind: "string",
        help: "1.1 (default, qcow2 v3) or 0.10 (v2, for old readers)",
    },
    OptionHelp {
        name: "cluster_size",
        kind: "size",
        help: "cluster size, a power of two from 512 to 2M (default 64k)",
    },
    OptionHelp {
        name: "refcount_bits",
        kind: "number",
        help: "width of a refcount: 1, 2, 4, 8, 16 (default), 32 or 64 (compat 0.10: 16 only)",
    },
    OptionHelp {
        name: "lazy_refcounts",
        kind: "bool",
        help: "set the lazy refcounts feature bit (compat 1.1 only; default off)",
    },
    OptionHelp {
        name: "compression_type",
        kind: "string",
        help: "zlib (default) or zstd (compat 1.1 only), used with -c",
    },
    OptionHelp {
        name: "extended_l2",
        kind: "bool",
        help: "128-bit L2 entries with 32 subclusters (compat 1.1, clusters >= 16k; default off)",
    },
    OptionHelp {
        name: "preallocation",
        kind: "string",
        help: "off (the only mode: only clusters holding data are allocated)",
    },
];

/// Refcounts of every host cluster, as runs (allocation is strictly ascending, so the
/// list only grows at its end).
#[derive(Debug, Default, Clone)]
pub(super) struct Refcounts {
    /// (first cluster, cluster count, refcount)
    pub runs: Vec<(u64, u64, u64)>,
    /// The first cluster not allocated yet.
    pub next: u64,
}

impl Refcounts {
    /// Allocate `n` clusters with refcount 1; returns the first.
    pub fn alloc(&mut self, n: u64) -> u64 {
        let first = self.next;
        match self.runs.last_mut() {
            Some((s, l, 1)) if *s + *l == first => *l += n,
            _ => self.runs.push((first, n, 1)),
        }
        self.next += n;
        first
    }
    /// Refcount of the last allocated cluster.
    pub fn tail(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.2)
    }
    /// Add one reference to the last allocated cluster.
    pub fn inc_tail(&mut self) {
        let Some(last) = self.runs.last_mut() else {
            return;
        };
        let rc = last.2 + 1;
        if last.1 == 1 {
            last.2 = rc;
        } else {
            last.1 -= 1;
            let c = last.0 + last.1;
            self.runs.push((c, 1, rc));
        }
    }
}

/// Compresses one cluster on the engine's worker threads.
pub(super) struct ClusterEncoder {
    pub ctype: CompressionType,
    pub cluster_size: usize,
}

impl Encoder for ClusterEncoder {
    fn encode(&self, _offset: u64, data: &[u8]) -> Result<Option<Vec<u8>>> {
        compress::compress(self.ctype, data, self.cluster_size)
    }
}

/// The qcow2 image writer.
pub struct Qcow2Writer {
    file: Sink,
    size: u64,
    cluster_bits: u32,
    cs: u64,
    version: u32,
    lazy_refcounts: bool,
    ctype: CompressionType,
    extended_l2: bool,
    refcount_order: u32,
    compress: bool,
    l1_offset: u64,
    l1_size: u64,
    l2_entries: u64,
    refs: Refcounts,
    /// L2 tables not yet written, by L1 index, as words (two per entry with extended L2).
    pending: BTreeMap<u64, Vec<u64>>,
    /// Free byte in the last allocated cluster where compressed data may continue.
    cfree: Option<u64>,
    /// End of the last write (writes must ascend).
    written_to: u64,
}

/// The image shape `-o` asks for, checked: shared by the file writer and the sequential
/// writer ([`super::stream`]) so both accept and refuse exactly the same options.
#[derive(Debug, Clone, Copy)]
pub(super) struct Params {
    pub size: u64,
    pub cluster_bits: u32,
    pub cs: u64,
    pub version: u32,
    pub lazy_refcounts: bool,
    pub ctype: CompressionType,
    pub extended_l2: bool,
    pub refcount_order: u32,
    pub compress: bool,
    /// Guest clusters one L2 table maps.
    pub l2_entries: u64,
    /// Entries of the L1 table.
    pub l1_size: u64,
}

/// Check `opts` and work out the image shape.
pub(super) fn parse_options(opts: &CreateOptions) -> Result<Params> {
    let version = match opts.str_option("compat").unwrap_or("1.1") {
        "1.1" | "v3" => 3,
        "0.10" | "v2" => 2,
        other => {
            return Err(Error::arg(format!(
                "option compat: '{other}' is not 0.10 or 1.1"
            )))
        }
    };
    let cs = opts.size_option("cluster_size")?.unwrap_or(64 << 10);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::arg(format!(
            "option cluster_size: {cs} is not a power of two between 512 and 2M"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    let refcount_bits = match opts.str_option("refcount_bits") {
        None => 16,
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map_err(|_| Error::arg(format!("option refcount_bits: '{v}' is not a number")))?,
    };
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Error::arg(format!(
            "option refcount_bits: {refcount_bits} is not one of 1, 2, 4, 8, 16, 32, 64"
        )));
    }
    if version == 2 && refcount_bits != 16 {
        return Err(Error::arg(
            "option refcount_bits: compat 0.10 images only support 16-bit refcounts",
        ));
    }
    let lazy_refcounts = opts.bool_option("lazy_refcounts")?.unwrap_or(false);
    if lazy_refcounts && version == 2 {
        return Err(Error::arg(
            "option lazy_refcounts: needs compat 1.1 (qcow2 v3)",
        ));
    }
    let ctype = match opts.str_option("compression_type").unwrap_or("zlib") {
        "zlib" => CompressionType::Zlib,
        "zstd" => CompressionType::Zstd,
        other => {
            return Err(Error::arg(format!(
                "option compression_type: '{other}' is not zlib or zstd"
            )))
        }
    };
    if ctype == CompressionType::Zstd && version == 2 {
        return Err(Error::arg(
            "option compression_type: zstd needs compat 1.1 (qcow2 v3)",
        ));
    }
    let extended_l2 = opts.bool_option("extended_l2")?.unwrap_or(false);
    if extended_l2 && version == 2 {
        return Err(Error::arg(
            "option extended_l2: needs compat 1.1 (qcow2 v3)",
        ));
    }
    if extended_l2 && cs < 16 << 10 {
        return Err(Error::arg(
            "option extended_l2: needs a cluster size of at least 16k",
        ));
    }
    match opts.str_option("preallocation").unwrap_or("off") {
        "off" => {}
        other => {
            return Err(Error::arg(format!(
                "option preallocation: '{other}' is not supported (only off)"
            )))
        }
    }
    // qemu works in 512-byte sectors and rounds the size up when it creates an image
    // (and down when it opens one), so a sector multiple keeps every byte readable.
    let size = opts
        .size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::arg(format!("virtual size {} is too large", opts.size)))?;
    let l2_entries = cs / if extended_l2 { 16 } else { 8 };
    let l1_size = size.div_ceil(cs * l2_entries);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error::arg(format!(
            "virtual size {} is too large for {cs}-byte clusters (the L1 table would exceed {} MiB); use a larger cluster_size",
            size,
            MAX_L1_BYTES >> 20
        )));
    }
    Ok(Params {
        size,
        cluster_bits,
        cs,
        version,
        lazy_refcounts,
        ctype,
        extended_l2,
        refcount_order: refcount_bits.trailing_zeros(),
        compress: opts.compress,
        l2_entries,
        l1_size,
    })
}

/// Make a qcow2 writer over `file` (empty) from `opts`.
pub fn create_writer(file: Sink, opts: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    let Params {
        size,
        cluster_bits,
        cs,
        version,
        lazy_refcounts,
        ctype,
        extended_l2,
        refcount_order,
        compress,
        l2_entries,
        l1_size,
    } = parse_options(opts)?;
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let mut refs = Refcounts::default();
    refs.alloc(1 + l1_clusters);
    Ok(Box::new(Qcow2Writer {
        file,
        size,
        cluster_bits,
        cs,
        version,
        lazy_refcounts,
        ctype,
        extended_l2,
        refcount_order,
        compress,
        l1_offset: if l1_size == 0 { 0 } else { cs },
        l1_size,
        l2_entries,
        refs,
        pending: BTreeMap::new(),
        cfree: None,
        written_to: 0,
    }))
}

impl Qcow2Writer {
    fn words_per_entry(&self) -> u64 {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }

    fn set_entry(&mut self, guest_cluster: u64, entry: u64, bitmap: u64) {
        let l1 = guest_cluster / self.l2_entries;
        let idx = (guest_cluster % self.l2_entries) * self.words_per_entry();
        let words = (self.cs / 8) as usize;
        let t = self.pending.entry(l1).or_insert_with(|| vec![0u64; words]);
        t[idx as usize] = entry;
        if self.extended_l2 {
            t[idx as usize + 1] = bitmap;
        }
    }

    /// Write every pending L2 table whose L1 index is below `keep_from`.
    fn flush_tables(&mut self, keep_from: u64) -> Result<()> {
        while let Some((&l1, _)) = self.pending.first_key_value() {
            if l1 >= keep_from {
                break;
            }
            let t = self.pending.remove(&l1).expect("key just seen");
            let host = self.refs.alloc(1) * self.cs;
            self.cfree = None;
            let mut bytes = vec![0u8; self.cs as usize];
            BigEndian::write_u64_into(&t, &mut bytes);
            write_all_at(&self.file, &bytes, host, "L2 table")?;
            let mut e = [0u8; 8];
            BigEndian::write_u64(&mut e, host | COPIED);
            write_all_at(&self.file, &e, self.l1_offset + l1 * 8, "L1 entry")?;
        }
        Ok(())
    }

    fn check_order(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size && offset >= self.written_to && offset.is_multiple_of(self.cs))
            .ok_or_else(|| {
                Error::arg(format!(
                    "qcow2 writer: write of {len} bytes at {offset:#x} is out of order, unaligned or past the virtual size"
                ))
            })?;
        self.written_to = end;
        Ok(())
    }

    fn refcount_entries_per_block(&self) -> u64 {
        (self.cs * 8) >> self.refcount_order
    }

    /// Serialise refcount block `b` (covering clusters [b*E, (b+1)*E)) into `out`,
    /// advancing `run` through the run list.
    fn fill_block(&self, b: u64, run: &mut usize, out: &mut [u8]) {
        fill_refcount_block(&self.refs.runs, self.refcount_order, self.cs, b, run, out);
    }
}

/// Serialise refcount block `b` (covering clusters [b*E, (b+1)*E) for E entries of
/// `2^order` bits in a `cs`-byte block) from the ascending run list `runs` into `out`,
/// advancing `run` through the list (so consecutive blocks cost one pass in all).
pub(super) fn fill_refcount_block(
    runs: &[(u64, u64, u64)],
    order: u32,
    cs: u64,
    b: u64,
    run: &mut usize,
    out: &mut [u8],
) {
    let e = (cs * 8) >> order;
    let (lo, hi) = (b * e, (b + 1) * e);
    let bits = 1u64 << order;
    out.fill(0);
    while *run < runs.len() {
        let (s, l, rc) = runs[*run];
        let (a, z) = (s.max(lo), (s + l).min(hi));
        for c in a..z {
            let i = c - lo;
            match bits {
                64 => BigEndian::write_u64(&mut out[(i * 8) as usize..], rc),
                32 => BigEndian::write_u32(&mut out[(i * 4) as usize..], rc as u32),
                16 => BigEndian::write_u16(&mut out[(i * 2) as usize..], rc as u16),
                8 => out[i as usize] = rc as u8,
                _ => {
                    let bit = i * bits;
                    out[(bit / 8) as usize] |= (rc as u8) << (bit % 8);
                }
            }
        }
        if s + l > hi {
            break;
        }
        *run += 1;
    }
}

/// The header cluster's bytes (header, extensions and, when they fit, qemu's feature
/// name table) for an image of shape `p` with its tables at these offsets.
pub(super) fn header_bytes(
    p: &Params,
    l1_offset: u64,
    reftable: u64,
    reftable_clusters: u64,
) -> Result<Vec<u8>> {
    let h = {
        let v3 = p.version >= 3;
        let mut incompat = 0;
        if p.ctype == CompressionType::Zstd {
            incompat |= INCOMPAT_COMPRESSION;
        }
        if p.extended_l2 {
            incompat |= INCOMPAT_EXTL2;
        }
        Header {
            version: p.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: p.cluster_bits,
            size: p.size,
            crypt_method: 0,
            l1_size: p.l1_size as u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: reftable,
            refcount_table_clusters: reftable_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompat,
            compatible_features: if p.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: p.refcount_order,
            header_length: if v3 { V3_HEADER_LEN as u32 } else { 72 },
            compression_type: if p.ctype == CompressionType::Zstd {
                1
            } else {
                0
            },
        }
    };
    h.validate()?;
    let mut head = h.to_bytes();
    let mut ext = Extensions::default();
    if p.version >= 3 {
        ext.features = Extensions::qemu_feature_table();
        if (head.len() + ext.to_bytes().len()) as u64 > p.cs {
            ext.features.clear();
        }
    }
    head.extend_from_slice(&ext.to_bytes());
    Ok(head)
}

impl ImageWriter for Qcow2Writer {
    fn granularity(&self) -> u64 {
        self.cs
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn encoder(&self) -> Option<Arc<dyn Encoder>> {
        self.compress.then(|| {
            Arc::new(ClusterEncoder {
                ctype: self.ctype,
                cluster_size: self.cs as usize,
            }) as Arc<dyn Encoder>
        })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_order(offset, data.len() as u64)?;
        let cs = self.cs;
        let span = self.l2_entries * cs;
        let mut done = 0u64;
        while done < data.len() as u64 {
            // One L2 range at a time, its predecessors' tables appended first.
            let at = offset + done;
            let piece = (span - at % span).min(data.len() as u64 - done);
            let first = at / cs;
            self.flush_tables(first / self.l2_entries)?;
            let n = piece.div_ceil(cs);
            let host = self.refs.alloc(n) * cs;
            self.cfree = None;
            if host + n * cs > 1 << 56 {
                return Err(Error::limit(
                    "qcow2 data would lie beyond 64 PiB, which L2 entries cannot address",
                ));
            }
            let d = &data[done as usize..(done + piece) as usize];
            write_all_at(&self.file, d, host, "guest data")?;
            for i in 0..n {
                self.set_entry(first + i, (host + i * cs) | COPIED, 0xffff_ffff);
            }
            done += piece;
        }
        Ok(())
    }

    fn write_encoded(&mut self, offset: u64, data: &[u8], encoded: Vec<u8>) -> Result<()> {
        let n = encoded.len() as u64;
        if n == 0 || n >= self.cs {
            return self.write(offset, data);
        }
        self.check_order(offset, data.len() as u64)?;
        self.flush_tables(offset / self.cs / self.l2_entries)?;
        let cs = self.cs;
        let max_rc = u64::MAX >> (64 - (1u32 << self.refcount_order));
        let start = match self.cfree {
            Some(p) if self.refs.tail() < max_rc => {
                self.refs.inc_tail();
                let extra = (p + n - 1) / cs - p / cs;
                if extra > 0 {
                    self.refs.alloc(extra);
                }
                p
            }
            _ => {
                let clusters = n.div_ceil(cs);
                self.refs.alloc(clusters) * cs
            }
        };
        let end = start + n;
        let shift = 62 - (self.cluster_bits - 8);
        if end > 1u64 << shift.min(56) {
            return Err(Error::limit(format!(
                "compressed data at host offset {start:#x} is beyond what a {cs}-byte-cluster descriptor can address"
            )));
        }
        write_all_at(&self.file, &encoded, start, "compressed cluster")?;
        self.cfree = (!end.is_multiple_of(cs)).then_some(end);
        let nsect = (end - 1) / 512 - start / 512;
        let guest = offset / cs;
        self.set_entry(guest, COMPRESSED | (nsect << shift) | start, 0);
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush_tables(u64::MAX)?;
        self.cfree = None;
        let cs = self.cs;
        let n = self.refs.next;
        let e = self.refcount_entries_per_block();
        // Refcount blocks cover themselves and the table: find the fixpoint.
        let (mut blocks, mut tclusters) = (0u64, 0u64);
        loop {
            let b = (n + blocks + tclusters).div_ceil(e);
            let t = (b * 8).div_ceil(cs);
            if (b, t) == (blocks, tclusters) {
                break;
            }
            (blocks, tclusters) = (b, t);
        }
        if tclusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::limit(format!(
                "the image needs a refcount table of {} bytes, above qemu's {} MiB limit; use a larger cluster_size",
                tclusters * cs,
                MAX_REFTABLE_BYTES >> 20
            )));
        }
        let first_block = self.refs.alloc(blocks + tclusters);
        let table_cluster = first_block + blocks;

        // Refcount blocks, written in batches of contiguous blocks.
        let batch = ((4u64 << 20) / cs).max(1);
        let mut run = 0usize;
        let mut b = 0u64;
        let mut buf = Vec::new();
        while b < blocks {
            let k = batch.min(blocks - b);
            buf.resize((k * cs) as usize, 0);
            for j in 0..k {
                let lo = (j * cs) as usize;
                self.fill_block(b + j, &mut run, &mut buf[lo..lo + cs as usize]);
            }
            write_all_at(&self.file, &buf, (first_block + b) * cs, "refcount blocks")?;
            b += k;
        }
        let mut table = vec![0u8; (tclusters * cs) as usize];
        for i in 0..blocks {
            BigEndian::write_u64(&mut table[(i * 8) as usize..], (first_block + i) * cs);
        }
        write_all_at(&self.file, &table, table_cluster * cs, "refcount table")?;

        let p = Params {
            size: self.size,
            cluster_bits: self.cluster_bits,
            cs,
            version: self.version,
            lazy_refcounts: self.lazy_refcounts,
            ctype: self.ctype,
            extended_l2: self.extended_l2,
            refcount_order: self.refcount_order,
            compress: self.compress,
            l2_entries: self.l2_entries,
            l1_size: self.l1_size,
        };
        let head = header_bytes(&p, self.l1_offset, table_cluster * cs, tclusters)?;
        write_all_at(&self.file, &head, 0, "qcow2 header")?;
        let total = self.refs.next * cs;
        self.file
            .set_len(total)
            .map_err(|e| Error::io("setting output length", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_runs_track_shared_tail() {
        let mut r = Refcounts::default();
        assert_eq!(r.alloc(3), 0);
        r.inc_tail();
        r.inc_tail();
        assert_eq!(r.tail(), 3);
        assert_eq!(r.alloc(2), 3);
        assert_eq!(r.runs, vec![(0, 2, 1), (2, 1, 3), (3, 2, 1)]);
    }
}
