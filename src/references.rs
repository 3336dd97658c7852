//! The reference gate: which files named inside an image (qcow2 backing and data files,
//! vmdk extents, vhd parents) may be opened. One place decides, for every format: refused
//! unless the caller opted in; then only relative names, resolved through symlinks, inside
//! the allowed folder; only regular files; no loops; at most [`MAX_CHAIN_DEPTH`] deep.

use std::path::{Path, PathBuf};

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::OpenOptions;

/// Longest chain of images naming each other (backing files, parents) we follow.
pub const MAX_CHAIN_DEPTH: usize = 16;

impl OpenOptions {
    /// Decide whether the file `name`, found in field `field` of the image at `image`,
    /// may be opened, and return its path. Refused unless the caller opted in; even then
    /// only relative names without `..` or protocol prefixes that resolve (through
    /// symlinks) inside the allowed folder.
    pub fn resolve_reference(&self, image: &Path, name: &str, field: &str) -> Result<PathBuf> {
        let refuse = |why: &str| {
            Error::unsafe_ref(format!("{field} names '{name}': {why}"))
                .with_field(field.to_string())
                .with_path(image)
        };
        if !self.allow_references {
            return Err(refuse(
                "refusing to open files named inside an image (opt in with OpenOptions::allow_references)",
            )
            .with_option("OpenOptions::allow_references"));
        }
        if name.is_empty() || name.contains('\0') {
            return Err(refuse("empty or invalid file name"));
        }
        let p = Path::new(name);
        if p.is_absolute() {
            return Err(refuse("absolute paths are never followed"));
        }
        if p.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        }) {
            return Err(refuse(
                "'..' and other special path components are never followed",
            ));
        }
        if let Some(colon) = name.find(':') {
            let prefix = &name[..colon];
            if !prefix.contains('/') {
                return Err(refuse(
                    "protocol-style names (json:, nbd:, http:, ...) are never followed",
                ));
            }
        }
        let image_dir = image
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let root = self.reference_root.as_deref().unwrap_or(image_dir);
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("cannot resolve the reference folder", e).with_path(root))?;
        let candidate = image_dir.join(p);
        let resolved = candidate.canonicalize().map_err(|e| {
            Error::io(format!("{field} names '{name}', which cannot be opened"), e).with_path(image)
        })?;
        if !resolved.starts_with(&root) {
            return Err(refuse(&format!("resolves outside {}", root.display())));
        }
        // Only regular files: opening a FIFO blocks forever and a device reads host
        // state; both can arrive inside an uploaded archive (an OVA is a tar). A folder
        // ("." names the image's own folder) is no image either.
        let meta = std::fs::metadata(&resolved).map_err(|e| {
            Error::io(format!("{field} names '{name}', which cannot be opened"), e).with_path(image)
        })?;
        if !meta.is_file() {
            return Err(refuse(
                "it is not a regular file (a folder, FIFO or device)",
            ));
        }
        if self.chain.contains(&resolved) {
            return Err(refuse(
                "the chain of referenced images loops back on itself",
            ));
        }
        if self.chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::limit(format!(
                "{field} names '{name}': chain of referenced images deeper than {MAX_CHAIN_DEPTH}"
            ))
            .with_path(image));
        }
        Ok(resolved)
    }

    /// Open the image named in field `field` of `image` (a backing file, parent or extent
    /// image) after [`resolve_reference`](Self::resolve_reference) allows it. `format`
    /// forces the format; None probes it.
    pub fn open_reference(
        &self,
        image: &Path,
        name: &str,
        field: &str,
        format: Option<Format>,
    ) -> Result<Box<dyn BlockDevice>> {
        let path = self.resolve_reference(image, name, field)?;
        let me = image.canonicalize().ok();
        if me.as_ref() == Some(&path) {
            // Caught at once rather than one level down, where the chain would see it.
            return Err(Error::unsafe_ref(format!(
                "{field} names '{name}': the image names itself"
            ))
            .with_field(field.to_string())
            .with_path(image));
        }
        let mut child = self.clone();
        child.format = format;
        child.options.clear();
        if let Some(me) = me {
            if child.chain.is_empty() {
                child.chain.push(me);
            }
        }
        child.chain.push(path.clone());
        let open = self.opener.ok_or_else(|| {
            Error::arg(format!(
                "{field} names '{name}': these options were not handed down by diskconv::open, which alone knows how to open an image"
            ))
            .with_path(image)
        })?;
        open(&path, &child)
    }

    /// Open a plain file named inside an image (a flat extent, an external data file)
    /// after [`resolve_reference`](Self::resolve_reference) allows it.
    pub fn open_reference_file(&self, image: &Path, name: &str, field: &str) -> Result<HostFile> {
        let path = self.resolve_reference(image, name, field)?;
        HostFile::open(&path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_refused_by_default_and_confined_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::write(&img, b"x").unwrap();
        std::fs::write(dir.path().join("b.img"), b"y").unwrap();
        let o = OpenOptions::new();
        assert_eq!(
            o.resolve_reference(&img, "b.img", "backing_file")
                .unwrap_err()
                .kind(),
            crate::ErrorKind::UnsafeReference
        );
        let o = OpenOptions::new().allow_references(true, None);
        assert!(o.resolve_reference(&img, "b.img", "backing_file").is_ok());
        for bad in [
            "/etc/passwd",
            "../b.img",
            "json:{}",
            "nbd://x",
            "sub/../../b.img",
        ] {
            assert_eq!(
                o.resolve_reference(&img, bad, "backing_file")
                    .unwrap_err()
                    .kind(),
                crate::ErrorKind::UnsafeReference,
                "{bad}"
            );
        }
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        assert_eq!(
            o.resolve_reference(&img, "link", "f").unwrap_err().kind(),
            crate::ErrorKind::UnsafeReference
        );
        // Not regular files: the folder itself, a FIFO (opening it would block forever).
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        for bad in [".", "sub", "./", "fifo"] {
            assert_eq!(
                o.resolve_reference(&img, bad, "f").unwrap_err().kind(),
                crate::ErrorKind::UnsafeReference,
                "{bad}"
            );
        }
        // An image naming itself as its backing file is refused at once.
        assert_eq!(
            o.open_reference(&img, "a.img", "backing_file", Some(Format::Raw))
                .err()
                .unwrap()
                .kind(),
            crate::ErrorKind::UnsafeReference
        );
        // Options not handed down by the dispatch cannot open anything: the gate has no
        // opener of its own (it sits below the formats).
        assert!(o
            .open_reference(&img, "b.img", "backing_file", Some(Format::Raw))
            .is_err());
        let mut handed_down = o.clone();
        handed_down.opener = Some(crate::formats::open_with);
        let opened = handed_down.open_reference(&img, "b.img", "backing_file", Some(Format::Raw));
        // One byte of raw reads as one whole sector, as qemu-img reads it.
        assert_eq!(opened.unwrap().virtual_size(), 512);
    }
}
