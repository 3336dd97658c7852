//! The scan driver: find the partitions of a disk, run the filesystem scanners on each,
//! and commit the free ranges of those that scanned cleanly into one [`FreeMap`].

use serde::Serialize;

use super::{table, FreeMap, FreeSink, Outcome, Region, Scanner};
use crate::device::BlockDevice;
use crate::error::Result;

/// The filesystem scanners, tried in turn on every partition until one claims it.
pub const SCANNERS: &[Scanner] = &[
    super::ext::scan,
    super::fat::scan,
    super::ntfs::scan,
    super::xfs::scan,
    super::swap::scan,
];

/// What the scan made of one partition (or of the whole disk when it has no table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionReport {
    /// Where it was found: "disk" (no partition table), "gpt 1", "mbr 5", "lvm vg/lv".
    pub location: String,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// The filesystem recognised, if any.
    pub filesystem: Option<String>,
    /// Bytes of free space that will read as zeros (whole granules of the free map).
    pub free_bytes: u64,
    /// Why nothing in it is dropped, when nothing is.
    pub skipped: Option<String>,
}

/// The result of scanning a disk: the free map and one line per partition.
#[derive(Debug, Clone)]
pub struct GuestScan {
    /// The granules every scanned filesystem marked free.
    pub free: FreeMap,
    /// One entry per partition, in disk order.
    pub partitions: Vec<PartitionReport>,
    /// The partition table: "gpt", "mbr", "none" (a whole-disk filesystem or nothing
    /// known), or "untrusted" (a table is there but does not validate: nothing dropped).
    pub table: String,
    /// What is worth telling that is not a partition's line (a GPT read from its backup).
    pub notes: Vec<String>,
}

/// Records a scanner's ranges (relative to its region) into the disk's free map.
struct MapSink<'a> {
    map: &'a mut FreeMap,
    region: Region<'a>,
    newly: u64,
}

impl FreeSink for MapSink<'_> {
    fn free(&mut self, offset: u64, len: u64) {
        // Clip to the region: a scanner can never free bytes outside its partition.
        let end = offset.saturating_add(len).min(self.region.len());
        if offset < end {
            self.newly += self
                .map
                .mark_free(self.region.start() + offset, end - offset);
        }
    }
}

/// Run the scanners over `region` and commit its free ranges to `map` when one scanned it
/// cleanly; otherwise leave it untouched and say why.
pub fn scan_region(map: &mut FreeMap, region: Region<'_>, location: &str) -> PartitionReport {
    let mut report = PartitionReport {
        location: location.to_string(),
        offset: region.start(),
        size: region.len(),
        filesystem: None,
        free_bytes: 0,
        skipped: None,
    };
    for (i, scanner) in SCANNERS.iter().enumerate() {
        let mut sink = MapSink {
            map,
            region,
            newly: 0,
        };
        let outcome = scanner(&region, &mut sink);
        let newly = sink.newly;
        let take_back = |map: &mut FreeMap| map.clear(region.start(), region.len());
        match outcome {
            Ok(Outcome::NotMine) => {
                if newly > 0 {
                    take_back(map);
                }
                continue;
            }
            Ok(Outcome::Scanned { fs }) => {
                report.filesystem = Some(fs);
                // Two filesystems' signatures in one partition (a stale boot sector under
                // a newer filesystem): which one is live cannot be known, so neither is
                // trusted, as libblkid calls such a result ambivalent.
                if let Some(other) = also_claimed(&region, &SCANNERS[i + 1..]) {
                    take_back(map);
                    report.skipped = Some(format!(
                        "also carries a {other} signature: which filesystem is live is unknown"
                    ));
                    return report;
                }
                report.free_bytes = newly;
                return report;
            }
            Ok(Outcome::Skipped { fs, reason }) => {
                take_back(map);
                report.filesystem = Some(fs);
                report.skipped = Some(reason);
                return report;
            }
            Err(e) => {
                take_back(map);
                report.skipped = Some(format!("scan failed: {e}"));
                return report;
            }
        }
    }
    report.skipped = Some("no filesystem recognised".to_string());
    report
}

/// The first of `rest` that claims `region` too, its free ranges thrown away.
fn also_claimed(region: &Region<'_>, rest: &[Scanner]) -> Option<String> {
    struct Nowhere;
    impl FreeSink for Nowhere {
        fn free(&mut self, _offset: u64, _len: u64) {}
    }
    rest.iter()
        .find_map(|scanner| match scanner(region, &mut Nowhere) {
            Ok(Outcome::Scanned { fs }) | Ok(Outcome::Skipped { fs, .. }) => Some(fs),
            _ => None,
        })
}

/// Scan one partition: an LVM physical volume (whose linear logical volumes are scanned
/// in turn, one report each after the volume's own), else a filesystem.
pub fn scan_partition(
    map: &mut FreeMap,
    region: Region<'_>,
    location: &str,
) -> Vec<PartitionReport> {
    if let Some(reports) = super::lvm::scan_pv(map, region, location) {
        return reports;
    }
    vec![scan_region(map, region, location)]
}

/// Scan a whole disk: its partition table, then every partition in it (or the whole disk
/// as one filesystem when it has no table). Only ranges a scanner reported free inside a
/// partition are ever marked: the table, the gaps between partitions and everything a
/// scanner does not claim stay as they are. A table that does not validate, or whose
/// partitions overlap or run past the disk, leaves the whole disk untouched.
pub fn scan(dev: &dyn BlockDevice) -> Result<GuestScan> {
    let size = dev.virtual_size();
    let mut free = FreeMap::new(size);
    let whole = Region::whole(dev);
    let untouched = |location: &str, offset: u64, len: u64, why: String| PartitionReport {
        location: location.to_string(),
        offset,
        size: len,
        filesystem: None,
        free_bytes: 0,
        skipped: Some(why),
    };
    let t = match table::read(&whole) {
        Ok(t) => t,
        Err(e) => {
            return Ok(GuestScan {
                free,
                partitions: vec![untouched(
                    "disk",
                    0,
                    size,
                    format!("partition table does not validate, disk left untouched: {e}"),
                )],
                table: "untrusted".to_string(),
                notes: Vec::new(),
            })
        }
    };
    if t.kind == "none" {
        return Ok(GuestScan {
            partitions: scan_partition(&mut free, whole, "disk"),
            free,
            table: t.kind.to_string(),
            notes: t.notes,
        });
    }
    if let Err(e) = table::check(&t, size) {
        let why = format!(
            "{} partition table is inconsistent, disk left untouched: {e}",
            t.kind
        );
        return Ok(GuestScan {
            partitions: t
                .partitions
                .iter()
                .map(|p| untouched(&p.location, p.start, p.len, why.clone()))
                .collect(),
            free,
            table: "untrusted".to_string(),
            notes: t.notes,
        });
    }
    let mut parts = t.partitions.clone();
    parts.sort_by_key(|p| p.start);
    let mut partitions = Vec::new();
    for p in &parts {
        let region = Region::new(dev, p.start, p.len)?;
        partitions.extend(scan_partition(&mut free, region, &p.location));
    }
    Ok(GuestScan {
        free,
        partitions,
        table: t.kind.to_string(),
        notes: t.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::table::tests::MemDisk;

    fn never(_: &Region<'_>, _: &mut dyn FreeSink) -> Result<Outcome> {
        Ok(Outcome::NotMine)
    }
    fn claims(_: &Region<'_>, sink: &mut dyn FreeSink) -> Result<Outcome> {
        sink.free(0, 4096);
        Ok(Outcome::Scanned {
            fs: "other".to_string(),
        })
    }

    #[test]
    fn a_second_claim_is_ambivalent() {
        let dev = MemDisk(vec![0; 8192]);
        let r = Region::whole(&dev);
        assert_eq!(also_claimed(&r, &[never, never]), None);
        assert_eq!(also_claimed(&r, &[never, claims]).as_deref(), Some("other"));
    }

    #[test]
    fn a_whole_disk_swap_is_scanned_and_an_empty_disk_left_alone() {
        let mut d = vec![0u8; 40960];
        d[4086..4096].copy_from_slice(b"SWAPSPACE2");
        d[1024] = 1;
        d[1028] = 9;
        let dev = MemDisk(d);
        let s = scan(&dev).unwrap();
        assert_eq!(s.table, "none");
        assert_eq!(s.partitions[0].filesystem.as_deref(), Some("swap"));
        assert_eq!(s.free.runs().collect::<Vec<_>>(), vec![(4096, 9 * 4096)]);
        let dev = MemDisk(vec![0u8; 40960]);
        let s = scan(&dev).unwrap();
        assert_eq!(s.free.free_bytes(), 0);
        assert_eq!(
            s.partitions[0].skipped.as_deref(),
            Some("no filesystem recognised")
        );
    }
}
