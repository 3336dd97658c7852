//! `check` on a file: validate an image's metadata, count what is wrong as qemu-img does
//! (corruptions, leaks, internal errors) and optionally repair what is safe to repair.
//!
//! Each format's checker lives in its folder (`src/formats/<fmt>/check.rs`) and fills a
//! [`Tally`]; this module opens the file, runs it, re-runs it after a repair (qemu-img's
//! "Double checking the fixed image now...") and renders the report as qemu-img prints
//! it. The exit codes are qemu-img's: see [`CheckReport::exit_code`].

use std::path::Path;

use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::format::Format;

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

/// Options of [`check()`].
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// The image's format; probed when None.
    pub format: Option<Format>,
    /// What to repair.
    pub repair: Repair,
    /// Open the files a vmdk descriptor lists as its extents (monolithicFlat,
    /// twoGbMaxExtent*), through the reference gate as [`crate::OpenOptions::allow_references`]
    /// does: only relative names inside the image's folder. Off, checking such an image
    /// fails (exit 1) naming the option.
    pub allow_references: bool,
    /// Test hook: make the Nth write (1-based) of a repair fail with EIO, to prove that a
    /// failure at any write leaves an image qemu-img accepts with its data intact.
    #[doc(hidden)]
    pub fail_at_write: Option<u64>,
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

/// The result of [`check()`]: qemu-img's `ImageCheck`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// The image as named by the caller.
    pub filename: String,
    /// Its format, by qemu-img's name.
    pub format: Format,
    /// False for a format without checks (raw): exit code 63.
    pub supported: bool,
    /// The final check's counts (after a repair, the second check's), with the repair's
    /// fixed counts.
    pub tally: Tally,
    /// The findings of the first check when a repair ran (what was repaired).
    pub repaired_findings: Vec<String>,
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 1 check not completed, 2 corruptions, 3 leaks
    /// only, 63 no checks for this format.
    pub fn exit_code(&self) -> i32 {
        if !self.supported {
            63
        } else if self.tally.check_errors > 0 {
            1
        } else if self.tally.corruptions > 0 {
            2
        } else if self.tally.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// What qemu-img check prints on stdout (`--output=human`).
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let t = &self.tally;
        let mut s = String::new();
        if !self.supported {
            return s;
        }
        if t.corruptions_fixed > 0 || t.leaks_fixed > 0 {
            let _ = write!(
                s,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                t.leaks_fixed, t.corruptions_fixed
            );
        }
        if t.corruptions == 0 && t.leaks == 0 && t.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if t.corruptions > 0 {
                let _ = write!(
                    s,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    t.corruptions
                );
            }
            if t.leaks > 0 {
                let _ = write!(
                    s,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    t.leaks
                );
            }
            if t.check_errors > 0 {
                let _ = write!(
                    s,
                    "\n{} internal errors have occurred during the check.\n",
                    t.check_errors
                );
            }
        }
        if t.total_clusters != 0 && t.allocated_clusters != 0 {
            let a = t.allocated_clusters as f64;
            let _ = writeln!(
                s,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                t.allocated_clusters,
                t.total_clusters,
                a * 100.0 / t.total_clusters as f64,
                t.fragmented_clusters as f64 * 100.0 / a,
                t.compressed_clusters as f64 * 100.0 / a
            );
        }
        if t.image_end_offset != 0 {
            let _ = writeln!(s, "Image end offset: {}", t.image_end_offset);
        }
        s
    }

    /// What qemu-img check prints with `--output=json`: its keys, each optional one
    /// present only when non-zero, as qemu-img leaves them out.
    pub fn json(&self) -> serde_json::Value {
        let t = &self.tally;
        // qemu-img's order (its dictionary's), the optional keys only when non-zero.
        let mut m = serde_json::Map::new();
        let opt = |m: &mut serde_json::Map<String, serde_json::Value>, k: &str, v: u64| {
            if v != 0 {
                m.insert(k.into(), v.into());
            }
        };
        opt(&mut m, "image-end-offset", t.image_end_offset);
        opt(&mut m, "compressed-clusters", t.compressed_clusters);
        opt(&mut m, "total-clusters", t.total_clusters);
        m.insert("check-errors".into(), t.check_errors.into());
        opt(&mut m, "leaks", t.leaks);
        opt(&mut m, "leaks-fixed", t.leaks_fixed);
        opt(&mut m, "corruptions", t.corruptions);
        opt(&mut m, "corruptions-fixed", t.corruptions_fixed);
        opt(&mut m, "allocated-clusters", t.allocated_clusters);
        m.insert("filename".into(), self.filename.clone().into());
        m.insert("format".into(), self.format.to_string().into());
        opt(&mut m, "fragmented-clusters", t.fragmented_clusters);
        serde_json::Value::Object(m)
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

/// Check the image at `path` (and with [`CheckOptions::repair`], repair it in place:
/// the image is locked for the edit, each repair write ordered so that a failure at any
/// write leaves an image no worse than before). Files the image references (backing
/// files, parents) are never opened. A format without checks (raw) gives a report with
/// `supported` false, exit code 63.
pub fn check(path: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let format = match opts.format {
        Some(f) => f,
        None => crate::probe::probe_file(&HostFile::open(path)?)?,
    };
    let mut report = CheckReport {
        filename: path.display().to_string(),
        format,
        supported: format != Format::Raw,
        tally: Tally::default(),
        repaired_findings: Vec::new(),
    };
    if !report.supported {
        return Ok(report);
    }
    let open = |write: bool| -> Result<std::fs::File> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| Error::io("cannot open the image", e).with_path(path))?;
        if write {
            crate::writer::lock_exclusive(&f, path)?;
        }
        Ok(f)
    };
    let refs = crate::options::OpenOptions::new().allow_references(opts.allow_references, None);
    let first = crate::formats::check_image(
        format,
        open(opts.repair != Repair::None)?,
        path,
        opts.repair,
        opts.fail_at_write,
        &refs,
    )
    .map_err(|e| e.with_path(path))?;
    if first.corruptions_fixed == 0 && first.leaks_fixed == 0 {
        report.tally = first;
        return Ok(report);
    }
    let mut second =
        crate::formats::check_image(format, open(false)?, path, Repair::None, None, &refs)
            .map_err(|e| e.with_path(path))?;
    second.corruptions_fixed = first.corruptions_fixed;
    second.leaks_fixed = first.leaks_fixed;
    report.repaired_findings = first.findings;
    report.tally = second;
    Ok(report)
}
