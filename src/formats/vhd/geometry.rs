//! CHS geometry: the VHD spec's algorithm from a sector count, and the choice we write.

/// Largest cylinder count.
pub const MAX_CYLINDERS: u16 = 65535;
/// Largest head count.
pub const MAX_HEADS: u8 = 16;
/// Largest sectors per track.
pub const MAX_SECTORS_PER_TRACK: u8 = 255;
/// Sectors of the maximum geometry; images carrying it take their size from current_size.
pub const MAX_GEOMETRY_SECTORS: u64 =
    MAX_CYLINDERS as u64 * MAX_HEADS as u64 * MAX_SECTORS_PER_TRACK as u64;
/// Largest VHD we read or write: 0xff000000 sectors (2040 GiB), qemu's limit too.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// [`MAX_SECTORS`] in bytes.
pub const MAX_SIZE: u64 = MAX_SECTORS * 512;

/// A CHS geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chs {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Chs {
    /// The maximum geometry (65535 x 16 x 255).
    pub const MAX: Chs = Chs {
        cylinders: MAX_CYLINDERS,
        heads: MAX_HEADS,
        sectors_per_track: MAX_SECTORS_PER_TRACK,
    };

    /// Sectors this geometry addresses.
    pub fn sectors(self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors_per_track as u64
    }

    /// The geometry the VHD specification's algorithm gives for `total_sectors` (it may
    /// address fewer sectors than asked: the algorithm rounds down).
    pub fn from_sectors(total_sectors: u64) -> Chs {
        let total = total_sectors.min(MAX_GEOMETRY_SECTORS);
        let (spt, heads, cth): (u64, u64, u64);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17u64;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Chs {
            // cth / heads <= 65535 by construction of the caps above.
            cylinders: (cth / heads).min(MAX_CYLINDERS as u64) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }

    /// The geometry we write for an image of exactly `total_sectors`: the spec's geometry
    /// when it addresses exactly that many sectors, else the maximum geometry (which tells
    /// every reader to use current_size instead of the geometry).
    pub fn for_exact_size(total_sectors: u64) -> Chs {
        let g = Chs::from_sectors(total_sectors);
        if g.sectors() == total_sectors {
            g
        } else {
            Chs::MAX
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_geometry_matches_qemu() {
        // qemu-img create -f vpc x 5M gives 151/4/17 (5257216 bytes after rounding up).
        let g = Chs::from_sectors(5257216 / 512);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (151, 4, 17));
        assert_eq!(g.sectors() * 512, 5257216);
        // 127 GiB Hyper-V image: 65278/16/255.
        let g = Chs::from_sectors(136365211648 / 512);
        assert_eq!(
            (g.cylinders, g.heads, g.sectors_per_track),
            (65278, 16, 255)
        );
        assert_eq!(Chs::from_sectors(u64::MAX).sectors(), MAX_GEOMETRY_SECTORS);
        assert_eq!(Chs::for_exact_size(5 << 11), Chs::MAX);
        assert_eq!(Chs::for_exact_size(5257216 / 512).sectors(), 5257216 / 512);
        assert_eq!(Chs::from_sectors(0).sectors(), 0);
    }
}
