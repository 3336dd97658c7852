//! `copy-out IMG PATH DIR`: copy a guest file or tree out, like `virt-copy-out`.

use std::fs;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use diskconv::guest::files::FileKind;
use diskconv::guest::inspect::Mounts;
use diskconv::{Error, Result};

use crate::guest::{open, GuestArgs};

/// The most entries one copy writes (a hostile tree).
const MAX_COPIED: u64 = 10_000_000;

/// Copy a file or directory of the guest into the host directory DIR (which must
/// exist), as DIR/NAME. Directories are copied recursively; symlinks are recreated as
/// symlinks, never followed; device files, fifos and sockets are skipped with a note.
/// Nothing already in DIR is overwritten or written through: every file and directory
/// is created new, so a name that exists is an error. The image is never written.
#[derive(clap::Args, Debug)]
pub struct CopyOutArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The guest path to copy.
    path: String,
    /// The host directory to copy into.
    dir: std::path::PathBuf,
}

struct Copier<'a> {
    mounts: &'a Mounts,
    copied: u64,
}

fn io(what: &Path, e: std::io::Error) -> Error {
    Error::io(format!("creating {}", what.display()), e)
}

impl Copier<'_> {
    fn copy(&mut self, guest: &str, host: &Path) -> Result<()> {
        self.copied += 1;
        if self.copied > MAX_COPIED {
            return Err(Error::limit(format!(
                "more than {MAX_COPIED} entries to copy"
            )));
        }
        let (fs, inner) = self.mounts.resolve(guest)?;
        let meta = fs.symlink_metadata(&inner)?;
        match meta.kind {
            FileKind::Dir => {
                fs::create_dir(host).map_err(|e| io(host, e))?;
                for e in fs.read_dir(&inner)? {
                    if e.lossy || e.name.contains('/') {
                        eprintln!("diskconv: note: {guest}: skipped a name that is not UTF-8");
                        continue;
                    }
                    let child = if guest.ends_with('/') {
                        format!("{guest}{}", e.name)
                    } else {
                        format!("{guest}/{}", e.name)
                    };
                    self.copy(&child, &host.join(&e.name))?;
                }
                let mode = fs::Permissions::from_mode((meta.mode & 0o777) | 0o700);
                fs::set_permissions(host, mode).map_err(|e| io(host, e))
            }
            FileKind::File => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(meta.mode & 0o777 | 0o600)
                    .open(host)
                    .map_err(|e| io(host, e))?;
                fs.copy_to(&inner, &mut f, u64::MAX)?;
                Ok(())
            }
            FileKind::Symlink => {
                let target = fs.read_link(&inner)?;
                symlink(&target, host).map_err(|e| io(host, e))
            }
            other => {
                eprintln!("diskconv: note: {guest}: a {other:?} is not copied");
                Ok(())
            }
        }
    }
}

/// Run `copy-out`.
pub fn exec(args: CopyOutArgs) -> Result<()> {
    if !args.dir.is_dir() {
        return Err(Error::arg(format!(
            "{} is not a directory",
            args.dir.display()
        )));
    }
    let mounts = open(&args.guest)?;
    let norm = diskconv::guest::inspect::normalize(&args.path)?;
    let name = norm
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("root");
    let mut c = Copier {
        mounts: &mounts,
        copied: 0,
    };
    c.copy(&norm, &args.dir.join(name))
}
