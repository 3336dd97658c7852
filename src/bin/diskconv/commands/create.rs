//! `create [-f FMT] [-o OPTIONS] FILE SIZE`: an empty image, with qemu-img's
//! "Formatting ..." line.

use std::path::{Path, PathBuf};

use diskconv::{parse_size, CreateOptions, Error, Format, Result};

use crate::sizes::cvtnum;

/// Create an empty image FILE of SIZE bytes (suffixes k, M, G, T, ...), like qemu-img create.
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "diskconv create [-f FMT] [-o OPTIONS] [-q] FILE SIZE",
    after_help = crate::FORMATS_HELP,
    args_override_self = true
)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Format options, key=value[,key=value...]; `-o help` lists them.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Quiet: do not print the "Formatting" line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image to create (replaced if it exists).
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// Guest size (suffixes k, M, G, T, ...).
    #[arg(value_name = "SIZE")]
    size: Option<String>,
}

/// Run `create` (or list the format's options with `-o help`).
pub fn exec(args: CreateArgs) -> Result<()> {
    let format = Format::from_name(&args.format)?;
    let mut create = CreateOptions::default();
    for o in &args.options {
        create.parse_option_string(o)?;
    }
    if crate::option_help::asked(&create) {
        crate::option_help::print(format);
        return Ok(());
    }
    let file = args
        .file
        .ok_or_else(|| Error::arg("Expecting image file name"))?;
    let size = args
        .size
        .ok_or_else(|| Error::arg("Image creation needs a size parameter").with_path(&file))?;
    create.size = cvtnum("image size", &size)?;
    diskconv::formats::check_writable(format).map_err(|e| e.with_path(&file))?;
    if !args.quiet {
        println!("{}", formatting_line(&file, format, &create));
    }
    for w in diskconv::create(&file, format, &create)? {
        if !args.quiet {
            eprintln!("diskconv: note: {w}");
        }
    }
    Ok(())
}

/// qemu-img create's first line: `Formatting 'FILE', fmt=FMT` and the options in the
/// order qemu's drivers list them, with their defaults, then any other option given.
fn formatting_line(file: &Path, format: Format, opts: &CreateOptions) -> String {
    let size = opts.size.to_string();
    let order: &[(&str, Option<&str>)] = match format {
        Format::Raw => &[("size", None), ("preallocation", None)],
        Format::Qcow2 => &[
            ("cluster_size", Some("65536")),
            ("extended_l2", Some("off")),
            ("preallocation", None),
            ("compression_type", Some("zlib")),
            ("size", None),
            ("backing_file", None),
            ("backing_fmt", None),
            ("compat", None),
            ("lazy_refcounts", Some("off")),
            ("refcount_bits", Some("16")),
        ],
        Format::Vhd => &[("size", None), ("subformat", None), ("force_size", None)],
        Format::Vmdk => &[
            ("size", None),
            ("adapter_type", None),
            ("backing_file", None),
            ("compat6", Some("off")),
            ("hwversion", Some("undefined")),
            ("toolsversion", None),
            ("subformat", None),
            ("zeroed_grain", None),
        ],
        Format::Vdi => &[("size", None), ("static", Some("off"))],
        Format::Vhdx => &[
            ("size", None),
            ("log_size", Some("1048576")),
            ("block_size", Some("0")),
            ("subformat", None),
        ],
        _ => &[("size", None)],
    };
    let mut line = format!("Formatting '{}', fmt={format}", file.display());
    for (k, default) in order {
        let v = if *k == "size" {
            Some(size.clone())
        } else {
            opts.str_option(k)
                .map(|v| option_shown(format, k, v))
                .or(default.map(str::to_string))
        };
        if let Some(v) = v {
            line += &format!(" {k}={v}");
        }
    }
    for (k, v) in &opts.options {
        if !order.iter().any(|(o, _)| o == k) {
            line += &format!(" {k}={}", option_shown(format, k, v));
        }
    }
    line
}

/// An option value as qemu prints it: sizes in bytes, booleans as on/off.
fn option_shown(format: Format, key: &str, v: &str) -> String {
    let kind = format
        .create_options()
        .iter()
        .find(|o| o.name == key)
        .map(|o| o.kind);
    match kind {
        Some("size") => parse_size(v).map_or(v.to_string(), |n| n.to_string()),
        Some("bool") => diskconv::parse_bool(key, v)
            .map_or(v.to_string(), |b| if b { "on" } else { "off" }.to_string()),
        _ => v.to_string(),
    }
}
