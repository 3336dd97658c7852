//! An image registry's intake: inspect an uploaded file and print the record a registry
//! such as OpenStack Glance keeps for it, as JSON: `disk_format`, `virtual_size`, `size`,
//! `checksum` (MD5), `os_hash_algo` and `os_hash_value` (SHA-512), all of the file as
//! stored, plus the inspection's verdict and findings.
//!
//! ```text
//! cargo run --example registry_probe -- IMAGE [CLAIMED_FORMAT]
//! ```
//!
//! Exits 0 for a safe image, 2 for one the registry should refuse (the record still says
//! why), 1 on an error.

use std::process::ExitCode;

use diskconv::writer::Digester;
use diskconv::{inspect_file, DigestAlgo, Format, InspectLimits};

/// The registry record of the file at `path` (claimed to be `claim`), and whether it is
/// safe to accept.
pub fn record(path: &str, claim: Option<Format>) -> diskconv::Result<(serde_json::Value, bool)> {
    let file = std::fs::File::open(path)
        .map_err(|e| diskconv::Error::io("cannot open the image", e).with_path(path))?;
    // The digests are of the same descriptor the inspection reads.
    let hashed = file
        .try_clone()
        .map_err(|e| diskconv::Error::io("cannot duplicate the descriptor", e))?;
    let (report, _dev) = inspect_file(file, path, claim, &InspectLimits::default())?;
    let digests = Digester::of_file(
        &hashed,
        report.file_size,
        &[DigestAlgo::Md5, DigestAlgo::Sha512],
    )
    .map_err(|e| diskconv::Error::io("cannot hash the image", e).with_path(path))?
    .finish();
    let hex = |algo| {
        digests
            .iter()
            .find(|(a, _)| *a == algo)
            .map(|(_, h)| h.clone())
    };
    // Glance calls qemu's "vpc" "vhd"; the other names are the same.
    let disk_format = report.opened_as.map(|f| match f {
        Format::Vhd => "vhd",
        f => f.name(),
    });
    let rec = serde_json::json!({
        "disk_format": disk_format,
        "virtual_size": report.virtual_size,
        "size": report.file_size,
        "checksum": hex(DigestAlgo::Md5),
        "os_hash_algo": "sha512",
        "os_hash_value": hex(DigestAlgo::Sha512),
        "safe": report.is_safe(),
        "findings": report.findings,
    });
    Ok((rec, report.is_safe()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: registry_probe IMAGE [CLAIMED_FORMAT]");
        return ExitCode::from(1);
    };
    let claim = match args.get(1).map(|f| Format::from_name(f)).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("registry_probe: {e}");
            return ExitCode::from(1);
        }
    };
    match record(path, claim) {
        Ok((rec, safe)) => {
            println!("{rec}");
            if safe {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("registry_probe: {e}");
            ExitCode::from(1)
        }
    }
}
