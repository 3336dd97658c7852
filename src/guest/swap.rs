//! Linux swap: a header page ending in "SWAPSPACE2" (version 1), then swap slots that
//! hold nothing once the guest is off. Everything after the header page up to
//! `last_page` is free, except the pages listed as bad; the header page is kept.
//!
//! Layout (the kernel's `union swap_header`, written by mkswap in the creator's byte
//! order): at 1024 `version`, `last_page`, `nr_badpages` (u32 each), `uuid[16]`,
//! `volume_name[16]`, 117 u32 of padding, then `badpages[]` from byte 1536; the magic is the
//! last 10 bytes of the page. A hibernation image replaces that magic, and then the
//! partition holds a saved memory image: it is skipped.

use super::{FreeSink, Outcome, Region};
use crate::error::Result;

/// Page sizes a swap header may have been written for.
pub const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];

const MAGIC: &[u8; 10] = b"SWAPSPACE2";
/// Magics a hibernation image leaves where the swap magic was.
const SUSPEND: [&[u8]; 4] = [b"S1SUSPEND", b"S2SUSPEND", b"ULSUSPEND", b"LINHIB0001"];
const OLD_MAGIC: &[u8; 10] = b"SWAP-SPACE";
const BADPAGES_AT: usize = 1536;

/// The swap header fields this reader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Page size the header was written for.
    pub page: u64,
    /// Header version (1 is the only one read).
    pub version: u32,
    /// Last page of the swap area.
    pub last_page: u32,
    /// Listed bad pages.
    pub badpages: Vec<u32>,
}

/// What the page at the start of a region is.
///
/// Closed: a swap signature is absent, unsafe to read, or version 1 (the only version
/// Linux has written since 2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No swap magic at any page size.
    None,
    /// A hibernation image or an old version-0 area: named, not read.
    Unsafe(String),
    /// A version-1 header.
    Swap(Header),
}

/// Look for a swap header in `page0`, the first 64 KiB (or all, if shorter) of a region.
pub fn parse(page0: &[u8]) -> std::result::Result<Found, String> {
    for &p in &PAGE_SIZES {
        let p = p as usize;
        if page0.len() < p {
            break;
        }
        let magic = &page0[p - 10..p];
        if SUSPEND.iter().any(|s| magic.starts_with(s)) {
            return Ok(Found::Unsafe(format!(
                "holds a hibernation image (signature {:?} at {:#x})",
                String::from_utf8_lossy(magic).trim_end_matches('\0'),
                p - 10
            )));
        }
        if magic == OLD_MAGIC {
            return Ok(Found::Unsafe(
                "old version-0 swap area (SWAP-SPACE) is not read".to_string(),
            ));
        }
        if magic != MAGIC {
            continue;
        }
        let le = |at: usize| u32::from_le_bytes(page0[at..at + 4].try_into().unwrap());
        let be = |at: usize| u32::from_be_bytes(page0[at..at + 4].try_into().unwrap());
        // The header is in the byte order of the machine that ran mkswap.
        let rd: &dyn Fn(usize) -> u32 = if le(1024) != 1 && be(1024) == 1 {
            &be
        } else {
            &le
        };
        let version = rd(1024);
        if version != 1 {
            return Err(format!("swap header version is {version}, not 1"));
        }
        let last_page = rd(1028);
        let nr = rd(1032);
        let max = ((p - 10 - BADPAGES_AT) / 4) as u32;
        if nr > max {
            return Err(format!(
                "nr_badpages is {nr}, more than the {max} a {p}-byte header holds"
            ));
        }
        let badpages: Vec<u32> = (0..nr as usize).map(|i| rd(BADPAGES_AT + 4 * i)).collect();
        if let Some(b) = badpages.iter().find(|&&b| b == 0 || b > last_page) {
            return Err(format!(
                "bad page {b} is outside the swap area's pages 1..={last_page}"
            ));
        }
        return Ok(Found::Swap(Header {
            page: p as u64,
            version,
            last_page,
            badpages,
        }));
    }
    Ok(Found::None)
}

/// The swap scanner.
pub fn scan(region: &Region<'_>, sink: &mut dyn FreeSink) -> Result<Outcome> {
    let n = region.len().min(65536);
    if n < 4096 {
        return Ok(Outcome::NotMine);
    }
    let buf = region.read_vec(0, n, 65536, "swap header page")?;
    let skipped = |reason: String| {
        Ok(Outcome::Skipped {
            fs: "swap".to_string(),
            reason,
        })
    };
    let h = match parse(&buf) {
        Ok(Found::None) => return Ok(Outcome::NotMine),
        Ok(Found::Unsafe(why)) => return skipped(why),
        Err(why) => return skipped(why),
        Ok(Found::Swap(h)) => h,
    };
    let end = (h.last_page as u64 + 1) * h.page;
    if h.last_page == 0 || end > region.len() {
        return skipped(format!(
            "last_page {} ({end} bytes) does not fit the partition ({} bytes)",
            h.last_page,
            region.len()
        ));
    }
    let mut bad = h.badpages.clone();
    bad.sort_unstable();
    bad.dedup();
    let mut from = h.page;
    for b in bad {
        let at = b as u64 * h.page;
        if at > from {
            sink.free(from, at - from);
        }
        from = at + h.page;
    }
    if end > from {
        sink.free(from, end - from);
    }
    Ok(Outcome::Scanned {
        fs: "swap".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::BlockDevice;
    use crate::guest::table::tests::MemDisk;

    struct Runs(Vec<(u64, u64)>);
    impl FreeSink for Runs {
        fn free(&mut self, o: u64, l: u64) {
            self.0.push((o, l));
        }
    }

    fn header(pages: u32, bad: &[u32]) -> Vec<u8> {
        let mut d = vec![0u8; pages as usize * 4096];
        d[4086..4096].copy_from_slice(MAGIC);
        d[1024..1028].copy_from_slice(&1u32.to_le_bytes());
        d[1028..1032].copy_from_slice(&(pages - 1).to_le_bytes());
        d[1032..1036].copy_from_slice(&(bad.len() as u32).to_le_bytes());
        for (i, b) in bad.iter().enumerate() {
            d[1536 + 4 * i..1540 + 4 * i].copy_from_slice(&b.to_le_bytes());
        }
        d
    }

    fn run(d: Vec<u8>) -> (Outcome, Vec<(u64, u64)>) {
        let dev = MemDisk(d);
        let mut r = Runs(Vec::new());
        let o = scan(&Region::whole(&dev as &dyn BlockDevice), &mut r).unwrap();
        (o, r.0)
    }

    #[test]
    fn frees_all_but_the_header_and_bad_pages() {
        let (o, runs) = run(header(10, &[]));
        assert!(matches!(o, Outcome::Scanned { .. }));
        assert_eq!(runs, vec![(4096, 9 * 4096)]);
        let (_, runs) = run(header(10, &[3]));
        assert_eq!(runs, vec![(4096, 2 * 4096), (4 * 4096, 6 * 4096)]);
    }

    #[test]
    fn bad_headers_and_hibernation_are_skipped() {
        let mut d = header(10, &[]);
        d[1024] = 2;
        assert!(matches!(run(d).0, Outcome::Skipped { reason, .. } if reason.contains("version")));
        let mut d = header(10, &[]);
        d[1028..1032].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(run(d).0, Outcome::Skipped { .. }));
        let mut d = header(10, &[]);
        d[4086..4096].copy_from_slice(b"S1SUSPEND\0");
        assert!(
            matches!(run(d).0, Outcome::Skipped { reason, .. } if reason.contains("hibernation"))
        );
        assert_eq!(run(vec![0; 8192]).0, Outcome::NotMine);
        let mut d = header(10, &[11]);
        d[1032] = 1;
        assert!(matches!(run(d).0, Outcome::Skipped { .. }));
    }
}
