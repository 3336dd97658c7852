//! Format detection. Used only when the caller did not name the format: a named format
//! is never second-guessed (a raw guest disk holding a qcow2 header stays raw).
//!
//! Rules: every format's signature is checked, ours and those of the formats qemu-img
//! reads and we do not (luks, parallels, dmg, bochs, cloop). Exactly
//! one of ours is that format; exactly one foreign one is refused with an error naming it
//! (converting a luks container's own bytes as the guest disk would be silent garbage);
//! none is raw; several is an error (a polyglot: a file that one tool reads as qcow2 and
//! another as vmdk is how format-confusion attacks work).
//!
//! The one expected nesting is a VHD footer at the end of a file that is otherwise raw:
//! that is a fixed VHD, not a polyglot, because raw has no signature to collide with. It
//! counts only when the file has a fixed VHD's shape (the footer's current_size is the
//! length of the data before it): a guest writes its own last sector and could otherwise
//! make its disk read as any size it likes. A footer without that shape is reported as
//! distrusted (inspect calls it a polyglot); the file is raw, unless another signature is
//! present too, which stays ambiguous.

use std::path::Path;

use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::format::Format;

/// How many leading bytes probing reads: enough for every header and a vmdk descriptor's
/// first line.
pub const PROBE_HEAD: u64 = 64 * 1024;

/// How many trailing bytes probing reads (a VHD footer, a dmg "koly" trailer).
pub const PROBE_TAIL: u64 = 512;

/// Every non-raw format of this crate whose signature `head`/`tail` of a file of
/// `file_len` bytes carry.
pub fn matching_formats(head: &[u8], tail: &[u8], file_len: u64) -> Vec<Format> {
    Format::ALL
        .iter()
        .copied()
        .filter(|f| f.probe(head, tail, file_len))
        .collect()
}

/// A format qemu-img probes that this crate does not read.
struct Foreign {
    /// qemu's name for it.
    name: &'static str,
    /// The signature, for messages.
    signature: &'static str,
    /// Does the file (its first and last bytes) carry the signature?
    found: fn(head: &[u8], tail: &[u8]) -> bool,
}

/// The cloop 2.0 header: a shell script that mounts the image (qemu's `cloop_probe`).
const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// The magics of qemu's `*_probe` functions (block/crypto.c,
/// parallels.c, dmg.c, bochs.c, cloop.c). We match the magic alone where qemu also checks a
/// version field (luks version 1, parallels version 2, bochs type and version): a file
/// carrying the magic with another version is no more a plain disk, and refusing it only
/// costs `-f raw`. Several of these formats can name backing files. (qcow v1 and qed are
/// formats of this crate now; qcow v1 shares qcow2's magic and is told apart by its
/// version, as qemu does.)
const FOREIGN: &[Foreign] = &[
    Foreign {
        name: "luks",
        signature: "'LUKS\\xba\\xbe' at offset 0",
        found: |h, _| h.starts_with(b"LUKS\xba\xbe"),
    },
    Foreign {
        name: "parallels",
        signature: "'WithoutFreeSpace' or 'WithouFreSpacExt' at offset 0",
        found: |h, _| h.starts_with(b"WithoutFreeSpace") || h.starts_with(b"WithouFreSpacExt"),
    },
    Foreign {
        name: "dmg",
        signature: "a 'koly' trailer in the last 512 bytes",
        found: |_, t| t.len() == PROBE_TAIL as usize && t.starts_with(b"koly"),
    },
    Foreign {
        name: "bochs",
        signature: "'Bochs Virtual HD Image' at offset 0",
        found: |h, _| h.starts_with(b"Bochs Virtual HD Image\0"),
    },
    Foreign {
        name: "cloop",
        signature: "the cloop 2.0 shell header at offset 0",
        found: |h, _| h.starts_with(CLOOP_MAGIC),
    },
];

/// Names (qemu's) of foreign formats whose signature `head`/`tail` carry.
pub fn foreign_signatures(head: &[u8], tail: &[u8]) -> Vec<&'static str> {
    let mut found: Vec<&'static str> = FOREIGN
        .iter()
        .filter(|f| (f.found)(head, tail))
        .map(|f| f.name)
        .collect();
    found.dedup();
    found
}

/// The signature of foreign format `name`, for messages.
fn foreign_signature(name: &str) -> &'static str {
    FOREIGN
        .iter()
        .find(|f| f.name == name)
        .map_or("its signature", |f| f.signature)
}

/// What probing a file found: every signature, ours and foreign, trusted or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Formats of this crate whose signature the file carries (never raw).
    pub matches: Vec<Format>,
    /// Foreign formats (qemu names) whose signature the file carries. A file named
    /// `*.dmg` counts as dmg when it carries no other signature: qemu probes dmg by name.
    pub foreign: Vec<&'static str>,
    /// Whether `foreign` holds dmg for the file's name alone (no "koly" trailer).
    pub dmg_by_name: bool,
    /// Signatures of our formats found but not trusted, each with the reason (a VHD
    /// footer in the last sector of a file without a fixed VHD's length).
    pub distrusted: Vec<(Format, String)>,
}

impl ProbeReport {
    /// Judge the first bytes `head` and last bytes `tail` of a file of `file_len` bytes
    /// named `file_name`.
    pub fn from_bytes(head: &[u8], tail: &[u8], file_len: u64, file_name: Option<&str>) -> Self {
        let mut foreign = foreign_signatures(head, tail);
        let mut matches = matching_formats(head, tail, file_len);
        if matches.contains(&Format::Qcow) {
            // qcow v1 carries qcow2's magic; its version says which it is.
            matches.retain(|&f| f != Format::Qcow2);
        }
        let distrusted: Vec<(Format, String)> = Format::ALL
            .iter()
            .filter_map(|&f| f.distrusted_signature(head, tail, file_len).map(|d| (f, d)))
            .collect();
        let dmg_by_name = matches.is_empty()
            && foreign.is_empty()
            && file_name.is_some_and(|n| n.to_ascii_lowercase().ends_with(".dmg"));
        if dmg_by_name {
            foreign.push("dmg");
        }
        ProbeReport {
            matches,
            foreign,
            dmg_by_name,
            distrusted,
        }
    }

    /// The names of every format that claims the file: ours, foreign, and a distrusted
    /// signature when something else claims the file too (beside another format's header
    /// a footer is no longer the expected nesting of a fixed VHD on raw data).
    pub fn claims(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.matches.iter().map(|f| f.name()).collect();
        names.extend(self.foreign.iter().copied());
        if !names.is_empty() {
            for (f, _) in &self.distrusted {
                if !names.contains(&f.name()) {
                    names.push(f.name());
                }
            }
        }
        names
    }

    /// The detected format of this crate: the single format claiming the file, raw when
    /// none does; None when several claim it or the one that does is foreign (see
    /// [`unsupported`](Self::unsupported)).
    pub fn detected(&self) -> Option<Format> {
        if self.claims().len() > 1 || !self.foreign.is_empty() {
            return None;
        }
        Some(self.matches.first().copied().unwrap_or(Format::Raw))
    }

    /// The foreign format (qemu's name) the file is, when that is the only claim.
    pub fn unsupported(&self) -> Option<&'static str> {
        match (self.claims().len(), self.foreign.as_slice()) {
            (1, [one]) => Some(*one),
            _ => None,
        }
    }

    /// The format probing settles on, or the error saying why it cannot: the file is a
    /// format we do not read, or several formats claim it.
    pub fn decide(&self) -> Result<Format> {
        if let Some(f) = self.detected() {
            return Ok(f);
        }
        if let Some(name) = self.unsupported() {
            let why = if self.dmg_by_name {
                "its name ends in .dmg, which qemu-img probes as dmg"
            } else {
                foreign_signature(name)
            };
            return Err(Error::unsupported(format!(
                "the file is a {name} image ({why}): {name} images are not supported yet; \
                 use -f raw to read the file's bytes as a disk"
            )));
        }
        Err(Error::invalid(format!(
            "ambiguous image: it matches several formats ({}); name the format with -f",
            self.claims().join(", ")
        )))
    }
}

/// Read the probe window of `file` (the first [`PROBE_HEAD`] bytes and the last
/// [`PROBE_TAIL`]) and report every signature found.
pub fn probe_report(file: &HostFile) -> Result<ProbeReport> {
    let len = file.len();
    let head_len = len.min(PROBE_HEAD);
    let head = file.read_vec(0, head_len, "probe header")?;
    let tail_len = len.min(PROBE_TAIL);
    let tail = file.read_vec(len - tail_len, tail_len, "probe footer")?;
    let name = file.path().file_name().and_then(|n| n.to_str());
    Ok(ProbeReport::from_bytes(&head, &tail, len, name))
}

/// Decide the format of `file`: the single format whose signature it carries, raw when
/// none does; an error naming the format when it is one qemu-img reads and we do not,
/// and an error naming them when several claim it (a polyglot).
pub fn probe_file(file: &HostFile) -> Result<Format> {
    probe_report(file)?
        .decide()
        .map_err(|e| e.with_path(file.path()))
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
        // The footer does not fit the file's length, so it is distrusted, but beside a
        // qcow2 header it still makes the file ambiguous.
        assert_eq!(r.matches, vec![Format::Qcow2]);
        assert_eq!(r.distrusted.len(), 1);
        assert_eq!(r.claims(), vec!["qcow2", "vpc"]);
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
        assert!(foreign_signatures(&head, &[]).is_empty());
        assert_eq!(matching_formats(&head, &[], 1 << 20), vec![Format::Vhdx]);
        let mut tail = b"koly".to_vec();
        tail.resize(512, 0);
        assert_eq!(foreign_signatures(&[0u8; 16], &tail), vec!["dmg"]);
        // qcow v1 and qed are read now: theirs are our signatures, not foreign ones.
        assert!(foreign_signatures(b"QED\0xyz", &[]).is_empty());
        assert_eq!(
            matching_formats(b"QED\0xyz", &[], 1 << 20),
            vec![Format::Qed]
        );
        assert!(foreign_signatures(b"QFI\xfb\0\0\0\x01", &[]).is_empty());
        let v1 = ProbeReport::from_bytes(b"QFI\xfb\0\0\0\x01", &[], 1 << 20, None);
        assert_eq!(v1.detected(), Some(Format::Qcow));
        let v2 = ProbeReport::from_bytes(b"QFI\xfb\0\0\0\x02", &[], 1 << 20, None);
        assert_eq!(v2.detected(), Some(Format::Qcow2));
    }

    /// Every signature qemu-img probes and we do not read is refused by name; the same
    /// bytes one byte off are raw.
    #[test]
    fn foreign_formats_are_refused_by_name() {
        let mut cases: Vec<(&str, Vec<u8>, Vec<u8>)> = Vec::new();
        let head = |magic: &[u8]| {
            let mut h = magic.to_vec();
            h.resize(4096, 0);
            h
        };
        cases.push(("luks", head(b"LUKS\xba\xbe\0\x01"), vec![]));
        cases.push(("luks", head(b"LUKS\xba\xbe\0\x02"), vec![]));
        cases.push(("parallels", head(b"WithoutFreeSpace\x02\0\0\0"), vec![]));
        cases.push(("parallels", head(b"WithouFreSpacExt\x02\0\0\0"), vec![]));
        cases.push(("bochs", head(b"Bochs Virtual HD Image\0"), vec![]));
        cases.push(("cloop", head(CLOOP_MAGIC), vec![]));
        let mut koly = b"koly".to_vec();
        koly.resize(512, 0);
        cases.push(("dmg", vec![0u8; 4096], koly));
        for (name, h, t) in cases {
            let len = (h.len() + t.len()) as u64;
            let r = ProbeReport::from_bytes(&h, &t, len, Some("image"));
            assert_eq!(r.foreign, vec![name]);
            assert!(r.matches.is_empty(), "{name}: {r:?}");
            assert_eq!(r.detected(), None);
            assert_eq!(r.unsupported(), Some(name));
            let e = r.decide().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            let want = format!(
                "{name} images are not supported yet; use -f raw to read the file's bytes as a disk"
            );
            assert!(e.message().contains(&want), "{e}");
            // Shifted by one byte the magic is gone: raw.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&h);
            let r = ProbeReport::from_bytes(&shifted, &[], len + 1, Some("image"));
            assert_eq!(r.decide().unwrap(), Format::Raw, "{name} shifted");
        }
        // qcow2 (version 2 and 3) is still ours.
        for v in [2u8, 3] {
            let h = head(&[b'Q', b'F', b'I', 0xfb, 0, 0, 0, v]);
            let r = ProbeReport::from_bytes(&h, &[], 4096, None);
            assert_eq!(r.decide().unwrap(), Format::Qcow2);
        }
        // qemu probes dmg by name too: a file named *.dmg with no other signature.
        let r = ProbeReport::from_bytes(&[0u8; 4096], &[0u8; 512], 4608, Some("disk.DMG"));
        assert_eq!(r.unsupported(), Some("dmg"));
        assert!(r.dmg_by_name);
        let e = r.decide().unwrap_err();
        assert!(e.message().contains("name ends in .dmg"), "{e}");
        let r = ProbeReport::from_bytes(&qcow2_magic(), &[0u8; 512], 4608, Some("disk.dmg"));
        assert_eq!(r.decide().unwrap(), Format::Qcow2);
        // A foreign signature beside one of ours is ambiguous.
        let mut tail = b"koly".to_vec();
        tail.resize(512, 0);
        let r = ProbeReport::from_bytes(&qcow2_magic(), &tail, 8192, None);
        let e = r.decide().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidFormat);
        assert!(e.message().contains("qcow2, dmg"), "{e}");
    }

    #[test]
    fn a_footer_that_does_not_fit_the_file_is_raw() {
        let dir = tempfile::tempdir().unwrap();
        let footer = vhd_footer(); // fixed, current_size 8192
                                   // The right shape: 8192 bytes of data before it.
        let mut bytes = vec![0x5au8; 8192];
        bytes.extend_from_slice(&footer);
        let p = write(dir.path(), "fixed.vhd", &bytes);
        assert_eq!(probe(&p).unwrap(), Format::Vhd);
        // One sector more or less of data: raw, with the footer reported.
        for data in [8192 + 512, 8192 - 512, 512] {
            let mut bytes = vec![0x5au8; data];
            bytes.extend_from_slice(&footer);
            let p = write(dir.path(), "guest.raw", &bytes);
            assert_eq!(probe(&p).unwrap(), Format::Raw, "{data}");
            let r = probe_report(&HostFile::open(&p).unwrap()).unwrap();
            assert_eq!(r.distrusted.len(), 1);
            assert_eq!(r.distrusted[0].0, Format::Vhd);
            assert!(r.distrusted[0].1.contains("8192-byte disk"), "{r:?}");
        }
        // A dynamic footer at the end with no copy at offset 0: raw too.
        let mut f = crate::formats::vhd::footer::Footer::parse(&footer).unwrap();
        f.disk_type = crate::formats::vhd::footer::DiskType::Dynamic;
        f.data_offset = 512;
        let mut bytes = vec![0u8; 8192];
        bytes.extend_from_slice(&f.to_bytes());
        let p = write(dir.path(), "dyn-tail.raw", &bytes);
        assert_eq!(probe(&p).unwrap(), Format::Raw);
    }
}
