//! `snapshot -l|-c|-d|-a IMG`: an image's internal snapshots (qcow2) listed, or one
//! created, deleted or applied in place, as qemu-img's.

use std::path::PathBuf;

use diskconv::{Error, Format, Result};

use super::convert::snapshot_option;
use crate::flags::open_options;

/// List (-l), create (-c), delete (-d) or apply (-a) an image's internal snapshots
/// (qcow2), like qemu-img snapshot.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot of the current content named NAME (with the next free ID).
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Delete the first snapshot named NAME (snapshot.id=ID deletes by ID).
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Make snapshot ID-or-NAME's content the current content.
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet (accepted for qemu-img compatibility).
    #[arg(short = 'q')]
    _quiet: bool,
    /// Open read-only without locking (listing only, as qemu-img).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image.
    image: PathBuf,
}

/// Run `snapshot`: `-l` prints the table as qemu-img does (nothing when there are none);
/// `-c/-d/-a` change the image in place and print nothing.
pub fn exec(a: SnapshotArgs) -> Result<()> {
    use diskconv::{SnapshotOp, SnapshotSel};
    let given = [
        a.create.is_some(),
        a.delete.is_some(),
        a.apply.is_some(),
        a.list,
    ];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(Error::arg("Cannot mix '-l', '-a', '-c', '-d'"));
    }
    // A bare value names as qemu-img's does; snapshot.id=ID / snapshot.name=NAME (the keys
    // of convert -l) name exactly.
    fn sel<'a>(v: &'a str, bare: fn(&'a str) -> SnapshotSel<'a>) -> SnapshotSel<'a> {
        match snapshot_option(v) {
            ("snapshot.id", id) => SnapshotSel::Id(id),
            ("snapshot.name", n) => SnapshotSel::Name(n),
            _ => bare(v),
        }
    }
    let op = if let Some(n) = &a.create {
        SnapshotOp::Create(n)
    } else if let Some(v) = &a.delete {
        SnapshotOp::Delete(sel(v, SnapshotSel::Name))
    } else if let Some(v) = &a.apply {
        SnapshotOp::Apply(sel(v, SnapshotSel::IdOrName))
    } else {
        let opts = open_options(a.format.as_deref(), false)?;
        print!(
            "{}",
            diskconv::snapshot_table(&diskconv::snapshots(&a.image, &opts)?)
        );
        return Ok(());
    };
    if a.force_share {
        return Err(Error::arg(format!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.image.display()
        )));
    }
    let format = a.format.as_deref().map(Format::from_name).transpose()?;
    diskconv::snapshot_edit(&a.image, format, &op, None)
}
