//! The MBR (msdos) partition table: four primary entries in sector 0, and the chain of
//! extended boot records (EBRs) that holds the logical partitions.
//!
//! Layout (as Linux's block/partitions/msdos.c reads it): the 0x55AA signature at byte
//! 510; four 16-byte entries at 0x1BE (boot flag, CHS, type, CHS, LBA start, sector
//! count, little-endian). An extended entry (type 0x05, 0x0F or 0x85) is a container:
//! its first sector is an EBR whose entry 0 is one logical partition (start relative to
//! that EBR) and whose entry 1 links the next EBR (start relative to the container).

use byteorder::{ByteOrder, LittleEndian as LE};

use super::table::Partition;
use super::Region;
use crate::error::{Error, Result};

/// The MBR sector size: the msdos table counts in 512-byte sectors on every disk we read.
pub const SECTOR: u64 = 512;
/// The most logical partitions followed through the EBR chain (Linux stops near there
/// too); a chain longer than this, or one that loops, is refused.
pub const MAX_LOGICAL: usize = 128;
/// The type of the protective entry of a GPT disk.
pub const TYPE_GPT_PROTECTIVE: u8 = 0xEE;

/// One 16-byte MBR entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// 0x00, or 0x80 for the active partition.
    pub boot: u8,
    /// Partition type (0 for an empty slot).
    pub kind: u8,
    /// First sector (relative to a base that depends on where the entry is).
    pub start: u32,
    /// Sector count.
    pub sectors: u32,
}

impl Entry {
    /// Parse a 16-byte entry.
    pub fn parse(b: &[u8]) -> Entry {
        Entry {
            boot: b[0],
            kind: b[4],
            start: LE::read_u32(&b[8..12]),
            sectors: LE::read_u32(&b[12..16]),
        }
    }

    /// The 16 bytes of this entry (CHS fields zero: nothing here reads them).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.boot;
        b[4] = self.kind;
        LE::write_u32(&mut b[8..12], self.start);
        LE::write_u32(&mut b[12..16], self.sectors);
        b
    }

    /// An empty slot.
    pub fn is_empty(&self) -> bool {
        self.kind == 0 || self.sectors == 0
    }

    /// A container of logical partitions.
    pub fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0F | 0x85)
    }
}

/// A sector holding an MBR or EBR: its signature and four entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRecord {
    /// The four entries, in slot order.
    pub entries: [Entry; 4],
}

impl BootRecord {
    /// Parse a 512-byte sector; `None` without the 0x55AA signature.
    pub fn parse(sector: &[u8]) -> Option<BootRecord> {
        if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xAA {
            return None;
        }
        let e = |i: usize| Entry::parse(&sector[0x1BE + 16 * i..0x1BE + 16 * (i + 1)]);
        Some(BootRecord {
            entries: [e(0), e(1), e(2), e(3)],
        })
    }

    /// Write the entries and the signature into a 512-byte sector (the rest unchanged).
    pub fn write_into(&self, sector: &mut [u8]) {
        for (i, e) in self.entries.iter().enumerate() {
            sector[0x1BE + 16 * i..0x1BE + 16 * (i + 1)].copy_from_slice(&e.to_bytes());
        }
        sector[510] = 0x55;
        sector[511] = 0xAA;
    }

    /// Does this sector read as a partition table rather than the boot sector of a
    /// filesystem that happens to end in 0x55AA (FAT, NTFS)? Every boot flag must be 0 or
    /// 0x80, as Linux checks, and at least one slot must be in use.
    pub fn looks_like_table(&self) -> bool {
        self.entries.iter().all(|e| e.boot == 0 || e.boot == 0x80)
            && self.entries.iter().any(|e| !e.is_empty())
    }

    /// Is this the protective MBR of a GPT disk?
    pub fn is_protective(&self) -> bool {
        self.entries.iter().any(|e| e.kind == TYPE_GPT_PROTECTIVE)
    }
}

/// What sector 0 holds.
///
/// Closed: sector 0 either holds no table, a protective MBR or an msdos table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mbr {
    /// No partition table (no signature, or a filesystem's boot sector).
    None,
    /// A protective MBR: the disk is GPT.
    Protective,
    /// An msdos table: its data partitions (primaries and logicals, never the extended
    /// containers), and the sectors that hold EBRs (which no partition may cover).
    Table {
        /// Data partitions, "mbr 1".."mbr 4" then "mbr 5".. for logicals.
        partitions: Vec<Partition>,
        /// Byte offsets of the EBR sectors.
        ebrs: Vec<u64>,
        /// The extended container, when there is one: (start, len) in bytes.
        extended: Option<(u64, u64)>,
    },
}

fn bytes(sectors: u64) -> u64 {
    sectors * SECTOR
}

/// Read the MBR of `disk` and, when it is a table, follow its extended chain. An EBR
/// chain that loops, runs past the disk, lacks its signature or is longer than
/// [`MAX_LOGICAL`] is an error: the caller then leaves the whole disk untouched.
pub fn read(disk: &Region<'_>) -> Result<Mbr> {
    if disk.len() < SECTOR {
        return Ok(Mbr::None);
    }
    let mut s0 = [0u8; 512];
    disk.read_at(&mut s0, 0, "MBR")?;
    let Some(mbr) = BootRecord::parse(&s0) else {
        return Ok(Mbr::None);
    };
    if !mbr.looks_like_table() {
        return Ok(Mbr::None);
    }
    if mbr.is_protective() {
        return Ok(Mbr::Protective);
    }
    let mut partitions = Vec::new();
    let mut extended = None;
    for (i, e) in mbr.entries.iter().enumerate() {
        if e.is_empty() {
            continue;
        }
        let (start, len) = (bytes(e.start as u64), bytes(e.sectors as u64));
        if e.is_extended() {
            if extended.is_some() {
                return Err(Error::corrupt(format!(
                    "MBR entry {} is a second extended partition (only one is allowed)",
                    i + 1
                ))
                .with_field("MBR partition type"));
            }
            extended = Some((start, len));
        } else {
            partitions.push(Partition {
                location: format!("mbr {}", i + 1),
                start,
                len,
                type_id: format!("{:#04x}", e.kind),
            });
        }
    }
    let mut ebrs = Vec::new();
    if let Some((ext_start, ext_len)) = extended {
        read_chain(disk, ext_start, ext_len, &mut partitions, &mut ebrs)?;
    }
    Ok(Mbr::Table {
        partitions,
        ebrs,
        extended,
    })
}

fn read_chain(
    disk: &Region<'_>,
    ext_start: u64,
    ext_len: u64,
    partitions: &mut Vec<Partition>,
    ebrs: &mut Vec<u64>,
) -> Result<()> {
    let ext_end = ext_start.saturating_add(ext_len);
    let mut ebr = ext_start;
    let mut number = 5;
    loop {
        if ebrs.contains(&ebr) {
            return Err(Error::corrupt(format!(
                "the extended partition's EBR chain loops back to the EBR at {ebr:#x}"
            ))
            .at(ebr));
        }
        if ebrs.len() >= MAX_LOGICAL {
            return Err(Error::limit(format!(
                "the extended partition's EBR chain is longer than {MAX_LOGICAL} logical partitions"
            ))
            .at(ebr));
        }
        if ebr < ext_start || ebr.saturating_add(SECTOR) > ext_end {
            return Err(Error::corrupt(format!(
                "EBR at {ebr:#x} lies outside the extended partition ({ext_start:#x}..{ext_end:#x})"
            ))
            .at(ebr));
        }
        let mut sector = [0u8; 512];
        disk.read_at(&mut sector, ebr, "EBR")?;
        let Some(rec) = BootRecord::parse(&sector) else {
            return Err(
                Error::corrupt(format!("EBR at {ebr:#x} lacks the 0x55AA signature"))
                    .with_field("EBR signature")
                    .at(ebr + 510),
            );
        };
        ebrs.push(ebr);
        let data = rec.entries[0];
        if !data.is_empty() {
            if data.is_extended() {
                return Err(Error::corrupt(format!(
                    "EBR at {ebr:#x}: its first entry is an extended partition, not a logical one"
                ))
                .at(ebr + 0x1BE));
            }
            let start = ebr.saturating_add(bytes(data.start as u64));
            let len = bytes(data.sectors as u64);
            if data.start == 0 || start.saturating_add(len) > ext_end {
                return Err(Error::corrupt(format!(
                    "logical partition {number} ({len} bytes at {start:#x}) is not inside the \
                     extended partition ({ext_start:#x}..{ext_end:#x}) after its EBR"
                ))
                .at(ebr + 0x1BE));
            }
            partitions.push(Partition {
                location: format!("mbr {number}"),
                start,
                len,
                type_id: format!("{:#04x}", data.kind),
            });
            number += 1;
        }
        let link = rec.entries[1];
        if link.is_empty() {
            return Ok(());
        }
        if !link.is_extended() {
            return Err(Error::corrupt(format!(
                "EBR at {ebr:#x}: its second entry has type {:#04x}, not a link to the next EBR",
                link.kind
            ))
            .at(ebr + 0x1CE));
        }
        ebr = ext_start.saturating_add(bytes(link.start as u64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::BlockDevice;
    use crate::guest::table::tests::MemDisk;

    fn entry(kind: u8, start: u32, sectors: u32) -> Entry {
        Entry {
            boot: 0,
            kind,
            start,
            sectors,
        }
    }

    fn put(disk: &mut [u8], at: u64, entries: [Entry; 4]) {
        BootRecord { entries }.write_into(&mut disk[at as usize..at as usize + 512]);
    }

    #[test]
    fn entry_round_trips() {
        let e = Entry {
            boot: 0x80,
            kind: 0x83,
            start: 2048,
            sectors: 77,
        };
        assert_eq!(Entry::parse(&e.to_bytes()), e);
    }

    #[test]
    fn primaries_and_logicals() {
        let z = entry(0, 0, 0);
        let mut d = vec![0u8; 1 << 20];
        put(
            &mut d,
            0,
            [entry(0x83, 1, 100), entry(0x05, 200, 1000), z, z],
        );
        // EBR 1 at sector 200: logical at +2, link to the EBR at container+300.
        put(
            &mut d,
            200 * 512,
            [entry(0x83, 2, 50), entry(0x05, 300, 400), z, z],
        );
        put(&mut d, 500 * 512, [entry(0x82, 1, 10), z, z, z]);
        let dev = MemDisk(d);
        let r = read(&Region::whole(&dev as &dyn BlockDevice)).unwrap();
        let Mbr::Table {
            partitions, ebrs, ..
        } = r
        else {
            panic!("{r:?}")
        };
        let got: Vec<_> = partitions
            .iter()
            .map(|p| (p.location.as_str(), p.start / 512, p.len / 512))
            .collect();
        assert_eq!(
            got,
            vec![("mbr 1", 1, 100), ("mbr 5", 202, 50), ("mbr 6", 501, 10)]
        );
        assert_eq!(ebrs, vec![200 * 512, 500 * 512]);
    }

    #[test]
    fn a_looping_chain_is_refused() {
        let z = entry(0, 0, 0);
        let mut d = vec![0u8; 1 << 20];
        put(&mut d, 0, [entry(0x05, 100, 1000), z, z, z]);
        put(
            &mut d,
            100 * 512,
            [entry(0x83, 1, 5), entry(0x05, 0, 10), z, z],
        );
        let dev = MemDisk(d);
        let e = read(&Region::whole(&dev as &dyn BlockDevice)).unwrap_err();
        assert!(e.to_string().contains("loops"), "{e}");
    }

    #[test]
    fn boot_sectors_and_protective_mbrs() {
        let mut d = vec![0u8; 4096];
        d[510] = 0x55;
        d[511] = 0xAA;
        d[0x1BE] = b'T'; // boot code text where entries would be: a filesystem's boot sector
        d[0x1C2] = 0x83;
        d[0x1CA] = 1;
        let dev = MemDisk(d.clone());
        assert_eq!(
            read(&Region::whole(&dev as &dyn BlockDevice)).unwrap(),
            Mbr::None
        );
        d[0x1BE] = 0;
        d[0x1C2] = 0xEE;
        let dev = MemDisk(d);
        assert_eq!(
            read(&Region::whole(&dev as &dyn BlockDevice)).unwrap(),
            Mbr::Protective
        );
    }
}
