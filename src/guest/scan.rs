//! The scan driver: find the partitions of a disk, run the filesystem scanners on each,
//! and commit the free ranges of those that scanned cleanly into one [`FreeMap`].

use serde::Serialize;

use super::{FreeMap, FreeSink, Outcome, Region, Scanner};
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
    for scanner in SCANNERS {
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

/// Scan a whole disk.
pub fn scan(dev: &dyn BlockDevice) -> Result<GuestScan> {
    let mut free = FreeMap::new(dev.virtual_size());
    let whole = Region::whole(dev);
    let partitions = vec![scan_region(&mut free, whole, "disk")];
    Ok(GuestScan { free, partitions })
}
