//! [`AtomicOutput`]: an output file appears whole or not at all, even when the process is
//! killed (see [`remove_temporaries`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// An output file written under a temporary sibling name and renamed into place by
/// [`commit`](Self::commit); dropped without commit, the temporary file is removed, so a
/// failed conversion leaves nothing behind.
///
/// The temporary name is short (`.diskconv-<pid>-<n>.tmp`) so that any destination name
/// the filesystem accepts (up to NAME_MAX) works, and every error names the destination,
/// never the hidden temporary path.
#[derive(Debug)]
pub struct AtomicOutput {
    tmp: PathBuf,
    dest: PathBuf,
    /// The name errors give (the path the user named, which may be a symlink to `dest`).
    shown: PathBuf,
    committed: bool,
}

/// Temporary files of this process not yet committed or removed, for
/// [`remove_temporaries`].
static LIVE_TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remove every temporary output file this process has not committed yet. Meant for a
/// signal handler (SIGINT, SIGTERM) that exits the process without unwinding, so that
/// an interrupted conversion leaves nothing behind.
pub fn remove_temporaries() {
    let live = match LIVE_TEMPORARIES.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    };
    for p in live {
        let _ = std::fs::remove_file(p);
    }
}

fn forget_temporary(tmp: &Path) {
    let mut g = LIVE_TEMPORARIES.lock().unwrap_or_else(|p| p.into_inner());
    g.retain(|p| p != tmp);
}

impl AtomicOutput {
    /// Create the temporary sibling of `dest` and return it with its open file. The
    /// folder `dest` names must exist; `dest` itself is not looked at (see
    /// [`Output::open`](super::Output::open) for symlinks, devices and existing files).
    pub fn create(dest: &Path) -> Result<(Self, File)> {
        Self::create_with_mode(dest, dest, 0o666)
    }

    pub(super) fn create_with_mode(dest: &Path, shown: &Path, mode: u32) -> Result<(Self, File)> {
        use std::os::unix::fs::OpenOptionsExt;
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = parent_dir(dest);
        dest.file_name().ok_or_else(|| {
            Error::arg(format!("output path {} has no file name", dest.display()))
        })?;
        for _ in 0..100u32 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".diskconv-{}-{n}.tmp", std::process::id()));
            // Registered before it exists, so a signal arriving right after the open
            // still finds it.
            LIVE_TEMPORARIES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(tmp.clone());
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(f) => {
                    return Ok((
                        AtomicOutput {
                            tmp,
                            dest: dest.to_path_buf(),
                            shown: shown.to_path_buf(),
                            committed: false,
                        },
                        f,
                    ))
                }
                Err(e) => {
                    forget_temporary(&tmp);
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        continue;
                    }
                    return Err(Error::io(
                        format!("cannot create the output file in {}", dir.display()),
                        e,
                    )
                    .with_path(shown));
                }
            }
        }
        Err(Error::arg("cannot find a free temporary file name").with_path(shown))
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Rename the temporary file over the destination; with `sync`, first flush its data
    /// to stable storage so a crash cannot leave a renamed but incomplete file. (Off by
    /// default in the CLI, like qemu-img convert's default `-t unsafe` cache mode.)
    pub fn commit(mut self, sync: bool) -> Result<()> {
        if sync {
            File::open(&self.tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("flushing output", e).with_path(&self.shown))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            Error::io("cannot rename the finished output into place", e).with_path(&self.shown)
        })?;
        self.committed = true;
        forget_temporary(&self.tmp);
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
            forget_temporary(&self.tmp);
        }
    }
}

pub(super) fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
