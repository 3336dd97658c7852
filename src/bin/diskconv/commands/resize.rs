//! `resize [-f FMT] [--shrink] [--preallocation=off|full] IMG [+ | -]SIZE`: the CLI's side
//! of [`diskconv::resize`], with qemu-img's messages.

use std::path::{Path, PathBuf};

use diskconv::{Error, Format, OpenOptions, Preallocation, ResizeOptions, Result};

use crate::sizes::cvtnum;

/// Change an image's virtual size in place, like qemu-img resize: SIZE is absolute or
/// +SIZE/-SIZE relative (suffixes k, M, G, T, ...). Shrinking needs --shrink.
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "diskconv resize [-f FMT] [--shrink] [--preallocation=off|full] [-q] IMG [+ | -]SIZE",
    args_override_self = true
)]
pub struct ResizeArgs {
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Allow a size below the current one: data past it is lost.
    #[arg(long = "shrink")]
    shrink: bool,
    /// off (new space unallocated) or full (new space written with zeros).
    #[arg(long = "preallocation", default_value = "off")]
    preallocation: String,
    /// Quiet: do not print "Image resized.".
    #[arg(short = 'q')]
    quiet: bool,
    /// Image.
    image: PathBuf,
    /// New size: SIZE, +SIZE or -SIZE.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// Run `resize`.
pub fn exec(args: ResizeArgs) -> Result<()> {
    let format = args.format.as_deref().map(Format::from_name).transpose()?;
    let preallocation = match args.preallocation.as_str() {
        "off" => Preallocation::Off,
        "full" => Preallocation::Full,
        other => {
            return Err(Error::arg(format!(
                "Invalid preallocation mode: '{other}' (diskconv resize takes off or full)"
            )))
        }
    };
    let new_size = resize_target(&args.image, format, &args.size)?;
    let opts = ResizeOptions {
        format,
        shrink: args.shrink,
        preallocation,
        ..Default::default()
    };
    if let Err(e) = diskconv::resize(&args.image, new_size, &opts) {
        if !args.shrink && e.option() == Some("ResizeOptions::shrink") {
            // qemu-img's words, in its order: the refusal, then why it matters.
            eprintln!("diskconv: Use the --shrink option to perform a shrink operation.");
            eprintln!("diskconv: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
            std::process::exit(1);
        }
        return Err(e);
    }
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(())
}

/// The absolute size `arg` asks for: `SIZE`, or `+SIZE`/`-SIZE` relative to the image's
/// current virtual size (read by opening it, without backing files).
fn resize_target(image: &Path, format: Option<Format>, arg: &str) -> Result<u64> {
    let (sign, num) = match arg.as_bytes().first() {
        Some(b'+') => (1i8, &arg[1..]),
        Some(b'-') => (-1, &arg[1..]),
        _ => (0, arg),
    };
    let n = cvtnum("image size", num)?;
    if sign == 0 {
        return Ok(n);
    }
    let mut o = OpenOptions::new().without_backing();
    if let Some(f) = format {
        o = o.format(f);
    }
    let current = diskconv::open(image, &o)?.virtual_size();
    let new = if sign > 0 {
        current.checked_add(n)
    } else {
        current.checked_sub(n)
    };
    new.filter(|&v| v > 0)
        .ok_or_else(|| Error::arg("New image size must be positive").with_path(image))
}
