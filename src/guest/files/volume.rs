//! An owned window of a device: one partition, or a logical volume pieced together from
//! its extents. Owned (an `Arc` of the device) so a filesystem reader that must hold its
//! reader for as long as it lives (`ext4-view` takes a `Box<dyn Ext4Read>`) can.

use std::sync::Arc;

use crate::device::{check_guest_range, map_end, BlockDevice, ImageInfo, Mapping, MappingKind};
use crate::error::{Error, Result};
use crate::format::Format;

/// `len` bytes at `at` of the volume live at `dev_at` of the device.
#[derive(Debug, Clone, Copy)]
struct Piece {
    at: u64,
    dev_at: u64,
    len: u64,
}

/// A read-only window of a device, itself a [`BlockDevice`].
#[derive(Clone)]
pub struct Volume {
    dev: Arc<dyn BlockDevice>,
    pieces: Arc<[Piece]>,
    size: u64,
}

impl Volume {
    /// `len` bytes at `start` of `dev`; an error when it runs past the device.
    pub fn new(dev: Arc<dyn BlockDevice>, start: u64, len: u64) -> Result<Volume> {
        Self::from_pieces(dev, &[(start, len)])
    }

    /// The concatenation of `(start, len)` ranges of `dev`, in order (a logical volume's
    /// extents); an error when one runs past the device.
    pub fn from_pieces(dev: Arc<dyn BlockDevice>, ranges: &[(u64, u64)]) -> Result<Volume> {
        let mut pieces = Vec::with_capacity(ranges.len());
        let mut at = 0u64;
        for &(dev_at, len) in ranges {
            if dev_at
                .checked_add(len)
                .is_none_or(|e| e > dev.virtual_size())
            {
                return Err(Error::corrupt(format!(
                    "volume piece of {len} bytes at {dev_at:#x} runs past the end of the disk \
                     ({} bytes)",
                    dev.virtual_size()
                )));
            }
            if len > 0 {
                pieces.push(Piece { at, dev_at, len });
                at += len;
            }
        }
        Ok(Volume {
            dev,
            pieces: pieces.into(),
            size: at,
        })
    }

    /// Where byte `off` of the volume lives on the device: the piece's index.
    fn find(&self, off: u64) -> usize {
        self.pieces.partition_point(|p| p.at + p.len <= off)
    }
}

impl BlockDevice for Volume {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = map_end(self.size, offset, max_len)?;
        let p = self.pieces[self.find(offset)];
        Ok(Mapping {
            offset,
            len: (p.at + p.len).min(end) - offset,
            kind: MappingKind::Data { host: None },
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len())?;
        let mut done = 0usize;
        let mut i = self.find(offset);
        while done < buf.len() {
            let p = self.pieces[i];
            let off = offset + done as u64;
            let n = ((p.at + p.len - off) as usize).min(buf.len() - done);
            self.dev
                .read_at(&mut buf[done..done + n], p.dev_at + off - p.at)?;
            done += n;
            i += 1;
        }
        Ok(())
    }
    fn info(&self) -> ImageInfo {
        ImageInfo::default()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::table::tests::MemDisk;

    #[test]
    fn pieces_read_in_order_and_overruns_are_refused() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDisk((0..=255u8).collect()));
        let v = Volume::from_pieces(dev.clone(), &[(100, 10), (10, 20)]).unwrap();
        assert_eq!(v.virtual_size(), 30);
        let mut b = [0u8; 14];
        v.read_at(&mut b, 6).unwrap();
        assert_eq!(
            b,
            [106, 107, 108, 109, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
        );
        assert!(v.read_at(&mut b, 20).is_err());
        assert!(Volume::new(dev, 250, 10).is_err());
    }
}
