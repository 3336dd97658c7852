//! Options: how to open an image ([`OpenOptions`]), how to create one ([`CreateOptions`],
//! qemu-img's `-o key=value` strings), and qemu's size and on/off syntax. Core vocabulary:
//! imports nothing from the formats. The reference gate's methods on [`OpenOptions`] live
//! in [`crate::references`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::Format;

/// Why a resize that would shrink is refused without [`ResizeOptions::shrink`]; every
/// format's editor says the same.
pub(crate) const SHRINK_REFUSED: &str =
    "the new size is smaller than the image: shrinking drops its tail (set ResizeOptions::shrink to allow it)";

/// One `-o` option a format accepts, for `-o help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub(crate) chain: Vec<PathBuf>,
    /// How a referenced image is opened: the format dispatch hands itself down here when
    /// it opens an image, so the reference gate (core) never imports the formats above it.
    pub(crate) opener: Option<Opener>,
}

/// Equal when a caller's settings are: the chain and the injected opener are the crate's
/// own bookkeeping while it opens an image.
impl PartialEq for OpenOptions {
    fn eq(&self, o: &Self) -> bool {
        self.format == o.format
            && self.allow_references == o.allow_references
            && self.reference_root == o.reference_root
            && self.options == o.options
            && self.no_backing == o.no_backing
    }
}

/// Opens an image by path: [`crate::formats::open_with`], injected into [`OpenOptions`].
pub(crate) type Opener = fn(&Path, &OpenOptions) -> Result<Box<dyn BlockDevice>>;

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
}

/// How to create an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

    /// Check the options as qemu-img's option parser does before a driver sees them
    /// (`qemu_opts_do_parse`): every key must be in `known`, every value of its kind.
    pub(crate) fn check_qemu_kinds(
        &self,
        format: &str,
        known: &[(&str, QemuOptKind)],
    ) -> Result<()> {
        for (k, v) in &self.options {
            let Some((_, kind)) = known.iter().find(|(n, _)| n == k) else {
                return Err(Error::arg(format!(
                    "invalid parameter '{k}': format '{format}' has no such option"
                )));
            };
            match kind {
                QemuOptKind::Str => {}
                QemuOptKind::Bool => {
                    parse_bool(k, v)?;
                }
                QemuOptKind::Number => {
                    self.number_option(k)?;
                }
                QemuOptKind::Size => {
                    self.size_option(k)?;
                }
            }
        }
        Ok(())
    }

    /// A number option as qemu reads one (`strtoull` base 0: decimal, `0x` hex, `0` octal).
    pub(crate) fn number_option(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.options.get(key) else {
            return Ok(None);
        };
        let t = v.trim();
        let parsed = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            u64::from_str_radix(h, 16)
        } else if t.len() > 1 && t.starts_with('0') {
            u64::from_str_radix(&t[1..], 8)
        } else {
            t.parse()
        };
        parsed
            .map(Some)
            .map_err(|_| Error::arg(format!("option {key}: '{v}' is not a number")))
    }
}

/// The kind of a qemu create option's value, which qemu-img checks before the driver
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QemuOptKind {
    /// Any text.
    Str,
    /// on/off.
    Bool,
    /// An unsigned number.
    Number,
    /// A size with an optional unit suffix.
    Size,
}

/// How `resize` preallocates space it adds (qemu-img's `--preallocation`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// New space stays unallocated (holes) where the format allows.
    #[default]
    Off,
    /// New space is written with zeros, so it is reserved on the host.
    Full,
}

/// How to resize an image in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResizeOptions {
    /// The format, when the caller knows it: then no probing happens.
    pub format: Option<Format>,
    /// Allow a new size below the current one (data past it is dropped), like qemu-img's
    /// `--shrink`.
    pub shrink: bool,
    /// How new space is allocated.
    pub preallocation: Preallocation,
    /// Test hook: make the Nth write (1-based) of the operation fail with EIO, to prove
    /// that a failure at any write leaves the image as before or as after.
    #[doc(hidden)]
    pub fail_at_write: Option<u64>,
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

impl CreateOptions {
    /// Check every option key is one of `known` (the options of `format`), so typos are
    /// errors, not silence.
    pub fn check_keys(&self, format: crate::format::Format, known: &[OptionHelp]) -> Result<()> {
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
}
