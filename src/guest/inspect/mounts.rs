//! One guest's filesystems assembled as its fstab mounts them, so a guest path
//! ("/boot/grub/grub.cfg", "/home/u/x") reaches the filesystem that holds it.

use super::{Guest, OsReport};
use crate::error::{Error, Result};
use crate::guest::files::{check_path, FileSystem};

/// Filesystems by mountpoint, the longest mountpoint first.
pub struct Mounts {
    mounts: Vec<(String, Box<dyn FileSystem>)>,
    /// Mountpoints fstab names that could not be opened, and why.
    pub notes: Vec<String>,
}

/// `path` with `.`, `..` and repeated slashes resolved by name, never above `/`: the
/// mountpoint a path falls under is chosen on this form, so `..` cannot climb out of
/// the guest's root.
pub fn normalize(path: &str) -> Result<String> {
    check_path(path)?;
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

impl Mounts {
    /// One filesystem at `/`.
    pub fn single(fs: Box<dyn FileSystem>) -> Mounts {
        Mounts {
            mounts: vec![("/".to_string(), fs)],
            notes: Vec::new(),
        }
    }

    /// The filesystem that holds `path` and the path inside it.
    pub fn resolve(&self, path: &str) -> Result<(&dyn FileSystem, String)> {
        let p = normalize(path)?;
        for (mp, fs) in &self.mounts {
            let inner = if mp == "/" {
                Some(p.as_str())
            } else if p == *mp {
                Some("/")
            } else {
                p.strip_prefix(mp.as_str()).filter(|r| r.starts_with('/'))
            };
            if let Some(inner) = inner {
                return Ok((&**fs, inner.to_string()));
            }
        }
        Err(Error::arg(format!("{path}: no filesystem is mounted at /")))
    }

    /// The mountpoints, longest first.
    pub fn mountpoints(&self) -> impl Iterator<Item = &str> {
        self.mounts.iter().map(|(m, _)| m.as_str())
    }
}

impl Guest {
    /// The filesystems of `os` as its fstab mounts them (root at `/`). A mountpoint
    /// whose volume is not found or does not open is left out with a note.
    pub fn mounts(&self, os: &OsReport) -> Result<Mounts> {
        let mut m = Mounts::single(self.filesystem(&os.root)?);
        for mp in &os.mountpoints {
            if mp.path == "/" {
                continue;
            }
            let Ok(path) = normalize(&mp.path) else {
                continue;
            };
            match mp.volume.as_deref().map(|v| self.filesystem(v)) {
                Some(Ok(fs)) => m.mounts.push((path, fs)),
                Some(Err(e)) => m.notes.push(format!("{}: {e}", mp.path)),
                None => m.notes.push(format!(
                    "{}: no volume on this disk matches {}",
                    mp.path, mp.spec
                )),
            }
        }
        m.mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_stays_inside() {
        assert_eq!(normalize("/../../etc//./x/..").unwrap(), "/etc");
        assert_eq!(normalize("/").unwrap(), "/");
        assert!(normalize("etc").is_err());
    }
}
