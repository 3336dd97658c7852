//! Which partition table a disk has (GPT, MBR, or none: a whole-disk filesystem), and
//! whether its partitions are consistent enough to read any of them.

use super::{gpt, mbr, Region};
use crate::error::{Error, Result};

/// One partition: where it is on the disk, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// "gpt 1", "mbr 5", ...
    pub location: String,
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The partition type: a GPT type GUID ("C12A7328-...") or an MBR type byte ("0x83").
    pub type_id: String,
}

impl Partition {
    fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// The partition table of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// "gpt", "mbr", or "none" (no table: the disk is one filesystem, or unknown).
    pub kind: &'static str,
    /// The partitions holding data, in table order (never the extended container).
    pub partitions: Vec<Partition>,
    /// Byte ranges of the table itself that no partition may cover (MBR, EBRs).
    pub reserved: Vec<(u64, u64)>,
    /// What is worth telling (a GPT read from its backup).
    pub notes: Vec<String>,
}

/// Find and read the table. GPT first when the MBR is protective or absent (a GPT disk
/// whose protective MBR was wiped still has its headers), then the msdos table. An error
/// means a table is there but cannot be trusted: the caller leaves the disk untouched.
pub fn read(disk: &Region<'_>) -> Result<Table> {
    let m = mbr::read(disk)?;
    if matches!(m, mbr::Mbr::Protective | mbr::Mbr::None) {
        match gpt::read(disk) {
            // Without a protective MBR only a valid primary header counts: a backup
            // header alone may be a stale leftover inside a whole-disk filesystem, and its
            // partitions would then be misread.
            Ok(Some(g)) if m == mbr::Mbr::None && g.from_backup => {
                return Err(Error::corrupt(format!(
                    "no protective MBR and no valid primary GPT header, only a backup: not \
                     trusted ({})",
                    g.notes.join("; ")
                )))
            }
            Ok(Some(g)) => {
                return Ok(Table {
                    kind: "gpt",
                    partitions: g.partitions,
                    reserved: g.reserved,
                    notes: g.notes,
                })
            }
            Ok(None) if m == mbr::Mbr::Protective => {
                return Err(Error::corrupt(
                    "the MBR is a GPT protective MBR but no GPT header has the signature",
                ))
            }
            Ok(None) => {}
            Err(e) => return Err(e),
        }
    }
    match m {
        mbr::Mbr::Table {
            partitions,
            ebrs,
            extended,
        } => {
            let mut reserved = vec![(0, mbr::SECTOR)];
            reserved.extend(ebrs.iter().map(|&e| (e, mbr::SECTOR)));
            let t = Table {
                kind: "mbr",
                partitions,
                reserved,
                notes: Vec::new(),
            };
            if let Some((s, l)) = extended {
                // Primaries must stay out of the container of the logicals.
                for p in t.partitions.iter().filter(|p| !is_logical(p)) {
                    if p.start < s.saturating_add(l) && s < p.end() {
                        return Err(Error::corrupt(format!(
                            "{} ({} bytes at {:#x}) overlaps the extended partition \
                             ({l} bytes at {s:#x})",
                            p.location, p.len, p.start
                        )));
                    }
                }
            }
            Ok(t)
        }
        _ => Ok(Table {
            kind: "none",
            partitions: Vec::new(),
            reserved: Vec::new(),
            notes: Vec::new(),
        }),
    }
}

fn is_logical(p: &Partition) -> bool {
    p.location
        .strip_prefix("mbr ")
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n >= 5)
}

/// Check that the partitions lie inside a disk of `disk_len` bytes, do not overlap each
/// other and cover none of the table's own sectors. Any failure is returned as the
/// reason to leave the whole disk untouched: a table that disagrees with itself may be
/// misread, and then no partition's bounds can be trusted.
pub fn check(t: &Table, disk_len: u64) -> Result<()> {
    for p in &t.partitions {
        if p.len == 0 || p.end() > disk_len || p.start.checked_add(p.len).is_none() {
            return Err(Error::corrupt(format!(
                "{} ({} bytes at {:#x}) runs past the end of the disk ({disk_len} bytes)",
                p.location, p.len, p.start
            )));
        }
        for &(r, rl) in &t.reserved {
            if p.start < r + rl && r < p.end() {
                return Err(Error::corrupt(format!(
                    "{} ({} bytes at {:#x}) covers the partition table sector at {r:#x}",
                    p.location, p.len, p.start
                )));
            }
        }
    }
    let mut sorted: Vec<&Partition> = t.partitions.iter().collect();
    sorted.sort_by_key(|p| p.start);
    for w in sorted.windows(2) {
        if w[1].start < w[0].end() {
            return Err(Error::corrupt(format!(
                "{} ({} bytes at {:#x}) overlaps {} ({} bytes at {:#x})",
                w[0].location, w[0].len, w[0].start, w[1].location, w[1].len, w[1].start
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::{BlockDevice, ImageInfo, Mapping, MappingKind};
    use crate::format::Format;

    /// A disk in memory, for the table and scanner unit tests.
    pub(crate) struct MemDisk(pub Vec<u8>);

    impl BlockDevice for MemDisk {
        fn virtual_size(&self) -> u64 {
            self.0.len() as u64
        }
        fn map(&self, offset: u64, max_len: u64) -> crate::Result<Mapping> {
            let end = crate::device::map_end(self.virtual_size(), offset, max_len)?;
            Ok(Mapping {
                offset,
                len: end - offset,
                kind: MappingKind::Data { host: Some(offset) },
            })
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            crate::device::check_guest_range(self.virtual_size(), offset, buf.len())?;
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn info(&self) -> ImageInfo {
            ImageInfo::default()
        }
        fn format(&self) -> Format {
            Format::Raw
        }
    }

    fn part(n: u32, start: u64, len: u64) -> Partition {
        Partition {
            location: format!("mbr {n}"),
            start,
            len,
            type_id: "0x83".to_string(),
        }
    }

    #[test]
    fn overlaps_and_overruns_are_refused() {
        let mut t = Table {
            kind: "mbr",
            partitions: vec![part(1, 512, 1000), part(2, 2048, 1000)],
            reserved: vec![(0, 512)],
            notes: Vec::new(),
        };
        check(&t, 4096).unwrap();
        t.partitions[1].start = 1000;
        let e = check(&t, 4096).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        t.partitions[1].start = 3500;
        let e = check(&t, 4096).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        t.partitions[1].start = 0;
        assert!(check(&t, 4096).is_err());
    }

    #[test]
    fn gpt_disk_found_through_protective_mbr_or_without_one() {
        let mut d = crate::guest::gpt::tests::gpt_disk(200, (40, 99));
        let dev = MemDisk(d.clone());
        let t = read(&Region::whole(&dev as &dyn BlockDevice)).unwrap();
        assert_eq!((t.kind, t.partitions.len()), ("gpt", 1));
        mbr::BootRecord {
            entries: [
                mbr::Entry {
                    boot: 0,
                    kind: 0xEE,
                    start: 1,
                    sectors: 199,
                },
                mbr::Entry::parse(&[0; 16]),
                mbr::Entry::parse(&[0; 16]),
                mbr::Entry::parse(&[0; 16]),
            ],
        }
        .write_into(&mut d[..512]);
        let dev = MemDisk(d.clone());
        assert_eq!(
            read(&Region::whole(&dev as &dyn BlockDevice)).unwrap().kind,
            "gpt"
        );
        // A bad primary without the protective MBR: the backup alone is not trusted.
        let mut no_pmbr = d.clone();
        no_pmbr[..512].fill(0);
        no_pmbr[512 + 60] ^= 1;
        let dev = MemDisk(no_pmbr);
        let e = read(&Region::whole(&dev as &dyn BlockDevice)).unwrap_err();
        assert!(e.to_string().contains("only a backup"), "{e}");
        d[512..520].fill(0);
        d[199 * 512..199 * 512 + 8].fill(0);
        let dev = MemDisk(d);
        let e = read(&Region::whole(&dev as &dyn BlockDevice)).unwrap_err();
        assert!(e.to_string().contains("protective"), "{e}");
    }
}
