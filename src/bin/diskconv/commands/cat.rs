//! `cat IMG PATH`: print a guest file, like `virt-cat`.

use std::io::Write;

use diskconv::{Error, Result};

use crate::guest::{open, GuestArgs};

/// Print a file of the guest to stdout (symlinks resolved inside the guest). The image
/// is opened read-only and never written.
#[derive(clap::Args, Debug)]
pub struct CatArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The guest path ("/etc/fstab").
    path: String,
}

/// Run `cat`.
pub fn exec(args: CatArgs) -> Result<()> {
    let mounts = open(&args.guest)?;
    let (fs, inner) = mounts.resolve(&args.path)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    fs.copy_to(&inner, &mut out, u64::MAX)?;
    out.flush().map_err(|e| Error::io("writing stdout", e))
}
