//! Format detection. Used only when the caller did not name the format: a named format
//! is never second-guessed (a raw guest disk holding a qcow2 header stays raw).
//!
//! Rules: every format's signature is checked; exactly one match is that format, none is
//! raw, several is an error (a polyglot: a file that one tool reads as qcow2 and another
//! as vmdk is how format-confusion attacks work). The one expected nesting is a VHD
//! footer at the end of a file that is otherwise raw: that is a fixed VHD, not a polyglot,
//! because raw has no signature to collide with. A VHD footer on a file that also carries
//! another format's header is still ambiguous.

use std::path::Path;

use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::format::Format;

/// How many leading bytes probing reads: enough for every header and a vmdk descriptor's
/// first line.
pub const PROBE_HEAD: u64 = 64 * 1024;

/// How many trailing bytes probing reads (a VHD footer).
pub const PROBE_TAIL: u64 = 512;

/// Every non-raw format whose signature `head`/`tail` carry.
pub fn matching_formats(head: &[u8], tail: &[u8]) -> Vec<Format> {
    Format::ALL
        .iter()
        .copied()
        .filter(|f| f.probe(head, tail))
        .collect()
}

/// Signatures of formats this crate does not read but qemu-img would probe, named by
/// qemu's format name. A file claimed as raw (or as one of ours) that carries one of these
/// is dangerous to accept: a consumer that probes would read it as that format, and
/// several of them (qed, vhdx, qcow v1, parallels) can name backing files.
const FOREIGN: &[(&str, usize, &[u8])] = &[
    ("qed", 0, b"QED\0"),
    ("vhdx", 0, b"vhdxfile"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("bochs", 0, b"Bochs Virtual HD Image"),
    ("parallels", 0, b"WithoutFreeSpace"),
    ("parallels", 0, b"WithouFreSpacExt"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format\n"),
];

/// Names (qemu's) of foreign formats whose signature `head`/`tail` carry (the table of magics qemu would honour).
/// The dmg "koly" trailer counts too.
pub fn foreign_signatures(head: &[u8], tail: &[u8]) -> Vec<&'static str> {
    let mut found: Vec<&'static str> = FOREIGN
        .iter()
        .filter(|(_, at, magic)| head.get(*at..).is_some_and(|h| h.starts_with(magic)))
        .map(|(name, _, _)| *name)
        .collect();
    if tail.len() == PROBE_TAIL as usize && tail.starts_with(b"koly") {
        found.push("dmg");
    }
    found.dedup();
    found
}

/// What probing a file found: every signature, ours and foreign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Formats of this crate whose signature the file carries (never raw).
    pub matches: Vec<Format>,
    /// Foreign formats (qemu names) whose signature the file carries.
    pub foreign: Vec<&'static str>,
}

impl ProbeReport {
    /// The detected format: the single match, raw when there is none, None when ambiguous.
    pub fn detected(&self) -> Option<Format> {
        match self.matches.as_slice() {
            [] => Some(Format::Raw),
            [one] => Some(*one),
            _ => None,
        }
    }
}

/// Read the probe window of `file` (the first [`PROBE_HEAD`] bytes and the last
/// [`PROBE_TAIL`]) and report every signature found.
pub fn probe_report(file: &HostFile) -> Result<ProbeReport> {
    let head_len = file.len().min(PROBE_HEAD);
    let head = file.read_vec(0, head_len, "probe header")?;
    let tail_len = file.len().min(PROBE_TAIL);
    let tail = file.read_vec(file.len() - tail_len, tail_len, "probe footer")?;
    Ok(ProbeReport {
        matches: matching_formats(&head, &tail),
        foreign: foreign_signatures(&head, &tail),
    })
}

/// Decide the format of `file`: the single format whose signature it carries, raw when
/// none does, and an error naming them when several do (a polyglot), except that a
/// VHD footer at the end of an otherwise raw file is a VHD.
pub fn probe_file(file: &HostFile) -> Result<Format> {
    let report = probe_report(file)?;
    report.detected().ok_or_else(|| {
        let names: Vec<&str> = report.matches.iter().map(|f| f.name()).collect();
        Error::invalid(format!(
            "ambiguous image: it matches several formats ({}); name the format with -f",
            names.join(", ")
        ))
        .with_path(file.path())
    })
}

/// Detect the format of the image at `path` (see [`probe_file`]).
pub fn probe(path: &Path) -> Result<Format> {
    probe_file(&HostFile::open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::OpenOptions;
    use crate::{ErrorKind, MappingKind};

    fn qcow2_magic() -> Vec<u8> {
        let mut v = b"QFI\xfb\0\0\0\x03".to_vec();
        v.resize(4096, 0);
        v
    }

    /// A valid fixed-VHD footer (checksummed), taken from an image our writer makes.
    fn vhd_footer() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.vhd");
        let opts = crate::CreateOptions::new(8192).option("subformat", "fixed");
        crate::create(&p, Format::Vhd, &opts).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        bytes[bytes.len() - 512..].to_vec()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn no_signature_is_raw_and_one_is_that_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "r", &[7u8; 3000]);
        assert_eq!(probe(&p).unwrap(), Format::Raw);
        let p = write(dir.path(), "q", &qcow2_magic());
        assert_eq!(probe(&p).unwrap(), Format::Qcow2);
        // Shorter than any header: still raw, no error.
        let p = write(dir.path(), "tiny", b"QF");
        assert_eq!(probe(&p).unwrap(), Format::Raw);
        let p = write(dir.path(), "empty", b"");
        assert_eq!(probe(&p).unwrap(), Format::Raw);
    }

    #[test]
    fn vhd_footer_on_otherwise_raw_data_is_vhd() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0x5au8; 8192];
        bytes.extend_from_slice(&vhd_footer());
        let p = write(dir.path(), "fixed.vhd", &bytes);
        assert_eq!(probe(&p).unwrap(), Format::Vhd);
    }

    #[test]
    fn vhd_footer_on_a_qcow2_header_is_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = qcow2_magic();
        bytes.extend_from_slice(&vhd_footer());
        let p = write(dir.path(), "poly", &bytes);
        let e = probe(&p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidFormat);
        assert!(
            e.message().contains("qcow2") && e.message().contains("vpc"),
            "{e}"
        );
        let f = HostFile::open(&p).unwrap();
        let r = probe_report(&f).unwrap();
        assert_eq!(r.matches, vec![Format::Qcow2, Format::Vhd]);
        assert_eq!(r.detected(), None);
    }

    #[test]
    fn named_raw_never_probes() {
        // A raw guest disk whose first sector holds a qcow2 header (and, for good
        // measure, a VHD footer: ambiguous if probed) opens as raw and reads verbatim.
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = qcow2_magic();
        bytes.extend_from_slice(&vhd_footer());
        let p = write(dir.path(), "guest.raw", &bytes);
        let dev = crate::open(&p, &OpenOptions::new().format(Format::Raw)).unwrap();
        assert_eq!(dev.format(), Format::Raw);
        assert_eq!(dev.virtual_size(), bytes.len() as u64);
        let m = dev.map(0, bytes.len() as u64).unwrap();
        assert!(matches!(m.kind, MappingKind::Data { .. }));
        let mut buf = vec![0u8; bytes.len()];
        dev.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, bytes);
    }

    #[test]
    fn foreign_signatures_are_reported() {
        let mut head = b"vhdxfile".to_vec();
        head.resize(1024, 0);
        assert_eq!(foreign_signatures(&head, &[]), vec!["vhdx"]);
        let mut tail = b"koly".to_vec();
        tail.resize(512, 0);
        assert_eq!(foreign_signatures(&[0u8; 16], &tail), vec!["dmg"]);
        assert!(foreign_signatures(b"QED", &[]).is_empty());
        assert_eq!(foreign_signatures(b"QED\0xyz", &[]), vec!["qed"]);
    }
}
