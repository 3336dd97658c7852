//! The GUID partition table (UEFI spec, chapter 5.3): a header at LBA 1 and a backup at
//! the disk's last LBA, each with its own CRC32 and the CRC32 of its entry array.
//!
//! Our own reader rather than the `gptman` crate: gptman reads through `Read + Seek`,
//! sizes the entry array from the header's claim, and reports a bad primary as an error
//! without reading the backup; here every read stays inside a [`Region`], the array is
//! bounded, and a bad primary falls back to the backup, as Linux's block/partitions/efi.c
//! does.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::table::Partition;
use super::Region;
use crate::error::{Error, Result};

/// The header signature.
pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The smallest header (the fields below).
pub const HEADER_MIN: u32 = 92;
/// The most entries read (the usual table has 128).
pub const MAX_ENTRIES: u32 = 65536;
/// The most bytes of entry array read.
pub const MAX_ARRAY: u64 = 4 << 20;
/// The sector sizes tried, in turn.
pub const SECTOR_SIZES: [u64; 2] = [512, 4096];

/// A GPT header, the fields this reader checks and uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes of the header covered by its CRC.
    pub header_size: u32,
    /// The CRC32 stored in the header.
    pub header_crc: u32,
    /// The LBA this header says it is at.
    pub my_lba: u64,
    /// The LBA of the other header.
    pub alternate_lba: u64,
    /// First LBA a partition may use.
    pub first_usable: u64,
    /// Last LBA a partition may use (inclusive).
    pub last_usable: u64,
    /// LBA of the entry array.
    pub entries_lba: u64,
    /// Number of entries in the array.
    pub num_entries: u32,
    /// Size of one entry (128 or a larger power of two).
    pub entry_size: u32,
    /// CRC32 of the entry array.
    pub entries_crc: u32,
}

impl Header {
    /// Parse and check a header sector against its CRC: the signature, the header size
    /// (92 up to the sector) and the header CRC (computed with the CRC field zeroed).
    pub fn parse(sector: &[u8]) -> Result<Header> {
        if sector.len() < 512 || &sector[0..8] != SIGNATURE {
            return Err(Error::corrupt("no \"EFI PART\" signature").with_field("signature"));
        }
        let header_size = LE::read_u32(&sector[12..16]);
        if header_size < HEADER_MIN || header_size as usize > sector.len() {
            return Err(Error::corrupt(format!(
                "header size {header_size} is outside {HEADER_MIN}..={}",
                sector.len()
            ))
            .with_field("header_size"));
        }
        let header_crc = LE::read_u32(&sector[16..20]);
        let mut h = crc32fast::Hasher::new();
        h.update(&sector[..16]);
        h.update(&[0; 4]);
        h.update(&sector[20..header_size as usize]);
        let computed = h.finalize();
        if computed != header_crc {
            return Err(Error::corrupt(format!(
                "header CRC32 is {header_crc:#010x}, the header's bytes give {computed:#010x}"
            ))
            .with_field("header_crc32"));
        }
        Ok(Header {
            header_size,
            header_crc,
            my_lba: LE::read_u64(&sector[24..32]),
            alternate_lba: LE::read_u64(&sector[32..40]),
            first_usable: LE::read_u64(&sector[40..48]),
            last_usable: LE::read_u64(&sector[48..56]),
            entries_lba: LE::read_u64(&sector[72..80]),
            num_entries: LE::read_u32(&sector[80..84]),
            entry_size: LE::read_u32(&sector[84..88]),
            entries_crc: LE::read_u32(&sector[88..92]),
        })
    }

    /// Write this header into a sector (CRC computed here, over `header_size` bytes).
    pub fn write_into(&self, sector: &mut [u8]) {
        sector[0..8].copy_from_slice(SIGNATURE);
        LE::write_u32(&mut sector[8..12], 0x0001_0000);
        LE::write_u32(&mut sector[12..16], self.header_size);
        LE::write_u32(&mut sector[16..20], 0);
        LE::write_u64(&mut sector[24..32], self.my_lba);
        LE::write_u64(&mut sector[32..40], self.alternate_lba);
        LE::write_u64(&mut sector[40..48], self.first_usable);
        LE::write_u64(&mut sector[48..56], self.last_usable);
        LE::write_u64(&mut sector[72..80], self.entries_lba);
        LE::write_u32(&mut sector[80..84], self.num_entries);
        LE::write_u32(&mut sector[84..88], self.entry_size);
        LE::write_u32(&mut sector[88..92], self.entries_crc);
        let crc = crc32fast::hash(&sector[..self.header_size as usize]);
        LE::write_u32(&mut sector[16..20], crc);
    }
}

/// A GPT read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    /// The logical sector size it was found with.
    pub sector: u64,
    /// The used entries, as "gpt N" (N the entry's index + 1), in entry order.
    pub partitions: Vec<Partition>,
    /// What is worth telling: a bad primary header and the backup used instead.
    pub notes: Vec<String>,
    /// Read from the backup header (the primary did not validate).
    pub from_backup: bool,
    /// Byte ranges of the table itself (both header sectors, the entry array used), which
    /// no partition may cover.
    pub reserved: Vec<(u64, u64)>,
}

/// Read the GPT of `disk`: the primary header at LBA 1, or, when it does not validate,
/// the backup at the last LBA, for 512- then 4096-byte sectors. `Ok(None)` when neither
/// header has the signature at either sector size (not a GPT disk); an error naming what
/// is wrong with both when a signature is there but nothing validates.
pub fn read(disk: &Region<'_>) -> Result<Option<Gpt>> {
    let mut problems = Vec::new();
    let mut seen_signature = false;
    for &ss in &SECTOR_SIZES {
        let lbas = disk.len() / ss;
        if lbas < 3 {
            continue;
        }
        let mut primary_problem = None;
        for (which, lba) in [("primary", 1), ("backup", lbas - 1)] {
            let mut sector = vec![0u8; ss as usize];
            disk.read_at(&mut sector, lba * ss, "GPT header")?;
            if &sector[0..8] != SIGNATURE {
                if which == "primary" {
                    primary_problem = Some(format!(
                        "primary GPT header at LBA 1 ({ss}-byte sectors) has no signature"
                    ));
                }
                continue;
            }
            seen_signature = true;
            match read_at_lba(disk, &sector, ss, lba) {
                Ok((partitions, array)) => {
                    let mut notes = Vec::new();
                    if let Some(p) = primary_problem.take() {
                        notes.push(format!("{p}; used the backup header at LBA {lba}"));
                    }
                    return Ok(Some(Gpt {
                        sector: ss,
                        partitions,
                        notes,
                        from_backup: which == "backup",
                        reserved: vec![(ss, ss), ((lbas - 1) * ss, ss), array],
                    }));
                }
                Err(e) => {
                    let p = format!("{which} GPT header at LBA {lba} ({ss}-byte sectors): {e}");
                    if which == "primary" {
                        primary_problem = Some(p.clone());
                    }
                    problems.push(p);
                }
            }
        }
    }
    if !seen_signature {
        return Ok(None);
    }
    Err(Error::corrupt(format!(
        "no valid GPT header: {}",
        problems.join("; ")
    )))
}

/// The partitions of the header in `sector` (at `lba`), and where its entry array is.
fn read_at_lba(
    disk: &Region<'_>,
    sector: &[u8],
    ss: u64,
    lba: u64,
) -> Result<(Vec<Partition>, (u64, u64))> {
    let h = Header::parse(sector)?;
    let lbas = disk.len() / ss;
    let last = lbas - 1;
    if h.my_lba != lba {
        return Err(
            Error::corrupt(format!("it says it is at LBA {}, not {lba}", h.my_lba))
                .with_field("my_lba"),
        );
    }
    if h.first_usable > h.last_usable || h.last_usable >= last {
        return Err(Error::corrupt(format!(
            "usable LBAs {}..={} are not inside the disk's {lbas} sectors",
            h.first_usable, h.last_usable
        ))
        .with_field("last_usable_lba"));
    }
    if h.entry_size < 128 || !h.entry_size.is_power_of_two() || h.entry_size as u64 > ss * 8 {
        return Err(Error::corrupt(format!(
            "entry size {} is not 128 or a larger power of two",
            h.entry_size
        ))
        .with_field("size_of_partition_entry"));
    }
    if h.num_entries > MAX_ENTRIES {
        return Err(Error::limit(format!(
            "{} entries, more than the {MAX_ENTRIES} read",
            h.num_entries
        ))
        .with_field("number_of_partition_entries"));
    }
    let array_len = h.num_entries as u64 * h.entry_size as u64;
    let array_at = h
        .entries_lba
        .checked_mul(ss)
        .filter(|&a| h.entries_lba >= 1 && a.saturating_add(array_len) <= disk.len())
        .ok_or_else(|| {
            Error::corrupt(format!(
                "entry array at LBA {} ({array_len} bytes) is not inside the disk",
                h.entries_lba
            ))
            .with_field("partition_entry_lba")
        })?;
    let array = disk.read_vec(array_at, array_len, MAX_ARRAY, "GPT entry array")?;
    let computed = crc32fast::hash(&array);
    if computed != h.entries_crc {
        return Err(Error::corrupt(format!(
            "entry array CRC32 is {:#010x}, its bytes give {computed:#010x}",
            h.entries_crc
        ))
        .with_field("partition_entry_array_crc32"));
    }
    let mut partitions = Vec::new();
    for (i, e) in array.chunks_exact(h.entry_size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = LE::read_u64(&e[32..40]);
        let last_lba = LE::read_u64(&e[40..48]);
        if last_lba < first || first < h.first_usable || last_lba > h.last_usable {
            return Err(Error::corrupt(format!(
                "entry {} covers LBAs {first}..={last_lba}, outside the usable {}..={}",
                i + 1,
                h.first_usable,
                h.last_usable
            ))
            .with_field("partition entry"));
        }
        partitions.push(Partition {
            location: format!("gpt {}", i + 1),
            start: first * ss,
            len: (last_lba - first + 1) * ss,
            type_id: guid_string(&e[0..16]),
        });
    }
    Ok((partitions, (array_at, array_len)))
}

/// A GPT GUID in its usual text form (the first three fields little-endian), upper case
/// as sgdisk and the UEFI specification print it.
pub fn guid_string(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        LE::read_u32(&b[0..4]),
        LE::read_u16(&b[4..6]),
        LE::read_u16(&b[6..8]),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02X}"))
            .collect::<String>()
    )
}

/// The type GUID of an EFI system partition.
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::BlockDevice;
    use crate::guest::table::tests::MemDisk;

    /// A disk of `sectors` 512-byte sectors with both GPT headers and one partition
    /// covering LBAs `part`.
    pub(crate) fn gpt_disk(sectors: u64, part: (u64, u64)) -> Vec<u8> {
        gpt_disk_ss(sectors, part, 512)
    }

    /// [`gpt_disk`] with `ss`-byte sectors.
    pub(crate) fn gpt_disk_ss(sectors: u64, part: (u64, u64), ss: u64) -> Vec<u8> {
        let mut d = vec![0u8; (sectors * ss) as usize];
        let mut array = vec![0u8; 128 * 128];
        array[0] = 0xAF; // any non-zero type GUID
        LE::write_u64(&mut array[32..40], part.0);
        LE::write_u64(&mut array[40..48], part.1);
        let crc = crc32fast::hash(&array);
        let last = sectors - 1;
        let array_lbas = (array.len() as u64).div_ceil(ss);
        for (my, alt, entries) in [(1, last, 2), (last, 1, last - array_lbas)] {
            let h = Header {
                header_size: 92,
                header_crc: 0,
                my_lba: my,
                alternate_lba: alt,
                first_usable: 2 + array_lbas,
                last_usable: last - 1 - array_lbas,
                entries_lba: entries,
                num_entries: 128,
                entry_size: 128,
                entries_crc: crc,
            };
            h.write_into(&mut d[(my * ss) as usize..(my * ss + 512) as usize]);
            let a = (entries * ss) as usize;
            d[a..a + array.len()].copy_from_slice(&array);
        }
        d
    }

    #[test]
    fn header_round_trips() {
        let d = gpt_disk(200, (40, 99));
        let h = Header::parse(&d[512..1024]).unwrap();
        let mut again = vec![0u8; 512];
        h.write_into(&mut again);
        assert_eq!(&again[..92], &d[512..604]);
    }

    #[test]
    fn reads_primary_then_backup() {
        let mut d = gpt_disk(200, (40, 99));
        let dev = MemDisk(d.clone());
        let g = read(&Region::whole(&dev as &dyn BlockDevice))
            .unwrap()
            .unwrap();
        assert_eq!(g.partitions.len(), 1);
        assert_eq!(
            (g.partitions[0].start, g.partitions[0].len),
            (40 * 512, 60 * 512)
        );
        assert!(g.notes.is_empty());
        d[512 + 40] ^= 1; // primary header CRC now fails
        let dev = MemDisk(d.clone());
        let g = read(&Region::whole(&dev as &dyn BlockDevice))
            .unwrap()
            .unwrap();
        assert_eq!(g.partitions.len(), 1);
        assert!(g.notes[0].contains("CRC"), "{:?}", g.notes);
        d[199 * 512 + 40] ^= 1; // and the backup's
        let dev = MemDisk(d);
        let e = read(&Region::whole(&dev as &dyn BlockDevice)).unwrap_err();
        assert!(e.to_string().contains("backup"), "{e}");
    }

    #[test]
    fn reads_4096_byte_sectors() {
        let d = gpt_disk_ss(64, (10, 20), 4096);
        let dev = MemDisk(d);
        let g = read(&Region::whole(&dev as &dyn BlockDevice))
            .unwrap()
            .unwrap();
        assert_eq!(g.sector, 4096);
        assert_eq!(
            (g.partitions[0].start, g.partitions[0].len),
            (10 * 4096, 11 * 4096)
        );
        assert_eq!(g.reserved[0], (4096, 4096));
    }

    #[test]
    fn entry_array_crc_is_checked() {
        let mut d = gpt_disk(200, (40, 99));
        d[2 * 512 + 200] ^= 1; // primary array
        d[(199 - 32) * 512 + 200] ^= 1; // backup array
        let dev = MemDisk(d);
        let e = read(&Region::whole(&dev as &dyn BlockDevice)).unwrap_err();
        assert!(e.to_string().contains("entry array CRC32"), "{e}");
    }
}
