//! Digests of a byte sequence (md5, sha1, sha256, sha512), as a sink computes them over an
//! output on the way or over the finished file. Knows nothing of sinks or outputs.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

/// A digest algorithm computed over the output bytes ([`ConvertOptions::digests`](crate::ConvertOptions::digests)).
/// Serialized as its name (`"md5"`, `"sha512"`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DigestAlgo {
    /// MD5 (OpenStack Glance's `checksum`).
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-512 (Glance's `os_hash_value` with `os_hash_algo=sha512`).
    Sha512,
}

impl serde::Serialize for DigestAlgo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl DigestAlgo {
    /// Every algorithm, in the order reports list them.
    pub const ALL: [DigestAlgo; 4] = [
        DigestAlgo::Md5,
        DigestAlgo::Sha1,
        DigestAlgo::Sha256,
        DigestAlgo::Sha512,
    ];

    /// The name `--digest` takes and reports give (as md5sum & co. name them).
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgo::Md5 => "md5",
            DigestAlgo::Sha1 => "sha1",
            DigestAlgo::Sha256 => "sha256",
            DigestAlgo::Sha512 => "sha512",
        }
    }

    /// Parse a comma-separated list (`md5,sha256`); duplicates collapse, order is
    /// [`ALL`](Self::ALL)'s.
    pub fn parse_list(s: &str) -> Result<Vec<DigestAlgo>> {
        let mut v = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let a = DigestAlgo::ALL
                .into_iter()
                .find(|a| a.name().eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    Error::arg(format!(
                        "unknown digest algorithm '{name}' (known: md5, sha1, sha256, sha512)"
                    ))
                })?;
            v.push(a);
        }
        if v.is_empty() {
            return Err(Error::arg("no digest algorithm named"));
        }
        v.sort();
        v.dedup();
        Ok(v)
    }

    fn hasher(self) -> Box<dyn sha2::digest::DynDigest + Send> {
        use sha2::Digest;
        match self {
            DigestAlgo::Md5 => Box::new(md5::Md5::new()),
            DigestAlgo::Sha1 => Box::new(sha1::Sha1::new()),
            DigestAlgo::Sha256 => Box::new(sha2::Sha256::new()),
            DigestAlgo::Sha512 => Box::new(sha2::Sha512::new()),
        }
    }
}

impl std::fmt::Display for DigestAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Running digests of one byte sequence (the RustCrypto implementations).
pub struct Digester {
    hashers: Vec<(DigestAlgo, Box<dyn sha2::digest::DynDigest + Send>)>,
}

impl std::fmt::Debug for Digester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algos: Vec<_> = self.hashers.iter().map(|(a, _)| *a).collect();
        f.debug_struct("Digester").field("algos", &algos).finish()
    }
}

/// Smallest piece whose digests are computed on one thread each: a thread costs tens of
/// microseconds, a MiB of sha512 a couple of milliseconds.
const PARALLEL_MIN: usize = 256 << 10;

impl Digester {
    /// Start the digests `algos` of an empty sequence.
    pub fn new(algos: &[DigestAlgo]) -> Self {
        Digester {
            hashers: algos.iter().map(|&a| (a, a.hasher())).collect(),
        }
    }

    /// Add `data` to every digest. Several digests of a large piece run on their own
    /// threads: md5 and sha512 (what Glance records) each take about as long as the
    /// conversion itself, and one core would do them one after the other.
    pub fn update(&mut self, data: &[u8]) {
        if self.hashers.len() > 1 && data.len() >= PARALLEL_MIN {
            std::thread::scope(|s| {
                for (_, h) in &mut self.hashers {
                    s.spawn(move || h.update(data));
                }
            });
            return;
        }
        for (_, h) in &mut self.hashers {
            h.update(data);
        }
    }

    /// The digests as lowercase hex, in the order asked.
    pub fn finish(self) -> Vec<(DigestAlgo, String)> {
        self.hashers
            .into_iter()
            .map(|(a, h)| {
                let hex = h
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>();
                (a, hex)
            })
            .collect()
    }

    /// Digests of the first `len` bytes of `file`, read once from the start (for outputs
    /// written out of order, which cannot be hashed on the way).
    pub fn of_file(file: &File, len: u64, algos: &[DigestAlgo]) -> std::io::Result<Self> {
        let mut d = Digester::new(algos);
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            d.update(&buf[..n]);
            at += n as u64;
        }
        Ok(d)
    }
}
