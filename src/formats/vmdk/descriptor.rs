//! The VMDK text descriptor: header keys (version, CID, parentCID, createType), extent
//! lines (`RW 2048 SPARSE "x.vmdk"`, `RW 2048 FLAT "x-flat.vmdk" 0`) and `ddb.*` keys.
//!
//! The text is at most [`super::sparse::MAX_DESCRIPTOR_BYTES`]; an
//! embedded descriptor ends at its first NUL byte.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

use super::sparse::MAX_DESCRIPTOR_BYTES;

/// Longest extent file name we accept (qemu reads at most 511 bytes).
const MAX_NAME: usize = 4096;
/// Most extent lines we accept (twoGbMaxExtent of a 16 TiB disk needs 8192; VMware's
/// hosted disks stop at 2 TiB).
pub const MAX_EXTENTS: usize = 8192;

/// Access mode of an extent.
///
/// Closed: the VMDK descriptor's access field has exactly these three modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-write.
    Rw,
    /// Read-only.
    RdOnly,
    /// Not accessible (reads as zeros).
    NoAccess,
}

/// Extent type as written in the descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtentType {
    /// Hosted sparse extent file (`KDMV`).
    Sparse,
    /// Plain data file at an offset.
    Flat,
    /// No file: reads as zeros.
    Zero,
    /// ESX flat extent.
    Vmfs,
    /// ESX sparse (`COWD`) extent.
    VmfsSparse,
    /// ESXi seSparse extent.
    SeSparse,
    /// Raw device mappings and anything else.
    Other(String),
}

impl ExtentType {
    fn parse(s: &str) -> Self {
        match s {
            "SPARSE" => ExtentType::Sparse,
            "FLAT" => ExtentType::Flat,
            "ZERO" => ExtentType::Zero,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            other => ExtentType::Other(other.to_string()),
        }
    }

    /// The name as written in descriptors (and in qemu-img info's extent `format`).
    pub fn name(&self) -> &str {
        match self {
            ExtentType::Sparse => "SPARSE",
            ExtentType::Flat => "FLAT",
            ExtentType::Zero => "ZERO",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::Other(s) => s,
        }
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Extent type.
    pub kind: ExtentType,
    /// File name as written (None for ZERO extents).
    pub file: Option<String>,
    /// Offset into the file in sectors (FLAT extents).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `version=`.
    pub version: Option<u32>,
    /// `CID=` (hex).
    pub cid: Option<u32>,
    /// `parentCID=` (hex).
    pub parent_cid: Option<u32>,
    /// `createType=`.
    pub create_type: Option<String>,
    /// `parentFileNameHint=` (a delta disk's parent).
    pub parent_hint: Option<String>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` keys (and any other `key = "value"` lines), unquoted.
    pub keys: BTreeMap<String, String>,
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(v)
}

impl Descriptor {
    /// Parse descriptor text (bytes up to the first NUL). Errors name the line.
    pub fn parse(raw: &[u8]) -> Result<Self> {
        if raw.len() as u64 > MAX_DESCRIPTOR_BYTES {
            return Err(Error::limit(format!(
                "VMDK descriptor of {} bytes exceeds the 1 MiB limit",
                raw.len()
            ))
            .with_field("descriptor"));
        }
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let text = String::from_utf8_lossy(&raw[..end]);
        let mut d = Descriptor::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: &str| {
                Error::invalid(format!(
                    "descriptor line {}: {what}: '{}'",
                    n + 1,
                    line.chars().take(120).collect::<String>()
                ))
                .with_field("descriptor")
            };
            let first = line.split_whitespace().next().unwrap_or("");
            let access = match first {
                "RW" => Some(Access::Rw),
                "RDONLY" => Some(Access::RdOnly),
                "NOACCESS" => Some(Access::NoAccess),
                _ => None,
            };
            if let Some(access) = access {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(Error::limit(format!(
                        "descriptor lists more than {MAX_EXTENTS} extents"
                    ))
                    .with_field("descriptor"));
                }
                d.extents
                    .push(parse_extent(access, &line[first.len()..]).map_err(|m| bad(&m))?);
                continue;
            }
            // Like qemu, lines that are neither extents nor key=value are ignored.
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let k = k.trim();
            let v = unquote(v);
            let hex = |v: &str| {
                u32::from_str_radix(v.trim(), 16).map_err(|_| bad("not a hexadecimal id"))
            };
            match k {
                "version" => {
                    d.version = Some(v.trim().parse().map_err(|_| bad("bad version"))?);
                }
                "CID" => d.cid = Some(hex(v)?),
                "parentCID" => d.parent_cid = Some(hex(v)?),
                "createType" => d.create_type = Some(v.to_string()),
                "parentFileNameHint" => d.parent_hint = Some(v.to_string()),
                _ => {
                    d.keys.insert(k.to_string(), v.to_string());
                }
            }
        }
        Ok(d)
    }

    /// A `ddb.` key's value.
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.keys.get(&format!("ddb.{key}")).map(String::as_str)
    }

    /// Total size of all extents in sectors (checked).
    pub fn total_sectors(&self) -> Result<u64> {
        self.extents.iter().try_fold(0u64, |acc, e| {
            acc.checked_add(e.sectors).ok_or_else(|| {
                Error::limit("the extents' sizes overflow 64 bits").with_field("descriptor")
            })
        })
    }
}

/// Parse `SIZE TYPE ["FILE" [OFFSET]]` after the access word.
fn parse_extent(access: Access, rest: &str) -> std::result::Result<ExtentLine, String> {
    let rest = rest.trim_start();
    let (size, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let sectors: u64 = size
        .parse()
        .map_err(|_| format!("extent size '{size}' is not a number"))?;
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if kind.is_empty() {
        return Err("extent line has no type".into());
    }
    let kind = ExtentType::parse(kind);
    let rest = rest.trim();
    let (file, rest) = if let Some(r) = rest.strip_prefix('"') {
        let close = r
            .find('"')
            .ok_or_else(|| "extent file name has no closing quote".to_string())?;
        (Some(r[..close].to_string()), r[close + 1..].trim())
    } else {
        (None, rest)
    };
    if let Some(f) = &file {
        if f.len() > MAX_NAME {
            return Err("extent file name is too long".into());
        }
    }
    if file.is_none() && kind != ExtentType::Zero {
        return Err("extent line names no file".into());
    }
    let offset = if rest.is_empty() {
        0
    } else {
        rest.split_whitespace()
            .next()
            .unwrap_or("")
            .parse()
            .map_err(|_| format!("extent offset '{rest}' is not a number"))?
    };
    if kind == ExtentType::Flat && file.is_some() && rest.is_empty() {
        return Err("FLAT extent has no offset".into());
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

/// Does `head` look like descriptor text (qemu's probe rule: after comments and blank
/// lines, the first line is `version=1|2|3`)?
pub fn looks_like_descriptor(head: &[u8]) -> bool {
    let mut p = head;
    loop {
        match p.first() {
            None => return false,
            Some(b'#') => match p.iter().position(|&c| c == b'\n') {
                Some(i) => p = &p[i + 1..],
                None => return false,
            },
            Some(b' ') | Some(b'\r') | Some(b'\n') | Some(b'\t') => {
                let i = p
                    .iter()
                    .position(|&c| !matches!(c, b' ' | b'\t' | b'\r'))
                    .unwrap_or(p.len());
                match p.get(i) {
                    Some(b'\n') => p = &p[i + 1..],
                    _ => return false,
                }
            }
            Some(_) => {
                return [b"version=1", b"version=2", b"version=3"]
                    .iter()
                    .any(|v| p.starts_with(*v) && matches!(p.get(9), Some(b'\n' | b'\r')))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_SPLIT: &str = "# Disk DescriptorFile\nversion=1\nCID=80e0157c\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\n# Extent description\nRW 4194304 SPARSE \"t2-s001.vmdk\"\nRW 2097152 FLAT \"t2 f.vmdk\" 128\nRDONLY 100 ZERO\n\n#DDB\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_qemu_descriptor() {
        let d = Descriptor::parse(QEMU_SPLIT.as_bytes()).unwrap();
        assert_eq!(d.version, Some(1));
        assert_eq!(d.cid, Some(0x80e0157c));
        assert_eq!(d.parent_cid, Some(0xffffffff));
        assert_eq!(d.create_type.as_deref(), Some("twoGbMaxExtentSparse"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].kind, ExtentType::Sparse);
        assert_eq!(d.extents[0].file.as_deref(), Some("t2-s001.vmdk"));
        assert_eq!(d.extents[1].file.as_deref(), Some("t2 f.vmdk"));
        assert_eq!(d.extents[1].offset, 128);
        assert_eq!(d.extents[2].kind, ExtentType::Zero);
        assert_eq!(d.extents[2].access, Access::RdOnly);
        assert_eq!(d.ddb("adapterType"), Some("ide"));
        assert_eq!(d.total_sectors().unwrap(), 4194304 + 2097152 + 100);
        assert!(looks_like_descriptor(QEMU_SPLIT.as_bytes()));
        assert!(!looks_like_descriptor(b"hello\nversion=1\n"));
    }

    #[test]
    fn embedded_descriptor_stops_at_nul_and_bad_lines_fail() {
        let mut v = b"version=1\nCID=fffffffe\n".to_vec();
        v.extend_from_slice(&[0, b'x', b'y']);
        assert_eq!(Descriptor::parse(&v).unwrap().cid, Some(0xfffffffe));
        for bad in [
            "RW abc SPARSE \"x\"",
            "RW 10 FLAT \"x\"",
            "RW 10 SPARSE \"x",
            "CID=zz",
        ] {
            assert!(Descriptor::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(
            Descriptor::parse(&vec![b'#'; (1 << 20) + 1])
                .unwrap_err()
                .kind(),
            crate::ErrorKind::LimitExceeded
        );
    }
}
