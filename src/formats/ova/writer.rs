//! Writing an appliance: `NAME.ovf`, `NAME-disk1.vmdk` (streamOptimized), `NAME.mf`
//! (SHA256), as a ustar archive (pax records for names over 100 bytes).
//!
//! The descriptor comes first and records the vmdk's length, which the compressed data
//! decides. The vmdk is spooled to an unnamed `O_TMPFILE` and copied into the archive
//! once it is finished: measuring it in a first pass instead would compress every grain
//! twice, and compression is most of a conversion's CPU, while the spool costs one
//! sequential write and read of the compressed bytes (in the output's own folder, where
//! the output's temporary sibling needs the same space anyway; `TMPDIR` for a pipe). It
//! has no name, so no exit leaves it behind.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::CreateOptions;
use crate::writer::{Encoder, ImageWriter, Sink};

use super::manifest::{self, Algo, Hasher};
use super::ovf::Envelope;

/// The vmdk options an appliance passes through to its disk.
pub const PASSED_TO_VMDK: &[&str] = &[
    "adapter_type",
    "hwversion",
    "toolsversion",
    "compression_level",
];

/// The names of an appliance's members written for `dest`.
pub fn member_names(dest: &Path) -> (String, String, String, String) {
    let stem = dest
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && *s != "-")
        .unwrap_or("appliance");
    // A member name is one path component without control characters.
    let stem: String = stem
        .chars()
        .map(|c| if c.is_control() || c == '\\' { '_' } else { c })
        .collect();
    (
        stem.clone(),
        format!("{stem}.ovf"),
        format!("{stem}-disk1.vmdk"),
        format!("{stem}.mf"),
    )
}

/// Where the vmdk is spooled: the destination's folder for a file, TMPDIR otherwise.
fn spool_dir(dest: &Path) -> PathBuf {
    use std::os::unix::fs::FileTypeExt;
    let is_stream = dest == Path::new("-")
        || std::fs::metadata(dest).is_ok_and(|m| {
            let t = m.file_type();
            t.is_fifo() || t.is_char_device() || t.is_block_device() || t.is_socket()
        });
    match dest.parent() {
        Some(p) if !is_stream && p.as_os_str().is_empty() => PathBuf::from("."),
        Some(p) if !is_stream && p.is_dir() => p.to_path_buf(),
        _ => std::env::temp_dir(),
    }
}

/// The appliance writer: guest data goes to the spooled vmdk writer; `finish` writes the
/// archive.
pub struct OvaWriter {
    out: Sink,
    inner: Box<dyn ImageWriter>,
    spool: File,
    stem: String,
    ovf_name: String,
    disk_name: String,
    mf_name: String,
    populated: u64,
    adapter: String,
    system_type: String,
}

impl std::fmt::Debug for OvaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvaWriter")
            .field("disk_name", &self.disk_name)
            .finish_non_exhaustive()
    }
}

impl OvaWriter {
    /// An appliance for `dest` written to `out`, its disk made with `opts` (the
    /// [`PASSED_TO_VMDK`] options).
    pub fn new(out: Sink, dest: &Path, opts: &CreateOptions) -> Result<Self> {
        let (stem, ovf_name, disk_name, mf_name) = member_names(dest);
        let mut vopts = CreateOptions::new(opts.size);
        for k in PASSED_TO_VMDK {
            if let Some(v) = opts.str_option(k) {
                vopts.options.insert(k.to_string(), v.to_string());
            }
        }
        vopts
            .options
            .insert("subformat".into(), "streamOptimized".into());
        let adapter = match opts.str_option("adapter_type").unwrap_or("lsilogic") {
            "ide" => "ide",
            "buslogic" | "legacyESX" => "buslogic",
            _ => "lsilogic",
        }
        .to_string();
        let system_type = match opts.str_option("hwversion") {
            Some(v) => {
                let n: u32 = v.parse().map_err(|_| {
                    Error::arg(format!("hwversion '{v}' is not a number")).with_option("hwversion")
                })?;
                format!("vmx-{n:02}")
            }
            None => "vmx-07".to_string(),
        };
        let dir = spool_dir(dest);
        let spool = crate::pipe::anonymous_file(&dir)?;
        let inner_sink = spool
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate the vmdk spool's descriptor", e))?;
        let inner_dest = dir.join(&disk_name);
        let inner = crate::formats::create_writer(Format::Vmdk, inner_sink, &inner_dest, &vopts)?;
        Ok(OvaWriter {
            out,
            inner,
            spool,
            stem,
            ovf_name,
            disk_name,
            mf_name,
            populated: 0,
            adapter,
            system_type,
        })
    }
}

/// Positional writes to the sink, as a sequential [`Write`] for the tar builder.
struct SinkWrite<'a> {
    sink: &'a Sink,
    pos: u64,
}

impl Write for SinkWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sink.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The spooled vmdk read from the start, hashed as it passes.
struct HashingRead<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
    hasher: Option<Hasher>,
}

impl Read for HashingRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

fn header(name: &str, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    // Over 100 bytes the real name goes in a pax record; this is what old readers see.
    let mut short = name.to_string();
    while short.len() > 100 {
        short.pop();
    }
    // set_path on a ustar header only fails for names it cannot fit, which `short` does.
    let _ = h.set_path(&short);
    h.set_cksum();
    h
}

fn append(
    b: &mut tar::Builder<SinkWrite<'_>>,
    name: &str,
    size: u64,
    mtime: u64,
    data: impl Read,
) -> std::io::Result<()> {
    if name.len() > 100 {
        b.append_pax_extensions([("path", name.as_bytes())])?;
    }
    b.append(&header(name, size, mtime), data)
}

impl ImageWriter for OvaWriter {
    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn encoder(&self) -> Option<Arc<dyn Encoder>> {
        self.inner.encoder()
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.populated += data.len() as u64;
        self.inner.write(offset, data)
    }
    fn write_encoded(&mut self, offset: u64, data: &[u8], encoded: Vec<u8>) -> Result<()> {
        self.populated += data.len() as u64;
        self.inner.write_encoded(offset, data, encoded)
    }
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings()
    }
    fn streams(&self) -> bool {
        true
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let me = *self;
        let capacity = me.inner.virtual_size();
        me.inner.finish()?;
        let disk_len = me
            .spool
            .metadata()
            .map_err(|e| Error::io("cannot stat the vmdk spool", e))?
            .len();
        let ovf = Envelope {
            name: &me.stem,
            disk_file: &me.disk_name,
            disk_file_size: disk_len,
            capacity,
            populated_size: me.populated,
            adapter: &me.adapter,
            system_type: me.system_type.clone(),
        }
        .to_xml();
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let io = |e: std::io::Error| Error::io("writing the OVA archive", e);
        let mut b = tar::Builder::new(SinkWrite {
            sink: &me.out,
            pos: 0,
        });
        let mut ovf_hash = Hasher::new(Algo::Sha256);
        ovf_hash.update(ovf.as_bytes());
        append(
            &mut b,
            &me.ovf_name,
            ovf.len() as u64,
            mtime,
            ovf.as_bytes(),
        )
        .map_err(io)?;
        let mut disk = HashingRead {
            file: &me.spool,
            pos: 0,
            len: disk_len,
            hasher: Some(Hasher::new(Algo::Sha256)),
        };
        append(&mut b, &me.disk_name, disk_len, mtime, &mut disk).map_err(io)?;
        let disk_hex = disk.hasher.take().expect("set above").hex();
        let mf = format!(
            "{}{}",
            manifest::line(Algo::Sha256, &me.ovf_name, &ovf_hash.hex()),
            manifest::line(Algo::Sha256, &me.disk_name, &disk_hex)
        );
        append(&mut b, &me.mf_name, mf.len() as u64, mtime, mf.as_bytes()).map_err(io)?;
        b.finish().map_err(io)?;
        Ok(())
    }
}
