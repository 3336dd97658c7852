//! The `.mf` manifest: one `ALGO(member)= hex` line per member (ovftool and VirtualBox
//! write SHA1 for OVF 1.0 and SHA256 for 2.0; ovftool can write SHA512), and a streaming
//! digest of a member read in place.

use sha2::Digest;

use crate::error::{Error, Result};

/// The largest manifest read.
pub const MAX_MANIFEST: u64 = 1 << 20;

/// A manifest digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Algo {
    /// SHA-1 (OVF 1.x).
    Sha1,
    /// SHA-256 (OVF 2.x; what we write).
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algo {
    /// The name as the manifest spells it.
    pub fn name(self) -> &'static str {
        match self {
            Algo::Sha1 => "SHA1",
            Algo::Sha256 => "SHA256",
            Algo::Sha512 => "SHA512",
        }
    }

    fn parse(s: &str) -> Option<Algo> {
        match s.to_ascii_uppercase().as_str() {
            "SHA1" => Some(Algo::Sha1),
            "SHA256" => Some(Algo::Sha256),
            "SHA512" => Some(Algo::Sha512),
            _ => None,
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algo::Sha1 => 40,
            Algo::Sha256 => 64,
            Algo::Sha512 => 128,
        }
    }
}

/// A running digest of one algorithm.
#[non_exhaustive]
pub enum Hasher {
    /// SHA-1.
    Sha1(sha1::Sha1),
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// SHA-512.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh digest.
    pub fn new(a: Algo) -> Hasher {
        match a {
            Algo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
    /// Feed bytes.
    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(b),
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }
    /// The lowercase hex digest.
    pub fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The algorithm.
    pub algo: Algo,
    /// The member it covers.
    pub name: String,
    /// The expected digest, lowercase hex.
    pub hex: String,
}

/// Parse manifest text; every non-blank line must be an entry.
pub fn parse(text: &[u8]) -> Result<Vec<Entry>> {
    let text = std::str::from_utf8(text)
        .map_err(|_| Error::corrupt("the .mf manifest is not UTF-8 text").with_field("manifest"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            Error::corrupt(format!(
                "manifest line {} is not 'ALGO(name)= hex': {:?}",
                i + 1,
                line.chars().take(120).collect::<String>()
            ))
            .with_field("manifest")
        };
        let (algo, rest) = line.split_once('(').ok_or_else(bad)?;
        let (name, hex) = rest.rsplit_once(")=").ok_or_else(bad)?;
        let algo = Algo::parse(algo.trim()).ok_or_else(|| {
            Error::unsupported(format!(
                "manifest line {} uses digest '{}' (known: SHA1, SHA256, SHA512)",
                i + 1,
                algo.trim()
            ))
            .with_field("manifest")
        })?;
        let hex = hex.trim().to_ascii_lowercase();
        if hex.len() != algo.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        out.push(Entry {
            algo,
            name: name.to_string(),
            hex,
        });
    }
    Ok(out)
}

/// A manifest line as we write it.
pub fn line(algo: Algo, name: &str, hex: &str) -> String {
    format!("{}({name})= {hex}\n", algo.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ovftool_and_virtualbox_lines() {
        let t = "SHA1(a.ovf)= 03AD765EC45B90E13BC22D01e8a1b0d6d6b6d6b6\r\nSHA256(a-disk1.vmdk)= e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\n";
        let e = parse(t.as_bytes()).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].algo, Algo::Sha1);
        assert_eq!(e[0].hex, "03ad765ec45b90e13bc22d01e8a1b0d6d6b6d6b6");
        assert_eq!(e[1].name, "a-disk1.vmdk");
        let mut h = Hasher::new(Algo::Sha256);
        h.update(b"");
        assert_eq!(h.hex(), e[1].hex);
        assert!(parse(b"MD5(a)= 00").is_err());
        assert!(parse(b"SHA1(a)= 1234").is_err());
        assert!(parse(b"garbage").is_err());
    }
}
