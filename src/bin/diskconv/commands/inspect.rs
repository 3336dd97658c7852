//! `inspect [-f CLAIMED] IMG`: the safety inspection of an uploaded image
//! ([`diskconv::inspect_with`]); exit 2 when it is unsafe. `inspect --guest IMG`: what is
//! inside it ([`diskconv::guest::inspect::inspect`]), like `virt-inspector`.

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
    /// human or json; with --guest also glance-properties (Glance's os_type, os_distro,
    /// os_version, architecture, hw_firmware_type, as a JSON object).
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Look inside the guest instead: partitions, logical volumes, filesystems and the
    /// operating systems on them (distro, version, architecture, hostname, packages,
    /// fstab, firmware), read without booting it. The image is never written.
    #[arg(long = "guest")]
    guest: bool,
    /// With --guest: allow opening files named inside the image (a backing file),
    /// confined to its folder.
    #[arg(long = "allow-references", alias = "allow-backing", requires = "guest")]
    allow_references: bool,
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
    if args.guest {
        return guest(&args);
    }
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

/// `inspect --guest`: open the image read-only and report what is inside it.
fn guest(args: &InspectArgs) -> Result<()> {
    let opts = crate::flags::open_options(args.format.as_deref(), args.allow_references)?;
    let dev: std::sync::Arc<dyn diskconv::BlockDevice> =
        std::sync::Arc::from(diskconv::open(&args.image, &opts)?);
    let insp = diskconv::guest::inspect::inspect(dev)?;
    match args.output.as_str() {
        "glance-properties" => {
            let props = diskconv::guest::inspect::glance::properties(&insp);
            let map: serde_json::Map<String, serde_json::Value> = props
                .into_iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
                .collect();
            println!("{}", serde_json::to_string_pretty(&map).expect("json"));
        }
        other => {
            if output_is_json(other)? {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::json::kebab_json(&insp)).expect("json")
                );
            } else {
                print!("{}", guest_human(&insp));
            }
        }
    }
    Ok(())
}

/// The guest inspection for people: one line per volume, a block per operating system.
fn guest_human(i: &diskconv::guest::inspect::GuestInspection) -> String {
    let mut s = format!("partition table: {}\n", i.partition_table);
    for v in &i.volumes {
        s += &format!("{}: {}", v.location, human_size(v.size));
        let opt = |k: &str, x: &Option<String>| x.as_ref().map(|x| format!(", {k} {x}"));
        s += &opt("type", &v.partition_type).unwrap_or_default();
        s += &opt("filesystem", &v.filesystem).unwrap_or_default();
        s += &opt("label", &v.label).unwrap_or_default();
        s += &opt("uuid", &v.uuid).unwrap_or_default();
        if let Some(u) = v.used {
            s += &format!(", used {}", human_size(u));
        }
        s += &opt("error", &v.error).unwrap_or_default();
        s += "\n";
    }
    for n in &i.notes {
        s += &format!("note: {n}\n");
    }
    for os in &i.operating_systems {
        s += &format!("\noperating system on {}:\n", os.root);
        let mut kv = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                s += &format!("  {k}: {v}\n");
            }
        };
        kv("type", Some(os.os_type.clone()));
        kv("distro", Some(os.distro.clone()));
        kv("product name", os.product_name.clone());
        kv(
            "version",
            Some(format!("{}.{}", os.major_version, os.minor_version)),
        );
        kv("osinfo", os.osinfo.clone());
        kv("arch", os.arch.clone());
        kv("hostname", os.hostname.clone());
        kv("package format", os.package_format.clone());
        kv("package manager", os.package_manager.clone());
        kv("firmware", Some(os.firmware.clone()));
        kv("applications", Some(os.applications.len().to_string()));
        for m in &os.mountpoints {
            s += &format!(
                "  mountpoint: {} {} ({}) on {}\n",
                m.path,
                m.spec,
                m.fs_type,
                m.volume.as_deref().unwrap_or("(not found)")
            );
        }
        for n in &os.notes {
            s += &format!("  note: {n}\n");
        }
    }
    s
}
