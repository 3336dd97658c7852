//! Resizing monolithicSparse VMDKs in place, both directions.
//!
//! The size lives in three places: the sparse header's capacity (what qemu and we read),
//! the embedded descriptor's extent line and its `ddb.geometry.cylinders` (what VMware
//! reads). The header sector and the descriptor that follows it are rewritten together in
//! one positional write, the switch; everything the new size needs is written and flushed
//! before it:
//!
//! * grain table entries a shrink left past the old size are cleared (in both the grain
//!   directory's and the redundant directory's tables) and a partial last grain's tail
//!   zeroed, so the new space reads as zeros;
//! * the grain tables for the new directory entries are appended (empty, so the new space
//!   is unallocated; qemu and VMware need the tables to exist before they write a grain),
//!   one set for each directory;
//! * the new directory entries go into the directories' last sector when they fit there,
//!   else both directories are written anew at the end of the file and the switch points
//!   the header at them.
//!
//! Shrinking is the switch alone: grains past the new end stay in the file, unreachable,
//! and are cleared by a later grow before they could surface.
//!
//! streamOptimized images (compressed grains, written once in order), descriptor files
//! with flat or split extents, and delta disks are refused with the reason; `diskconv
//! convert --target-size` writes a resized copy of any of them.

use std::os::unix::fs::FileExt;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::descriptor::Descriptor;
use super::editor::VmdkEditor;
use super::sparse::{SparseHeader, SECTOR};
use crate::device::ImageEditor;
use crate::error::{Error, Result};
use crate::options::{Preallocation, ResizeOptions};

/// Largest monolithicSparse guest: grain table entries are 32-bit sector numbers, so no
/// grain may start at or past 2 TiB (VMware's own limit, 2 TiB less one sector).
pub const MAX_SIZE: u64 = (1 << 41) - SECTOR;

/// `text` with the extent line's size and `ddb.geometry.cylinders` made to describe
/// `sectors`, every other line as it was. Cylinders follow our writer (and qemu):
/// sectors / (heads x sectors per track), from the descriptor's own heads and sectors.
pub fn resized_descriptor(text: &str, sectors: u64) -> Result<String> {
    let d = Descriptor::parse(text.as_bytes())?;
    let num = |k: &str, def: u64| d.ddb(k).and_then(|v| v.trim().parse().ok()).unwrap_or(def);
    let heads: u64 = num("geometry.heads", 16).max(1);
    let spt: u64 = num("geometry.sectors", 63).max(1);
    let mut out = String::with_capacity(text.len() + 16);
    let mut extents = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        let first = t.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            // "RW <sectors> SPARSE "name"": replace the second token only.
            let rest = t[first.len()..].trim_start();
            let size_len = rest.find(char::is_whitespace).unwrap_or(rest.len());
            out.push_str(&format!("{first} {sectors}{}", &rest[size_len..]));
            extents += 1;
            continue;
        }
        if let Some((k, _)) = t.split_once('=') {
            if k.trim() == "ddb.geometry.cylinders" {
                let nl = if line.ends_with('\n') { "\n" } else { "" };
                out.push_str(&format!(
                    "ddb.geometry.cylinders = \"{}\"{nl}",
                    sectors / (heads * spt)
                ));
                continue;
            }
        }
        out.push_str(line);
    }
    if extents != 1 {
        return Err(Error::unsupported(format!(
            "the descriptor has {extents} extent lines, expected one"
        )));
    }
    Ok(out)
}

impl VmdkEditor {
    /// Guest bytes one grain table covers.
    fn gt_span(&self) -> u64 {
        u64::from(self.header.num_gtes_per_gt) * self.grain_bytes()
    }

    /// The switch: the header sector and the descriptor after it, in one write.
    fn switch(&mut self, header: &SparseHeader, desc: &str) -> Result<()> {
        let room = (header.desc_size * SECTOR) as usize;
        if desc.len() > room {
            return Err(Error::limit(format!(
                "the resized descriptor needs {} bytes, more than its {room}-byte space",
                desc.len()
            ))
            .with_path(&self.path));
        }
        let mut buf = vec![0u8; SECTOR as usize + room];
        buf[..SECTOR as usize].copy_from_slice(&header.to_bytes());
        // Bytes of the header sector past the fields (VMware's padding) stay as stored.
        let mut old = [0u8; SECTOR as usize];
        self.file
            .file()
            .read_exact_at(&mut old, 0)
            .map_err(|e| Error::io("reading the VMDK header", e).with_path(&self.path))?;
        buf[79..SECTOR as usize].copy_from_slice(&old[79..]);
        buf[SECTOR as usize..SECTOR as usize + desc.len()].copy_from_slice(desc.as_bytes());
        self.file
            .write_at(&buf, 0, "writing the VMDK header and descriptor")?;
        self.file.sync("flushing the VMDK header and descriptor")
    }

    fn grow(&mut self, new_size: u64) -> Result<()> {
        let old = self.header.capacity * SECTOR;
        let g = self.grain_bytes();
        let span = self.gt_span();
        let old_gde = self.gd.len() as u64;
        let new_gde = new_size.div_ceil(span);
        let per_gt = u64::from(self.header.num_gtes_per_gt);
        let redundant = !self.rgd.is_empty();
        // Everything appended must stay below what 32-bit sector numbers address.
        let sets = if redundant { 2 } else { 1 };
        let worst_end = self.file_len()?.next_multiple_of(SECTOR)
            + sets
                * (new_gde.saturating_sub(old_gde) * self.gt_bytes()
                    + (new_gde * 4).next_multiple_of(SECTOR));
        if worst_end / SECTOR > u64::from(u32::MAX) {
            return Err(Error::limit(format!(
                "the grown VMDK's tables would end at {worst_end:#x}, past the 2 TiB its 32-bit sector numbers address"
            ))
            .with_path(&self.path));
        }

        // Grains a shrink left mapped past the old size (in tables that exist) would
        // surface: clear them in both sets of tables; zero a partial last grain's tail.
        let first = old.div_ceil(g);
        let last = (new_size.div_ceil(g)).min(old_gde * per_gt);
        let mut dirty = false;
        let dirs: Vec<Vec<u32>> = if redundant {
            vec![self.gd.clone(), self.rgd.clone()]
        } else {
            vec![self.gd.clone()]
        };
        let mut t = first;
        while t < last {
            let gi = (t / per_gt) as usize;
            let lo = (t % per_gt) as usize;
            let hi = ((last - gi as u64 * per_gt).min(per_gt)) as usize;
            for dir in &dirs {
                if dir[gi] == 0 {
                    continue;
                }
                let gt = self.read_gt(dir[gi])?;
                if gt[lo..hi].iter().any(|&e| e != 0) {
                    let at = u64::from(dir[gi]) * SECTOR + lo as u64 * 4;
                    let zeros = vec![0u8; (hi - lo) * 4];
                    self.file
                        .write_at(&zeros, at, "clearing stale VMDK grain table entries")?;
                    dirty = true;
                }
            }
            t = (gi as u64 + 1) * per_gt;
        }
        if !old.is_multiple_of(g) {
            let gi = ((old / g) / per_gt) as usize;
            if self.gd[gi] != 0 {
                let gt = self.read_gt(self.gd[gi])?;
                let e = gt[((old / g) % per_gt) as usize];
                if e > 1 {
                    let at = u64::from(e) * SECTOR;
                    let zeros = vec![0u8; (g - old % g) as usize];
                    self.file
                        .write_at(&zeros, at + old % g, "zeroing a VMDK grain's tail")?;
                    dirty = true;
                }
            }
        }

        let mut header = self.header;
        header.capacity = new_size / SECTOR;
        let mut gd = self.gd.clone();
        let mut rgd = self.rgd.clone();
        if new_gde > old_gde {
            // Empty grain tables for the new entries, appended: the file grows by holes.
            let m = new_gde - old_gde;
            let gtb = self.gt_bytes();
            let end = self.file_len()?.next_multiple_of(SECTOR);
            for j in 0..m {
                gd.push(((end + j * gtb) / SECTOR) as u32);
                if redundant {
                    rgd.push(((end + (m + j) * gtb) / SECTOR) as u32);
                }
            }
            let mut tail = end + sets * m * gtb;
            let dir_room = (old_gde * 4).next_multiple_of(SECTOR);
            let dir_bytes = |d: &[u32]| {
                let mut b = vec![0u8; (d.len() * 4).next_multiple_of(SECTOR as usize)];
                for (c, &e) in b.chunks_exact_mut(4).zip(d) {
                    LE::write_u32(c, e);
                }
                b
            };
            if new_gde * 4 <= dir_room {
                let at = |off: u64| off * SECTOR + old_gde * 4;
                let b = dir_bytes(&gd[old_gde as usize..]);
                let n = ((new_gde - old_gde) * 4) as usize;
                self.file
                    .set_len(tail, "appending empty VMDK grain tables")?;
                self.file.write_at(
                    &b[..n],
                    at(self.header.gd_offset),
                    "writing new grain directory entries",
                )?;
                if redundant {
                    let b = dir_bytes(&rgd[old_gde as usize..]);
                    self.file.write_at(
                        &b[..n],
                        at(self.header.rgd_offset),
                        "writing new redundant grain directory entries",
                    )?;
                }
            } else {
                // Both directories anew at the end; the switch points the header there.
                let b = dir_bytes(&gd);
                header.gd_offset = tail / SECTOR;
                self.file
                    .write_at(&b, tail, "writing the grown grain directory")?;
                tail += b.len() as u64;
                if redundant {
                    let b = dir_bytes(&rgd);
                    header.rgd_offset = tail / SECTOR;
                    self.file
                        .write_at(&b, tail, "writing the grown redundant grain directory")?;
                }
            }
            dirty = true;
        }
        if dirty {
            self.file.sync("flushing the new VMDK tables")?;
        }
        let desc = resized_descriptor(&self.desc, header.capacity)?;
        self.switch(&header, &desc)?;
        self.header = header;
        self.desc = desc;
        self.gd = gd;
        self.rgd = rgd;
        Ok(())
    }
}

/// Resize the image to `new_size` in place (see the module doc).
pub(super) fn resize(ed: &mut VmdkEditor, new_size: u64, opts: &ResizeOptions) -> Result<()> {
    if new_size == 0 || !new_size.is_multiple_of(SECTOR) {
        return Err(Error::arg(format!(
            "new VMDK size {new_size} is not a positive multiple of {SECTOR} bytes"
        ))
        .with_path(&ed.path));
    }
    if new_size > MAX_SIZE {
        return Err(Error::limit(format!(
            "new VMDK size {new_size} exceeds the monolithicSparse maximum of {MAX_SIZE} bytes (2 TiB less one sector)"
        ))
        .with_path(&ed.path));
    }
    if opts.preallocation == Preallocation::Full {
        return Err(Error::unsupported(
            "preallocation=full is not supported for sparse VMDKs (grains are allocated as the guest writes them)",
        )
        .with_path(&ed.path));
    }
    let old = ed.virtual_size();
    if new_size == old {
        return Ok(());
    }
    if new_size < old {
        if !opts.shrink {
            return Err(
                Error::arg(crate::options::SHRINK_REFUSED).with_option("ResizeOptions::shrink")
            );
        }
        let mut header = ed.header;
        header.capacity = new_size / SECTOR;
        let desc = resized_descriptor(&ed.desc, header.capacity)?;
        ed.switch(&header, &desc)?;
        ed.gd.truncate(new_size.div_ceil(ed.gt_span()) as usize);
        if !ed.rgd.is_empty() {
            ed.rgd.truncate(ed.gd.len());
        }
        ed.header = header;
        ed.desc = desc;
        return Ok(());
    }
    ed.grow(new_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_lines_change_and_nothing_else() {
        let text = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n# Extent description\nRW 14336 SPARSE \"a.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"14\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n";
        let out = resized_descriptor(text, 2_097_152).unwrap();
        assert!(out.contains("RW 2097152 SPARSE \"a.vmdk\"\n"), "{out}");
        assert!(out.contains("ddb.geometry.cylinders = \"2080\"\n"), "{out}");
        assert_eq!(
            out.replace("2097152", "14336")
                .replace("\"2080\"", "\"14\""),
            text
        );
        let d = Descriptor::parse(out.as_bytes()).unwrap();
        assert_eq!(d.total_sectors().unwrap(), 2_097_152);
    }
}
