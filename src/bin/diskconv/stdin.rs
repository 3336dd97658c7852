//! `convert -f raw - DST`: a raw image read from standard input (`rbd export POOL/IMG - |
//! diskconv convert ...`). Without `--size` it is spooled to an anonymous temporary file in
//! $TMPDIR first ([`diskconv::spool`]), which gives its exact length and random access;
//! with `--size N` it is read once through [`diskconv::PipeSource`], with no disk used.

use std::path::Path;

use diskconv::{ConvertOptions, Error, Format, Result};

/// Flags of `convert` that only a SRC of `-` takes.
#[derive(clap::Args, Debug, Default)]
pub struct StdinArgs {
    /// SRC `-` (a raw image on standard input, -f raw): its exact length in bytes
    /// (suffixes k, M, G, ...), read once with no temporary file; a stream shorter or
    /// longer fails and writes nothing. Without it, stdin is first spooled to a deleted
    /// temporary file in $TMPDIR using as much disk as the stream has non-zero 64 KiB
    /// blocks (at most its length; memory stays bounded either way).
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
) -> Result<diskconv::ConvertReport> {
    check_raw(opts)?;
    let Some(size) = &args.size else {
        if sparsify {
            return Err(Error::arg(
                "--sparsify cannot read standard input; save the stream to a file first",
            )
            .with_path("-"));
        }
        let dev = spooled(opts)?;
        return to_dst(dev.as_ref(), dst, opts);
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
    let dev = diskconv::PipeSource::new(std::io::stdin(), size, "-");
    to_dst(&dev, dst, opts)
}

/// Standard input is read as raw only when asked to: a stream is never probed.
fn check_raw(opts: &ConvertOptions) -> Result<()> {
    if opts.open.format != Some(Format::Raw) {
        return Err(Error::arg(
            "standard input can only be read as a raw image: add -f raw (a pipe cannot be \
             probed, nor read at the random offsets other formats need)",
        )
        .with_path("-"));
    }
    Ok(())
}

/// `convert -f raw - s3://BUCKET/KEY`: the upload needs the exact length and a source it
/// can read at any offset, which only the spool gives.
#[cfg(feature = "remote")]
pub fn convert_remote(
    dst: &Path,
    args: &StdinArgs,
    remote: &crate::remote::RemoteArgs,
    opts: &ConvertOptions,
    json: bool,
) -> Result<(diskconv::ConvertReport, Option<serde_json::Value>)> {
    check_raw(opts)?;
    if args.size.is_some() {
        return Err(Error::arg(
            "standard input read once with --size cannot be uploaded to object storage; \
             drop --size to spool it to a temporary file first",
        )
        .with_path("-"));
    }
    let dev = spooled(opts)?;
    crate::remote::convert_device(dev.as_ref(), dst, remote, opts, json)
}

/// Spool standard input into $TMPDIR and open it as raw: a source of exact length that
/// can be read at any offset, gone when the process ends however it ends.
fn spooled(opts: &ConvertOptions) -> Result<Box<dyn diskconv::BlockDevice>> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        // Spooling would wait for typing that never ends with a disk image.
        return Err(Error::arg(
            "standard input is a terminal, not a disk image; pipe the image in",
        )
        .with_path("-"));
    }
    let file = diskconv::spool(std::io::stdin().lock(), &std::env::temp_dir(), "-")?;
    diskconv::open_file(file, "-", &opts.open)
}

fn to_dst(
    dev: &dyn diskconv::BlockDevice,
    dst: &Path,
    opts: &ConvertOptions,
) -> Result<diskconv::ConvertReport> {
    if dst.as_os_str() == "-" {
        diskconv::convert_to_writer(dev, crate::stdout::file()?, opts)
    } else {
        diskconv::convert_to_path(dev, dst, opts)
    }
}
