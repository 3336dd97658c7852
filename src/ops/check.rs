//! `check` on a file: validate an image's metadata, count what is wrong as qemu-img does
//! (corruptions, leaks, internal errors) and optionally repair what is safe to repair.
//!
//! Each format's checker lives in its folder (`src/formats/<fmt>/check.rs`) and fills a
//! [`Tally`]; this module opens the file, runs it, re-runs it after a repair (qemu-img's
//! "Double checking the fixed image now...") and renders the report as qemu-img prints
//! it. The exit codes are qemu-img's: see [`CheckReport::exit_code`].

use std::path::Path;

pub use crate::check::{read_padded, Repair, Tally};
use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::format::Format;

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
