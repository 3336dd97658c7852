//! Writing a conversion into an existing monolithicSparse VMDK in place (`convert -n`),
//! keeping its grain size, tables and descriptor.
//!
//! Data goes into the grains the grain tables name, in place; a grain not stored (entry 0,
//! or 1: a zeroed grain) gets a new one past the end of the file, as qemu and VMware
//! append them. A grain table the directory lacks is appended too (one per directory).
//! In batches, once the new grains' data is flushed: the changed grain table entries in
//! both the directory's and the redundant directory's tables, and the new tables whole,
//! then a flush, then the directory entries of the new tables, then a flush. A failure
//! leaves every entry naming a grain that holds its data, or unchanged with its new grain
//! unreferenced at the end of the file (`qemu-img check` has no leak count for VMDK).
//! Ranges zero in the source get zeros where a grain is stored (see [`crate::inplace`]).
//!
//! Refused before any write, with the reason: streamOptimized images (compressed grains
//! packed back to back and written once in order: none can be overwritten, which qemu-img
//! finds out only at the first allocated grain, after writing the ones before it),
//! descriptor files with split extents (monolithicFlat ones go to
//! [`super::inplace_flat`]), delta disks (their unallocated grains read the parent), and an
//! image smaller than the conversion.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::descriptor::Descriptor;
use super::editor::{open_vmdk, VmdkEditor};
use super::sparse::{SparseHeader, FLAG_MARKERS, GD_AT_END, KDMV_MAGIC, SECTOR};
use crate::device::ImageEditor;
use crate::error::{Error, Result};
use crate::inplace::{target_too_small, BlockMap, BlockWriter, InPlaceOptions};
use crate::writer::{EditFile, ImageWriter};

/// New grains a batch holds before their table entries are written.
const BATCH_GRAINS: u64 = 16384;

/// A grain table this batch reads or changes.
struct Table {
    words: Vec<u32>,
    /// Appended by this batch: written whole, then named by the directories.
    fresh: bool,
    lo: usize,
    hi: usize,
}

/// The grain tables as [`BlockWriter`] uses them.
struct VmdkMap {
    ed: VmdkEditor,
    tables: BTreeMap<usize, Table>,
    /// Where the next grain or table goes (the end of everything allocated).
    end: u64,
    file_len: u64,
    pending: u64,
}

/// Open the VMDK in `file` for a conversion to write into (see the module comment; a
/// monolithicFlat descriptor goes to [`super::inplace_flat`]).
pub fn open_in_place(
    file: File,
    path: &Path,
    opts: &InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    let mut head = vec![0u8; 64 << 10];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(Error::io("reading the VMDK header", e).with_path(path)),
        }
    }
    head.truncate(n);
    if n >= 512 && LE::read_u32(&head) == KDMV_MAGIC {
        let h = SparseHeader::parse(&head[..512]).map_err(|e| e.with_path(path))?;
        if h.compressed() || h.flags & FLAG_MARKERS != 0 || h.gd_offset == GD_AT_END {
            return Err(Error::unsupported(
                "a streamOptimized VMDK cannot be written into in place: its grains are compressed and packed back to back, written once in order, so none can be overwritten or added between them; convert into a new streamOptimized image instead",
            )
            .with_path(path));
        }
    } else if let Ok(d) = Descriptor::parse(&head) {
        match d.create_type.as_deref() {
            Some("monolithicFlat") => {
                return super::inplace_flat::open_in_place(file, path, &head, opts);
            }
            Some(t) => {
                return Err(Error::unsupported(format!(
                    "a {t} VMDK cannot be written into in place: only monolithicSparse and monolithicFlat ones can (convert into a new image instead)"
                ))
                .with_path(path))
            }
            None => {}
        }
    }
    let ed = open_vmdk(file, path, opts.fail_at_write)?;
    let size = ed.virtual_size();
    if size < opts.size {
        return Err(target_too_small(size, opts.size));
    }
    let file_len = ed.file_len()?;
    let gran = ed.grain_bytes().min(64 << 10);
    let map = VmdkMap {
        ed,
        tables: BTreeMap::new(),
        end: file_len.next_multiple_of(SECTOR),
        file_len,
        pending: 0,
    };
    Ok(Box::new(BlockWriter::new(map, opts, gran)))
}

impl VmdkMap {
    fn per_gt(&self) -> u64 {
        u64::from(self.ed.header.num_gtes_per_gt)
    }

    /// Grain table `gi`, loaded (None when the directory names none).
    fn table(&mut self, gi: usize) -> Result<Option<&mut Table>> {
        if !self.tables.contains_key(&gi) {
            let s = self.ed.gd[gi];
            if s == 0 {
                return Ok(None);
            }
            let words = self.ed.read_gt(s)?;
            // One table at a time stays loaded unless it changed.
            self.tables.retain(|_, t| t.fresh || t.lo < t.hi);
            self.tables.insert(
                gi,
                Table {
                    words,
                    fresh: false,
                    lo: usize::MAX,
                    hi: 0,
                },
            );
        }
        Ok(self.tables.get_mut(&gi))
    }

    /// Room for `bytes` at the end, sector aligned.
    fn take(&mut self, bytes: u64) -> Result<u64> {
        let at = self.end;
        self.end = (at + bytes).next_multiple_of(SECTOR);
        if self.end / SECTOR > u64::from(u32::MAX) {
            return Err(Error::limit(format!(
                "a new VMDK grain at {at:#x} would lie past the 2 TiB a grain table entry can address"
            ))
            .with_path(&self.ed.path));
        }
        Ok(at)
    }

    fn write_words(&mut self, sector: u32, first: usize, words: &[u32], what: &str) -> Result<()> {
        let mut b = vec![0u8; words.len() * 4];
        for (c, w) in b.chunks_exact_mut(4).zip(words) {
            LE::write_u32(c, *w);
        }
        self.ed
            .file
            .write_at(&b, u64::from(sector) * SECTOR + first as u64 * 4, what)
    }

    /// The pending grains' table entries (and new tables' directory entries), in both
    /// directories, after the grains themselves are flushed.
    fn write_tables(&mut self) -> Result<()> {
        if self.file_len < self.end {
            self.ed
                .file
                .set_len(self.end, "extending the VMDK to its new grains")?;
            self.file_len = self.end;
        }
        self.ed.file.sync("flushing the new VMDK grains")?;
        self.ed.mark_changing()?;
        let tables = std::mem::take(&mut self.tables);
        let mut fresh = Vec::new();
        for (&gi, t) in &tables {
            let dirs = [Some(self.ed.gd[gi]), self.ed.rgd.get(gi).copied()];
            let (lo, hi) = if t.fresh {
                fresh.push(gi);
                (0, t.words.len())
            } else {
                (t.lo, t.hi)
            };
            if lo >= hi {
                continue;
            }
            for s in dirs.into_iter().flatten() {
                self.write_words(s, lo, &t.words[lo..hi], "writing VMDK grain table entries")?;
            }
        }
        self.ed.file.sync("flushing the VMDK grain tables")?;
        if !fresh.is_empty() {
            let h = self.ed.header;
            for gi in fresh {
                let (g, r) = (self.ed.gd[gi], self.ed.rgd.get(gi).copied());
                self.write_words(
                    h.gd_offset as u32,
                    gi,
                    &[g],
                    "writing a VMDK grain directory entry",
                )?;
                if let Some(r) = r {
                    self.write_words(
                        h.rgd_offset as u32,
                        gi,
                        &[r],
                        "writing a VMDK grain directory entry",
                    )?;
                }
            }
            self.ed.file.sync("flushing the VMDK grain directories")?;
        }
        self.pending = 0;
        Ok(())
    }
}

impl BlockMap for VmdkMap {
    fn block_size(&self) -> u64 {
        self.ed.grain_bytes()
    }

    fn file(&mut self) -> &mut EditFile {
        &mut self.ed.file
    }

    fn stored(&mut self, b: u64) -> Result<Option<u64>> {
        let per = self.per_gt();
        let (gi, k) = ((b / per) as usize, (b % per) as usize);
        Ok(match self.table(gi)? {
            Some(t) if t.words[k] > 1 => Some(u64::from(t.words[k]) * SECTOR),
            _ => None,
        })
    }

    fn allocate(&mut self, b: u64) -> Result<u64> {
        let per = self.per_gt();
        let (gi, k) = ((b / per) as usize, (b % per) as usize);
        if self.table(gi)?.is_none() {
            // Both copies of the new table go before the grain, so a reader never finds
            // a table past the end of the file.
            let gt = self.ed.gt_bytes();
            let copies = if self.ed.rgd.is_empty() { 1 } else { 2 };
            let at = self.take(gt * copies)?;
            self.ed.gd[gi] = (at / SECTOR) as u32;
            if copies == 2 {
                self.ed.rgd[gi] = ((at + gt.next_multiple_of(SECTOR)) / SECTOR) as u32;
            }
            self.tables.insert(
                gi,
                Table {
                    words: vec![0; per as usize],
                    fresh: true,
                    lo: usize::MAX,
                    hi: 0,
                },
            );
        }
        let host = self.take(self.ed.grain_bytes())?;
        let t = self.tables.get_mut(&gi).expect("loaded or created");
        t.words[k] = (host / SECTOR) as u32;
        t.lo = t.lo.min(k);
        t.hi = t.hi.max(k + 1);
        self.pending += 1;
        // Bytes a longer file held there must not show (normally past its end).
        if host < self.file_len {
            let n = (self.file_len - host).min(self.ed.grain_bytes());
            self.ed
                .file
                .zero_range(host, n, "zeroing a new VMDK grain")?;
        }
        Ok(host)
    }

    fn commit(&mut self, finish: bool) -> Result<()> {
        if self.pending > 0 && (finish || self.pending >= BATCH_GRAINS) {
            self.write_tables()?;
        }
        if finish {
            self.ed.unmark_changing()?;
        }
        Ok(())
    }
}
