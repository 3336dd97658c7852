//! An upload service's normalising step: inspect an untrusted image, and only if it is
//! safe, stream it out as a raw image with its MD5 and SHA-512, through the streaming API
//! and into any `impl Write` (here standard output; a service would pass an HTTP body or
//! an object-store upload).
//!
//! ```text
//! cargo run --example uploader -- UPLOAD [CLAIMED_FORMAT] > normalised.raw
//! ```
//!
//! Prints one JSON line on standard error: the virtual size, the bytes sent and the two
//! digests. Exits 2 when the upload is refused (its findings on standard error), 1 on
//! an error, saying whether the upload or the sink failed.

use std::process::ExitCode;

use diskconv::{
    convert_to_writer, inspect_file, ConvertOptions, DigestAlgo, Format, InspectLimits, Side,
};

/// Inspect `path` (claimed to be `claim`) and stream it as raw into `sink`; `Ok(None)` when
/// the inspection refuses it, with the reasons on `log`.
pub fn normalise(
    path: &str,
    claim: Option<Format>,
    sink: impl std::io::Write + Send + 'static,
    log: &mut dyn std::io::Write,
) -> diskconv::Result<Option<serde_json::Value>> {
    // One open: the device inspected is the device read, whatever happens at `path`.
    let file = std::fs::File::open(path).map_err(|e| {
        diskconv::Error::io("cannot open the upload", e)
            .with_path(path)
            .on_side(Side::Source)
    })?;
    let limits = InspectLimits {
        // This service takes disks up to 2 TiB.
        max_virtual_size: 2 << 40,
        ..InspectLimits::default()
    };
    let (report, dev) = inspect_file(file, path, claim, &limits)?;
    let dev = match dev {
        Some(dev) if report.is_safe() => dev,
        _ => {
            for f in &report.findings {
                let _ = writeln!(log, "refused: {}: {}", f.kind, f.detail);
            }
            return Ok(None);
        }
    };
    let mut opts = ConvertOptions::new(Format::Raw);
    opts.digests = vec![DigestAlgo::Md5, DigestAlgo::Sha512];
    let done = convert_to_writer(dev.as_ref(), sink, &opts)?;
    let digest = |algo| {
        done.digests
            .iter()
            .find(|(a, _)| *a == algo)
            .map(|(_, hex)| hex.clone())
    };
    Ok(Some(serde_json::json!({
        "format": report.opened_as,
        "virtual_size": done.virtual_size,
        "size": done.size,
        "md5": digest(DigestAlgo::Md5),
        "sha512": digest(DigestAlgo::Sha512),
    })))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: uploader UPLOAD [CLAIMED_FORMAT] > normalised.raw");
        return ExitCode::from(1);
    };
    let claim = match args.get(1).map(|f| Format::from_name(f)).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("uploader: {e}");
            return ExitCode::from(1);
        }
    };
    let mut log = std::io::stderr();
    match normalise(path, claim, std::io::stdout(), &mut log) {
        Ok(Some(summary)) => {
            eprintln!("{summary}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::from(2),
        Err(e) => {
            // A service answers a bad upload (the client's fault) and a failing sink
            // (its own) differently.
            let side = e.side().map_or("unknown side", |s| s.as_str());
            eprintln!("uploader: {side} failed ({}): {e}", e.kind());
            ExitCode::from(1)
        }
    }
}
