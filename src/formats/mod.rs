//! The formats: one folder each, and the dispatch that picks one.
//!
//! A format module provides `probe`, `open`, `create_writer` and `create_options`; nothing
//! outside its folder knows its on-disk layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::writer::ImageWriter;

pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vmdk;

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// Plain guest bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// Microsoft Virtual Hard Disk (qemu calls it "vpc").
    Vhd,
    /// VMware virtual disk.
    Vmdk,
    /// VirtualBox disk image.
    Vdi,
}

impl Format {
    /// Every format, in probe order.
    pub const ALL: [Format; 5] = [
        Format::Qcow2,
        Format::Vhd,
        Format::Vmdk,
        Format::Vdi,
        Format::Raw,
    ];

    /// The name qemu-img uses (`vpc` for VHD).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vpc",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
        }
    }

    /// Parse a qemu-img format name (`vhd` is accepted as an alias of `vpc`).
    pub fn from_name(name: &str) -> Result<Format> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vpc" | "vhd" => Format::Vhd,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            other => {
                return Err(Error::arg(format!(
                    "unknown format '{other}' (known: raw, qcow2, vpc, vmdk, vdi)"
                )))
            }
        })
    }

    /// Does `head` (the first bytes of a file, up to 64 KiB) and `tail` (its last 512
    /// bytes, or fewer for a short file) of a file of `file_len` bytes look like this
    /// format? Raw always answers false.
    pub fn probe(self, head: &[u8], tail: &[u8], file_len: u64) -> bool {
        match self {
            Format::Raw => false,
            Format::Qcow2 => qcow2::probe(head),
            Format::Vhd => vhd::probe(head, tail, file_len),
            Format::Vmdk => vmdk::probe(head),
            Format::Vdi => vdi::probe(head),
        }
    }

    /// A signature of this format that the file carries but that [`probe`](Self::probe)
    /// does not trust (a VHD footer in the last sector of a file that does not have a
    /// fixed VHD's length), described; None when there is none.
    pub fn distrusted_signature(self, head: &[u8], tail: &[u8], file_len: u64) -> Option<String> {
        match self {
            Format::Vhd => vhd::distrusted_footer(head, tail, file_len),
            _ => None,
        }
    }

    /// The `-o` options this format accepts when writing.
    pub fn create_options(self) -> &'static [OptionHelp] {
        match self {
            Format::Raw => raw::CREATE_OPTIONS,
            Format::Qcow2 => qcow2::CREATE_OPTIONS,
            Format::Vhd => vhd::CREATE_OPTIONS,
            Format::Vmdk => vmdk::CREATE_OPTIONS,
            Format::Vdi => vdi::CREATE_OPTIONS,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Format::from_name(s)
    }
}

/// One `-o` option a format accepts, for `-o help`.
#[derive(Debug, Clone, Copy)]
pub struct OptionHelp {
    /// Option name as typed after `-o`.
    pub name: &'static str,
    /// Value type shown in help ("size", "bool", "string", ...).
    pub kind: &'static str,
    /// One line of help.
    pub help: &'static str,
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format, when the caller knows it: then no probing happens at all.
    pub format: Option<Format>,
    /// Whether files named inside the image (backing files, extents, parents, data files)
    /// may be opened. Off by default: hostile images must not make us read host files.
    pub allow_references: bool,
    /// The folder referenced files must resolve into (default: the image's own folder).
    pub reference_root: Option<PathBuf>,
    /// Format-specific open options (e.g. `force_size_calc` for vpc), like qemu's `-o`.
    pub options: BTreeMap<String, String>,
    /// Open without attaching backing or parent images (qemu's "no backing" open, used by
    /// `info`): their names are still reported, nothing they name is opened, and ranges
    /// they would supply read as unallocated. Never use this to convert: the backing
    /// image's data would be missing. Files that hold the image's own data (vmdk extents,
    /// qcow2 external data files) still go through the reference gate.
    pub no_backing: bool,
    /// Files already open in this chain (for cycle detection and the depth limit).
    chain: Vec<PathBuf>,
}

/// Longest chain of images naming each other (backing files, parents) we follow.
pub const MAX_CHAIN_DEPTH: usize = 16;

impl OpenOptions {
    /// Options that probe the format and refuse every referenced file.
    pub fn new() -> Self {
        Self::default()
    }
    /// Name the format (no probing).
    pub fn format(mut self, format: Format) -> Self {
        self.format = Some(format);
        self
    }
    /// Allow opening files named inside the image, confined to the image's folder (or
    /// `root` when given).
    pub fn allow_references(mut self, allow: bool, root: Option<PathBuf>) -> Self {
        self.allow_references = allow;
        self.reference_root = root;
        self
    }
    /// Open without attaching backing or parent images (see [`OpenOptions::no_backing`]).
    pub fn without_backing(mut self) -> Self {
        self.no_backing = true;
        self
    }
    /// Set a format-specific open option.
    pub fn option(mut self, key: &str, value: &str) -> Self {
        self.options.insert(key.to_string(), value.to_string());
        self
    }

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
                "refusing to open files named inside an image (opt in with --allow-references, or OpenOptions::allow_references)",
            ));
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
        open_with(&path, &child)
    }

    /// Open a plain file named inside an image (a flat extent, an external data file)
    /// after [`resolve_reference`](Self::resolve_reference) allows it.
    pub fn open_reference_file(&self, image: &Path, name: &str, field: &str) -> Result<HostFile> {
        let path = self.resolve_reference(image, name, field)?;
        HostFile::open(&path)
    }
}

/// How to create an image.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Guest size in bytes.
    pub size: u64,
    /// Compress data (`-c`), for formats that can.
    pub compress: bool,
    /// Format-specific options (`-o key=value`); unknown keys are an error.
    pub options: BTreeMap<String, String>,
}

impl CreateOptions {
    /// Options for an image of `size` bytes with no format options.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            ..Default::default()
        }
    }
    /// Set a format option.
    pub fn option(mut self, key: &str, value: &str) -> Self {
        self.options.insert(key.to_string(), value.to_string());
        self
    }
    /// Parse qemu-img's `-o a=b,c=d` syntax (`,,` escapes a comma) into the option map.
    pub fn parse_option_string(&mut self, s: &str) -> Result<()> {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.to_string()),
                None => (item.trim().to_string(), "on".to_string()),
            };
            self.options.insert(k, v);
        }
        Ok(())
    }

    /// Check every option key is one of `format`'s, so typos are errors, not silence.
    pub fn check_known(&self, format: Format) -> Result<()> {
        let known = format.create_options();
        for k in self.options.keys() {
            if !known.iter().any(|o| o.name == k) {
                let names: Vec<&str> = known.iter().map(|o| o.name).collect();
                return Err(Error::arg(format!(
                    "format '{format}' has no option '{k}' (options: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )));
            }
        }
        Ok(())
    }

    /// A size option (`64k`, `2M`, `512`), if present.
    pub fn size_option(&self, key: &str) -> Result<Option<u64>> {
        self.options
            .get(key)
            .map(|v| {
                parse_size(v).map_err(|e| Error::arg(format!("option {key}: {}", e.message())))
            })
            .transpose()
    }
    /// A boolean option (`on/off`, `true/false`, `yes/no`, `1/0`), if present.
    pub fn bool_option(&self, key: &str) -> Result<Option<bool>> {
        self.options
            .get(key)
            .map(|v| parse_bool(key, v))
            .transpose()
    }
    /// A string option, if present.
    pub fn str_option(&self, key: &str) -> Option<&str> {
        self.options.get(key).map(String::as_str)
    }
}

/// Parse a qemu-style size: a number with an optional k/K, M, G, T, P, E suffix
/// (binary units; a trailing `B`/`iB` is allowed).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix {
        "" | "b" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => {
            return Err(Error::arg(format!(
                "invalid size '{s}' (use e.g. 512, 64k, 10G)"
            )))
        }
    };
    let bad = || Error::arg(format!("invalid size '{s}' (use e.g. 512, 64k, 10G)"));
    if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * (1u64 << shift) as f64;
        if !(0.0..1.8e19).contains(&v) {
            return Err(bad());
        }
        return Ok(v as u64);
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Parse an on/off option value.
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(Error::arg(format!("option {key}: '{v}' is not on/off"))),
    }
}

/// A fresh random version-4 UUID in RFC 4122 byte order, for the formats that stamp one
/// on each new image. Random bytes from the OS; if /dev/urandom is unreadable, from std's
/// randomly keyed SipHash (uniqueness is all a UUID needs, not secrecy).
pub fn random_uuid_v4() -> [u8; 16] {
    use std::io::Read;
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let a = s.hash_one((t, std::process::id(), 1u8));
        let c = s.hash_one((t, std::process::id(), 2u8));
        b[..8].copy_from_slice(&a.to_le_bytes());
        b[8..].copy_from_slice(&c.to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// Open `path` with `opts`: the named format, or the probed one.
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let file = HostFile::open(path)?;
    let format = match opts.format {
        Some(f) => f,
        None => crate::probe::probe_file(&file)?,
    };
    let dev = match format {
        Format::Raw => raw::open(file, opts),
        Format::Qcow2 => qcow2::open(file, opts),
        Format::Vhd => vhd::open(file, opts),
        Format::Vmdk => vmdk::open(file, opts),
        Format::Vdi => vdi::open(file, opts),
    };
    dev.map_err(|e| e.with_path(path))
}

/// The outputs that can be written to a pipe or character device, for error messages
/// (each such writer answers true to [`ImageWriter::streams`]).
pub const STREAMING_OUTPUTS: &str =
    "raw, vpc with -o subformat=fixed, vmdk with -o subformat=streamOptimized";

/// Whether `format` can be written into an existing image in place (`-n`): only raw
/// today, whose in-place image is the guest bytes themselves.
pub fn check_in_place(format: Format) -> Result<()> {
    match format {
        Format::Raw => Ok(()),
        other => Err(Error::unsupported(format!(
            "-n (write into an existing image) is supported for -O raw only (files and block \
             devices), not {other}"
        ))),
    }
}

/// Make a writer of `format` over the output `file` (a fresh file, or a
/// [`Sink`](crate::writer::Sink) from [`Output::open`](crate::writer::Output::open)) for
/// the destination `path`.
pub fn create_writer(
    format: Format,
    file: impl Into<crate::writer::Sink>,
    path: &Path,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    opts.check_known(format)?;
    // qemu-img's check, per driver: only qcow2 and vmdk take compressed writes.
    if opts.compress && !matches!(format, Format::Qcow2 | Format::Vmdk) {
        return Err(
            Error::unsupported("Compression not supported for this file format").with_path(path),
        );
    }
    let file = file.into();
    let w = match format {
        Format::Raw => raw::create_writer(file, opts),
        Format::Qcow2 => qcow2::create_writer(file, opts),
        Format::Vhd => vhd::create_writer(file, opts),
        Format::Vmdk => vmdk::create_writer(file, path, opts),
        Format::Vdi => vdi::create_writer(file, opts),
    };
    w.map_err(|e| e.with_path(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert!(parse_size("12x").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn option_string_escapes_commas() {
        let mut o = CreateOptions::default();
        o.parse_option_string("cluster_size=64k,compat=0.10,lazy_refcounts,backing_file=a,,b")
            .unwrap();
        assert_eq!(o.options["cluster_size"], "64k");
        assert_eq!(o.options["lazy_refcounts"], "on");
        assert_eq!(o.options["backing_file"], "a,b");
    }

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
        assert!(o
            .open_reference(&img, "b.img", "backing_file", Some(Format::Raw))
            .is_ok());
    }
}
