//! Writing a conversion into an existing image in place (qemu-img's `convert -n`): the
//! options, the ranges to zero, and the writer shared by the formats whose data lives in
//! blocks found through a table (vdi, vhd, vmdk, vhdx).
//!
//! The engine hands over guest data in ascending order and never the ranges that are zero
//! in the source. In place those ranges still hold the target's old bytes, so unless the
//! caller says the target already reads as zeros (`--target-is-zero`), every range between
//! two writes, and the one after the last, is made to read as zeros, as qemu-img does by
//! writing zeros over them. A stored block keeps its place and gets zeros (so a
//! preallocated image stays preallocated); a block not stored already reads as zeros.
//! Bytes past the conversion's size keep their content.
//!
//! Order of writes, for a failure at any of them: data goes into blocks the tables already
//! name (overwritten in place) or into new blocks past everything the tables name; only
//! then do the table entries that name the new blocks follow. A failure leaves an image the
//! format's checker accepts: every entry names a block holding its data, and new blocks
//! whose entries were not written yet are unreferenced space at the end of the file.

use crate::error::{Error, Result};
use crate::writer::{EditFile, ImageWriter};

/// How an in-place writer writes into an existing image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InPlaceOptions {
    /// Guest bytes the conversion covers from offset 0 (the source's size, or its target
    /// size): the image must hold at least this many; bytes past it keep their content.
    pub size: u64,
    /// The image already reads as zeros, so ranges the engine leaves unwritten are not
    /// zeroed (qemu-img's `--target-is-zero`).
    pub target_is_zero: bool,
    /// How the image's own references (a qcow2 backing file) may be opened, for the one
    /// case that reads them: a last cluster the conversion fills only in part, whose rest
    /// the backing file supplies. Refused unless `allow_references` is set.
    pub open: crate::options::OpenOptions,
    /// Test hook: make the Nth mutation (write, length change, flush) fail with EIO, to
    /// prove that a failure at any point leaves an image its checker accepts.
    #[doc(hidden)]
    pub fail_at_write: Option<u64>,
}

/// The error for an existing image smaller than the conversion, refused before any write
/// (qemu-img's words first).
pub fn target_too_small(target: u64, needed: u64) -> Error {
    Error::arg(format!(
        "output file is smaller than input file (the image holds {target} guest bytes, the input needs {needed})"
    ))
}

/// The ranges an in-place writer must zero: those between the engine's writes.
#[derive(Debug, Clone)]
pub struct Gaps {
    next: u64,
    size: u64,
    skip: bool,
}

impl Gaps {
    /// Gaps over `[0, opts.size)`; none at all with `target_is_zero`.
    pub fn new(opts: &InPlaceOptions) -> Self {
        Gaps {
            next: 0,
            size: opts.size,
            skip: opts.target_is_zero,
        }
    }

    /// Before a write of `[off, off+len)`: the range since the previous write, when there
    /// is one to zero.
    pub fn before(&mut self, off: u64, len: u64) -> Option<(u64, u64)> {
        let gap = (off > self.next && !self.skip).then_some((self.next, off));
        self.next = self.next.max(off + len);
        gap
    }

    /// After the last write: the range from it to the end, when there is one to zero.
    pub fn rest(&mut self) -> Option<(u64, u64)> {
        let size = self.size;
        self.before(size, 0)
    }
}

/// A format's table of blocks, as [`BlockWriter`] needs it.
pub trait BlockMap: Send {
    /// Guest bytes per block (a power of two).
    fn block_size(&self) -> u64;
    /// The file, for data writes.
    fn file(&mut self) -> &mut EditFile;
    /// Host offset of block `b`'s first guest byte when the block is stored (allocated
    /// before or by this conversion); None when it is not, and reads as zeros.
    fn stored(&mut self, b: u64) -> Result<Option<u64>>;
    /// Store block `b`, which is not stored: the host offset of a new block past
    /// everything the tables name, whose bytes read as zeros. Its table entry may wait
    /// for [`commit`](Self::commit).
    fn allocate(&mut self, b: u64) -> Result<u64>;
    /// Guest bytes `[from, to)` of block `b` (offsets inside the block) were written.
    fn wrote(&mut self, b: u64, from: u64, to: u64) -> Result<()> {
        let _ = (b, from, to);
        Ok(())
    }
    /// Write the table entries of the blocks allocated so far (all their data is
    /// written): always with `finish`, else when enough are pending.
    fn commit(&mut self, finish: bool) -> Result<()>;
}

/// An [`ImageWriter`] into an existing image whose format stores guest data in blocks
/// (see the module comment).
pub struct BlockWriter<M> {
    map: M,
    gaps: Gaps,
    size: u64,
    gran: u64,
}

impl<M: BlockMap> BlockWriter<M> {
    /// A writer over `map` taking data in granules of `gran` bytes (a power of two, at
    /// most the block size: a block is allocated when a granule in it holds data).
    pub fn new(map: M, opts: &InPlaceOptions, gran: u64) -> Self {
        BlockWriter {
            map,
            gaps: Gaps::new(opts),
            size: opts.size,
            gran,
        }
    }

    fn zero(&mut self, a: u64, b: u64) -> Result<()> {
        let bs = self.map.block_size();
        let mut at = a;
        while at < b {
            let blk = at / bs;
            let end = b.min((blk + 1) * bs);
            if let Some(h) = self.map.stored(blk)? {
                self.map.file().zero_range(
                    h + at % bs,
                    end - at,
                    "zeroing a range that is zero in the source",
                )?;
            }
            at = end;
        }
        Ok(())
    }
}

impl<M: BlockMap> ImageWriter for BlockWriter<M> {
    fn granularity(&self) -> u64 {
        self.gran
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if let Some((a, b)) = self.gaps.before(offset, data.len() as u64) {
            self.zero(a, b)?;
        }
        let bs = self.map.block_size();
        // Pieces that are back to back in the file go out in one write.
        let mut run: Option<(u64, usize, usize)> = None;
        let mut touched: Vec<(u64, u64, u64)> = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let g = offset + pos as u64;
            let (blk, inb) = (g / bs, g % bs);
            let n = ((bs - inb) as usize).min(data.len() - pos);
            let host = match self.map.stored(blk)? {
                Some(h) => h,
                None => self.map.allocate(blk)?,
            } + inb;
            run = match run {
                Some((h, s, l)) if h + l as u64 == host => Some((h, s, l + n)),
                Some((h, s, l)) => {
                    self.map
                        .file()
                        .write_at(&data[s..s + l], h, "writing guest data")?;
                    Some((host, pos, n))
                }
                None => Some((host, pos, n)),
            };
            touched.push((blk, inb, inb + n as u64));
            pos += n;
        }
        if let Some((h, s, l)) = run {
            self.map
                .file()
                .write_at(&data[s..s + l], h, "writing guest data")?;
        }
        for (blk, from, to) in touched {
            self.map.wrote(blk, from, to)?;
        }
        self.map.commit(false)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some((a, b)) = self.gaps.rest() {
            self.zero(a, b)?;
        }
        self.map.commit(true)?;
        self.map.file().sync("flushing the image")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_the_ranges_between_writes() {
        let opts = InPlaceOptions {
            size: 100,
            ..Default::default()
        };
        let mut g = Gaps::new(&opts);
        assert_eq!(g.before(0, 10), None);
        assert_eq!(g.before(20, 10), Some((10, 20)));
        assert_eq!(g.before(30, 5), None);
        assert_eq!(g.rest(), Some((35, 100)));
        let mut g = Gaps::new(&opts);
        assert_eq!(g.before(0, 100), None);
        assert_eq!(g.rest(), None);
        let mut g = Gaps::new(&InPlaceOptions {
            size: 100,
            target_is_zero: true,
            ..Default::default()
        });
        assert_eq!(g.before(50, 10), None);
        assert_eq!(g.rest(), None);
    }
}
