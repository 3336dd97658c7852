//! The words a check is written in, shared by every format's checker
//! (`src/formats/<fmt>/check.rs`) and the `check` command (`crate::ops::check`, which
//! re-exports them): what to repair ([`Repair`]), what was found ([`Tally`]), and how a
//! checker reads tables that may run past the end of the file ([`read_padded`]). In the
//! core so that the formats never import the commands above them.

use crate::device::HostFile;
use crate::error::{Error, Result};

/// What a check may repair, as qemu-img's `-r`.
///
/// Closed: qemu-img's `-r` has exactly these modes (none, `leaks`, `all`); a new kind of
/// repair is a new meaning of `All`, not a new variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Repair {
    /// Only look (the default).
    #[default]
    None,
    /// `-r leaks`: free leaked space (qcow2 refcounts too high; the file truncated to the
    /// image's end).
    Leaks,
    /// `-r all`: leaks, and every corruption that can be fixed without guessing (qcow2
    /// refcounts too low and OFLAG_COPIED flags, a vmdk redundant grain directory from the
    /// primary, a vhd footer from its copy, a vdi header's allocated-block count, a vhdx
    /// header or region table copy from the good one).
    All,
}

impl Repair {
    /// Parse qemu-img's `-r` argument.
    pub fn parse(s: &str) -> Result<Repair> {
        match s {
            "leaks" => Ok(Repair::Leaks),
            "all" => Ok(Repair::All),
            other => Err(Error::arg(format!(
                "Unknown option value for -r (expecting 'leaks' or 'all'): {other}"
            ))),
        }
    }

    /// Whether leaks are repaired.
    pub fn leaks(self) -> bool {
        self != Repair::None
    }

    /// Whether corruptions are repaired.
    pub fn all(self) -> bool {
        self == Repair::All
    }
}

/// What one format's checker found: qemu's `BdrvCheckResult`. Formats fill it; the
/// counters are qemu's, the findings its stderr lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Internal errors: the check could not be completed (I/O errors, tables that could
    /// not be read).
    pub check_errors: u64,
    /// Corruptions: metadata that is wrong and may lose data or corrupt it on write.
    pub corruptions: u64,
    /// Leaks: space marked used that nothing uses.
    pub leaks: u64,
    /// Corruptions a repair fixed.
    pub corruptions_fixed: u64,
    /// Leaks a repair fixed.
    pub leaks_fixed: u64,
    /// Where the image's used space ends (0 when the format does not say).
    pub image_end_offset: u64,
    /// Guest clusters (qcow2), 0 for formats that do not count them.
    pub total_clusters: u64,
    /// Allocated guest clusters of the active image.
    pub allocated_clusters: u64,
    /// Allocated clusters not directly after the previous one of their L2 table (and
    /// every compressed cluster), qemu's definition.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// One line per problem found, as qemu-img writes them to stderr.
    pub findings: Vec<String>,
}

impl Tally {
    /// Record a corruption with its description.
    pub fn corrupt(&mut self, msg: impl Into<String>) {
        self.corruptions += 1;
        self.findings.push(msg.into());
    }

    /// Record a leak with its description.
    pub fn leak(&mut self, msg: impl Into<String>) {
        self.leaks += 1;
        self.findings.push(msg.into());
    }

    /// Record an internal error (the check could not look at something).
    pub fn error(&mut self, msg: impl Into<String>) {
        self.check_errors += 1;
        self.findings.push(msg.into());
    }
}

/// Read `len` bytes at `offset` of `host`, the part past the end of the file as zeros (as
/// qemu's block layer reads it). Allocates at most what lies inside the file plus `len`
/// when the caller bounded `len` (tables of at most a few MiB).
pub fn read_padded(host: &HostFile, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let len_us = usize::try_from(len).map_err(|_| Error::limit(format!("{what}: {len} bytes")))?;
    let mut v = vec![0u8; len_us];
    let flen = host.len();
    if offset < flen {
        let n = (flen - offset).min(len) as usize;
        host.read_exact_at(&mut v[..n], offset, what)?;
    }
    Ok(v)
}
