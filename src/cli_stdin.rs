//! `convert -f raw --size N - DST`: a raw image read from standard input (`rbd export
//! POOL/IMG - | diskconv convert ...`), through [`diskconv::PipeSource`].

use std::path::Path;

use diskconv::{ConvertOptions, Error, Format, Result};

/// Flags of `convert` that only a SRC of `-` takes.
#[derive(clap::Args, Debug, Default)]
pub struct StdinArgs {
    /// SRC `-` (a raw image on standard input, -f raw): its exact length in bytes
    /// (suffixes k, M, G, ...); a stream shorter or longer fails and writes nothing.
    #[arg(long = "size", value_name = "SIZE")]
    pub size: Option<String>,
}

/// Whether `src` names standard input.
pub fn is_stdin(src: &Path) -> bool {
    src.as_os_str() == "-"
}

/// Refuse `--size` without SRC `-`, where it would silently mean nothing.
pub fn check(src: &Path, args: &StdinArgs) -> Result<()> {
    if args.size.is_some() && !is_stdin(src) {
        return Err(Error::arg(
            "--size is the length of a raw image on standard input; it needs SRC '-'",
        ));
    }
    Ok(())
}

/// Convert the raw image on standard input into `dst` (a file, a device, or `-` for
/// stdout), checking first what a pipe cannot do.
pub fn convert(
    dst: &Path,
    args: &StdinArgs,
    opts: &ConvertOptions,
    sparsify: bool,
    remote_dst: bool,
) -> Result<diskconv::ConvertReport> {
    if opts.open.format != Some(Format::Raw) {
        return Err(Error::arg(
            "standard input can only be read as a raw image: add -f raw (a pipe cannot be \
             probed, nor read at the random offsets other formats need)",
        )
        .with_path("-"));
    }
    let Some(size) = &args.size else {
        return Err(Error::arg(
            "a raw image on standard input needs its exact length: add --size BYTES (for \
             `rbd export POOL/IMG -`, the \"size\" of `rbd info --format json POOL/IMG`)",
        )
        .with_path("-"));
    };
    let size = diskconv::parse_size(size)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| Error::arg(format!("--size: '{size}' is not a positive size")))?;
    if sparsify {
        return Err(Error::arg(
            "--sparsify reads the guest's filesystems at random offsets and cannot read a pipe; \
             save the stream to a file first",
        )
        .with_path("-"));
    }
    if remote_dst {
        return Err(Error::arg(
            "standard input cannot be uploaded to object storage yet; save it to a file first",
        )
        .with_path("-"));
    }
    let dev = diskconv::PipeSource::new(std::io::stdin(), size, "-");
    if dst.as_os_str() == "-" {
        use std::os::fd::AsFd;
        let out = std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("cannot use stdout", e).with_path("-"))?;
        diskconv::convert_to_writer(&dev, std::fs::File::from(out), opts)
    } else {
        diskconv::convert_to_path(&dev, dst, opts)
    }
}
