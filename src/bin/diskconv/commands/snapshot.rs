//! `snapshot -l IMG`: an image's internal snapshots as qemu-img lists them. Listing only:
//! the image is never changed.

use std::path::PathBuf;

use diskconv::Result;

use crate::flags::open_options;

/// List an image's internal snapshots (qcow2), like qemu-img snapshot -l.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l', required = true)]
    list: bool,
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet (accepted for qemu-img compatibility).
    #[arg(short = 'q')]
    _quiet: bool,
    /// Accepted for qemu-img compatibility: the image is opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Image.
    image: PathBuf,
}

/// Run `snapshot -l`: the table as qemu-img prints it (nothing when there are none).
pub fn exec(a: SnapshotArgs) -> Result<()> {
    debug_assert!(a.list);
    let opts = open_options(a.format.as_deref(), false)?;
    print!(
        "{}",
        diskconv::snapshot_table(&diskconv::snapshots(&a.image, &opts)?)
    );
    Ok(())
}
