//! `inspect [-f CLAIMED] IMG`: the safety inspection of an uploaded image
//! ([`diskconv::inspect_with`]); exit 2 when it is unsafe.

use std::path::PathBuf;

use diskconv::{Format, Result};

use crate::flags::output_is_json;
use crate::sizes::human_size;

/// Check an uploaded image before accepting it: detected format vs the claim, and
/// every safety finding. Never opens files the image names. Exit status 0 only for a
/// safe image of the claimed format, 2 for an unsafe one, 1 on errors.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The format the image is claimed to be.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// With an OVA: which of its disks to inspect (1-based; default the first).
    #[arg(long = "disk", value_name = "N")]
    disk: Option<usize>,
    /// Largest virtual size accepted, with an optional k/M/G/T/P suffix (default 64T):
    /// a larger disk is a finding that makes the image unsafe.
    #[arg(long = "max-virtual-size", value_name = "SIZE")]
    max_virtual_size: Option<String>,
    /// Image.
    image: PathBuf,
}

/// Run `inspect`; exits 2 after printing when the image is unsafe.
pub fn exec(args: InspectArgs) -> Result<()> {
    let claim = args.format.as_deref().map(Format::from_name).transpose()?;
    let mut limits = diskconv::InspectLimits {
        ova_disk: args.disk,
        ..Default::default()
    };
    if let Some(v) = &args.max_virtual_size {
        limits.max_virtual_size = crate::sizes::size_arg("--max-virtual-size", v)?;
    }
    let insp = diskconv::inspect_with(&args.image, claim, &limits)?;
    // Checked once inspected: an image that cannot be read is the first error.
    if output_is_json(&args.output)? {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::json::kebab_json(&insp)).expect("json")
        );
    } else {
        print!("{}", inspection_human(&insp));
    }
    if !insp.safe {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(2);
    }
    Ok(())
}

/// The inspection for people: what was claimed and found, the verdict, one line per
/// finding.
fn inspection_human(i: &diskconv::Inspection) -> String {
    let fmt = |f: Option<Format>| f.map(|f| f.name().to_string());
    let mut s = format!("image: {}\nfile size: {}\n", i.path, i.file_size);
    s += &format!(
        "claimed format: {}\n",
        fmt(i.claimed_format).unwrap_or_else(|| "(none)".into())
    );
    let detected = fmt(i.detected_format).unwrap_or_else(|| match &i.unsupported_format {
        Some(name) => format!("{name} (not supported)"),
        None => format!("ambiguous ({})", i.claiming_formats.join(", ")),
    });
    s += &format!("detected format: {detected}\n");
    if let Some(v) = i.virtual_size {
        s += &format!("virtual size: {} ({v} bytes)\n", human_size(v));
    }
    if let Some(m) = &i.map {
        s += &format!(
            "map: {} calls, {}; data {} B, zero {} B, unallocated {} B\n",
            m.calls,
            if m.complete { "complete" } else { "incomplete" },
            m.data_bytes,
            m.zero_bytes,
            m.unallocated_bytes
        );
    }
    s += &format!("verdict: {}\n", if i.safe { "safe" } else { "UNSAFE" });
    for f in &i.findings {
        let class = if f.hazard { "unsafe" } else { "info" };
        s += &format!("[{class}] {:?}: {}\n", f.kind, f.detail);
    }
    s
}
