//! The tar layer of an OVA: a walk over the archive's headers that finds every member's
//! name, data offset and size without reading the data, and refuses what an appliance
//! has no business holding (paths, links, devices, sparse members, members past the end).
//!
//! The `tar` crate parses each header and pax record; the walk itself is ours so that
//! every length is checked against the file before anything is read or allocated (the
//! crate's `Archive` reads a GNU long name or pax record of any claimed size into memory).

use crate::error::{Error, Result};

/// A tar block.
pub const BLOCK: u64 = 512;
/// The most members an appliance may have: real ones hold an .ovf, a few disks, a .mf and
/// a .cert.
pub const MAX_MEMBERS: usize = 1024;
/// The largest pax record or GNU long name accepted (a name is at most a few hundred bytes).
pub const MAX_EXTENSION: u64 = 64 << 10;

/// One regular file in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name: one path component, no `/`, never `.` or `..`.
    pub name: String,
    /// Where its header block starts.
    pub header_offset: u64,
    /// Where its data starts (a block multiple).
    pub offset: u64,
    /// Its length in bytes.
    pub size: u64,
}

/// Positional reads over the archive (the host file, or the probe's head bytes).
pub trait ReadAt {
    /// The archive's length.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; `what` names the structure for errors.
    fn read_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()>;
}

impl ReadAt for crate::device::HostFile {
    fn size(&self) -> u64 {
        self.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        self.read_exact_at(buf, offset, what)
    }
}

/// The first bytes of a file of `len` bytes (probing): sizes are checked against the whole
/// file, reads past the bytes at hand fail.
pub struct Head<'a> {
    /// The bytes read.
    pub bytes: &'a [u8],
    /// The file's length.
    pub len: u64,
}

impl ReadAt for Head<'_> {
    fn size(&self) -> u64 {
        self.len.max(self.bytes.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        self.bytes.read_at(buf, offset, what)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.len() as u64 => {
                buf.copy_from_slice(&self[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(Error::corrupt(format!("{what} runs past the end of the data")).at(offset)),
        }
    }
}

/// The header's checksum: the byte sum with the checksum field read as spaces (POSIX
/// ustar; old tars summed signed bytes, accepted too).
fn checksum_ok(block: &[u8; 512]) -> bool {
    let Some(stored) = parse_octal(&block[148..156]) else {
        return false;
    };
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    stored == unsigned || i64::try_from(stored).ok() == Some(signed)
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return None;
    }
    u64::from_str_radix(s, 8).ok()
}

/// Refuse a member name that is not one plain file name, naming the rule it breaks.
pub fn check_name(name: &str, at: u64) -> Result<()> {
    let why = if name.is_empty() {
        Some("an empty name")
    } else if name.contains('/') || name.contains('\\') {
        Some("a path (an appliance's members are plain file names)")
    } else if name == "." || name == ".." || name.contains("..") {
        Some("'..' in it")
    } else if name.chars().any(|c| c.is_control()) {
        Some("a control character in it")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::unsafe_ref(format!(
            "tar member '{}' has {why}: refused",
            name.escape_debug()
        ))
        .with_field("tar member name")
        .at(at)),
    }
}

/// What a pending extension header (pax `x`, GNU `L`) says about the next member.
#[derive(Default)]
struct Pending {
    name: Option<String>,
    size: Option<u64>,
}

/// Walk the archive and return its regular members in order. Stops at the end-of-archive
/// blocks (two zero blocks) or at the end of the file on a block boundary; anything else
/// that does not parse is an error naming the offset.
pub fn members(src: &(impl ReadAt + ?Sized)) -> Result<Vec<Member>> {
    walk(src, usize::MAX)
}

/// The first regular member only (probing).
pub fn first_member(src: &(impl ReadAt + ?Sized)) -> Result<Option<Member>> {
    Ok(walk(src, 1)?.into_iter().next())
}

fn walk(src: &(impl ReadAt + ?Sized), want: usize) -> Result<Vec<Member>> {
    let len = src.size();
    let mut out: Vec<Member> = Vec::new();
    let mut pos = 0u64;
    let mut pending = Pending::default();
    let mut headers = 0usize;
    while out.len() < want {
        if pos == len {
            break; // no end-of-archive blocks: GNU tar reads such archives too
        }
        if len - pos < BLOCK {
            return Err(Error::corrupt(format!(
                "tar header at {pos:#x} is cut short by the end of the file ({len} bytes)"
            ))
            .with_field("tar header")
            .at(pos));
        }
        let mut block = [0u8; 512];
        src.read_at(&mut block, pos, "tar header")?;
        if block.iter().all(|&b| b == 0) {
            break;
        }
        headers += 1;
        if headers > MAX_MEMBERS * 2 {
            return Err(Error::limit(format!(
                "the archive has more than {MAX_MEMBERS} members: not an appliance"
            ))
            .at(pos));
        }
        if !checksum_ok(&block) {
            return Err(Error::invalid(format!(
                "tar header at {pos:#x} has a bad checksum: not a tar archive, or a damaged one"
            ))
            .with_field("tar header checksum")
            .at(pos));
        }
        let header = tar::Header::from_byte_slice(&block);
        let size = match pending.size.take() {
            Some(s) => s,
            None => header.entry_size().map_err(|e| {
                Error::corrupt(format!("tar header at {pos:#x}: bad size field: {e}"))
                    .with_field("tar size")
                    .at(pos)
            })?,
        };
        let data = pos + BLOCK;
        let end = data
            .checked_add(size)
            .filter(|&e| e <= len)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "tar member at {pos:#x} claims {size} bytes, past the end of the file ({len} bytes): truncated archive"
                ))
                .with_field("tar size")
                .at(pos)
            })?;
        let next = end.next_multiple_of(BLOCK).min(len);
        let kind = header.entry_type();
        let raw_name = || String::from_utf8_lossy(&header.path_bytes()).into_owned();
        match kind.as_byte() {
            // pax extended header for the next member; global ones set defaults we ignore.
            b'x' | b'g' | b'L' => {
                if size > MAX_EXTENSION {
                    return Err(Error::limit(format!(
                        "tar extension header at {pos:#x} is {size} bytes, over the limit of {MAX_EXTENSION}"
                    ))
                    .at(pos));
                }
                let mut buf = vec![0u8; size as usize];
                src.read_at(&mut buf, data, "tar extension header")?;
                match kind.as_byte() {
                    b'L' => {
                        let n = buf.split(|&b| b == 0).next().unwrap_or(&[]);
                        pending.name = Some(String::from_utf8_lossy(n).into_owned());
                    }
                    b'x' => {
                        for ext in tar::PaxExtensions::new(&buf) {
                            let ext = ext.map_err(|e| {
                                Error::corrupt(format!("pax record at {data:#x}: {e}")).at(data)
                            })?;
                            match ext.key_bytes() {
                                b"path" => {
                                    pending.name =
                                        Some(String::from_utf8_lossy(ext.value_bytes()).into_owned())
                                }
                                b"size" => {
                                    let v = ext.value().ok().and_then(|v| v.parse::<u64>().ok());
                                    pending.size = Some(v.ok_or_else(|| {
                                        Error::corrupt(format!("pax size record at {data:#x} is not a number"))
                                            .at(data)
                                    })?);
                                }
                                k if k.starts_with(b"GNU.sparse") => {
                                    return Err(Error::unsupported(format!(
                                        "tar member at {pos:#x} is a sparse file (pax GNU.sparse): refused"
                                    ))
                                    .at(pos))
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {} // 'g': global defaults (comments, times): nothing a member needs
                }
            }
            b'0' | b'\0' | b'7' => {
                let name = pending.name.take().unwrap_or_else(raw_name);
                check_name(&name, pos)?;
                if out.iter().any(|m| m.name == name) {
                    return Err(Error::corrupt(format!(
                        "tar member '{name}' appears twice (at {:#x} and {pos:#x}): which one is meant is ambiguous",
                        out.iter().find(|m| m.name == name).map_or(0, |m| m.header_offset)
                    ))
                    .at(pos));
                }
                out.push(Member {
                    name,
                    header_offset: pos,
                    offset: data,
                    size,
                });
            }
            other => {
                let name = pending.name.take().unwrap_or_else(raw_name);
                let what = match other {
                    b'1' => "a hard link",
                    b'2' | b'K' => "a symbolic link",
                    b'3' | b'4' => "a device node",
                    b'5' => "a folder",
                    b'6' => "a FIFO",
                    b'S' => "a GNU sparse file",
                    _ => "of an unknown tar type",
                };
                return Err(Error::unsafe_ref(format!(
                    "tar member '{}' at {pos:#x} is {what} (type '{}'): an appliance holds only regular files",
                    name.escape_debug(),
                    (other as char).escape_debug()
                ))
                .with_field("tar member type")
                .at(pos));
            }
        }
        pos = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn lists_members_with_offsets() {
        let a = archive(&[("a.ovf", b"<x/>"), ("b.vmdk", &[7u8; 1000])]);
        let m = members(&a[..]).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].name, "a.ovf");
        assert_eq!((m[0].offset, m[0].size), (512, 4));
        assert_eq!((m[1].offset, m[1].size), (1536, 1000));
        assert_eq!(&a[1536..2536], &[7u8; 1000][..]);
    }

    #[test]
    fn long_names_via_gnu_extension() {
        let long = format!("{}.vmdk", "d".repeat(150));
        let a = archive(&[("a.ovf", b"x"), (&long, b"yy")]);
        let m = members(&a[..]).unwrap();
        assert_eq!(m[1].name, long);
        assert_eq!(m[1].size, 2);
    }

    #[test]
    fn refuses_paths_and_truncation() {
        let mut a = archive(&[("a.ovf", b"x")]);
        // Rename to a path and fix the checksum.
        a[..8].copy_from_slice(b"../a.ovf");
        let mut h = tar::Header::new_old();
        h.as_mut_bytes().copy_from_slice(&a[..512]);
        h.set_cksum();
        a[..512].copy_from_slice(h.as_bytes());
        let e = members(&a[..]).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::UnsafeReference, "{e}");

        let a = archive(&[("a.ovf", &[1u8; 2000])]);
        let e = members(&a[..1024]).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt, "{e}");
    }
}
