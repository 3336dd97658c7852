//! What `ls`, `cat` and `copy-out` share: the image and volume flags, and opening a
//! guest's filesystems as its fstab mounts them (or one volume, with --fs).

use std::path::PathBuf;
use std::sync::Arc;

use diskconv::guest::inspect::{Guest, Mounts};
use diskconv::{Error, Result};

use crate::flags::open_options;

/// The flags naming an image and which of its filesystems to read.
#[derive(clap::Args, Debug)]
pub struct GuestArgs {
    /// Image format (never probed when given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Read this volume only, at / ("gpt 2", "mbr 1", "lvm vg/root", "disk", as
    /// `inspect --guest` lists them); default: the operating system's root with its
    /// fstab's mountpoints.
    #[arg(long = "fs", value_name = "VOLUME")]
    volume: Option<String>,
    /// Allow opening files named inside the image (a backing file), confined to its folder.
    #[arg(long = "allow-references", alias = "allow-backing")]
    allow_references: bool,
    /// Image.
    pub image: PathBuf,
}

/// Open the image read-only and assemble the filesystems a guest path reaches.
pub fn open(args: &GuestArgs) -> Result<Mounts> {
    let opts = open_options(args.format.as_deref(), args.allow_references)?;
    let dev: Arc<dyn diskconv::BlockDevice> = Arc::from(diskconv::open(&args.image, &opts)?);
    let mut guest = Guest::open(dev)?;
    if let Some(v) = &args.volume {
        return Ok(Mounts::single(guest.filesystem(v)?));
    }
    let insp = guest.inspect();
    if let Some(os) = insp.operating_systems.first() {
        let m = guest.mounts(os)?;
        for n in &m.notes {
            eprintln!("diskconv: note: {n}");
        }
        return Ok(m);
    }
    let readable: Vec<&str> = insp
        .volumes
        .iter()
        .filter(|v| v.error.is_none() && guest.filesystem(&v.location).is_ok())
        .map(|v| v.location.as_str())
        .collect();
    match readable.as_slice() {
        [one] => Ok(Mounts::single(guest.filesystem(one)?)),
        _ => Err(Error::arg(format!(
            "no operating system found in {}; name a volume with --fs (readable: {})",
            args.image.display(),
            if readable.is_empty() {
                "none".to_string()
            } else {
                readable.join(", ")
            }
        ))),
    }
}
