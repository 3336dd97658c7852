//! Reading an appliance: the tar walk, the descriptor, the manifest check, and the chosen
//! disk member opened in place, as a window of the host file, by the format it is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::{BlockDevice, BlockStatus, HostFile, ImageInfo, Mapping, RangeSource};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::OpenOptions;

use super::archive::{self, Member};
use super::manifest::{self, Algo, Hasher};
use super::ovf::{Descriptor, MAX_OVF};

/// The open option naming the disk to read (1-based, in DiskSection order).
pub const DISK_OPTION: &str = "disk";

/// A disk the appliance holds.
#[derive(Debug, Clone)]
struct FoundDisk {
    disk_id: String,
    member: Member,
    capacity: Option<u64>,
}

/// A member's bytes, read through the archive's file and never past the member.
#[derive(Debug)]
struct Window {
    file: Arc<HostFile>,
    base: u64,
    len: u64,
}

impl RangeSource for Window {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        // HostFile::from_source checks every read against `len`; this is the second wall.
        let end = offset.checked_add(buf.len() as u64);
        if !matches!(end, Some(e) if e <= self.len) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the tar member",
            ));
        }
        self.file
            .read_exact_at(buf, self.base + offset, "tar member")
            .map_err(std::io::Error::from)
    }
}

/// Hash `len` bytes at `offset` of `file` with `algo`.
fn digest(file: &HostFile, offset: u64, len: u64, algo: Algo) -> Result<String> {
    let mut h = Hasher::new(algo);
    let mut buf = vec![0u8; (1 << 20).min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done, "tar member")?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.hex())
}

/// What the appliance wrapper adds to the disk it reads.
struct OvaDevice {
    inner: Box<dyn BlockDevice>,
    disks: Vec<FoundDisk>,
    chosen: usize,
    manifest: Option<Algo>,
    verified: Vec<String>,
    ovf_name: String,
}

impl BlockDevice for OvaDevice {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        self.inner.map(offset, max_len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        self.inner.block_status(offset, max_len)
    }
    fn qemu_status_opaque(&self) -> bool {
        self.inner.qemu_status_opaque()
    }
    fn persistent_bitmaps(&self) -> Result<Option<Vec<(String, u64)>>> {
        self.inner.persistent_bitmaps()
    }
    fn format(&self) -> Format {
        Format::Ova
    }
    fn info(&self) -> ImageInfo {
        let mut info = self.inner.info();
        if self.disks.len() > 1 {
            let list: Vec<String> = self
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| format!("{} {} ({})", i + 1, d.member.name, d.disk_id))
                .collect();
            info.warnings.push(format!(
                "the appliance holds {} disks ({}); this is disk {} (--disk N picks another)",
                self.disks.len(),
                list.join(", "),
                self.chosen + 1
            ));
        }
        if self.manifest.is_none() {
            info.warnings
                .push("the appliance has no .mf manifest: its members are not verified".into());
        }
        info
    }
    fn container_info(&self) -> Option<(&'static str, serde_json::Value)> {
        let disks: Vec<serde_json::Value> = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                serde_json::json!({
                    "index": i + 1,
                    "disk-id": d.disk_id,
                    "file": d.member.name,
                    "file-size": d.member.size,
                    "capacity": d.capacity,
                })
            })
            .collect();
        Some((
            "ova",
            serde_json::json!({
                "descriptor": self.ovf_name,
                "disks": disks,
                "disk": self.chosen + 1,
                "manifest": self.manifest.map(Algo::name),
                "verified": self.manifest.is_some(),
                "verified-members": self.verified,
            }),
        ))
    }
}

/// Does `name` end in `.ext`, ignoring case?
fn has_ext(name: &str, ext: &str) -> bool {
    name.len() > ext.len() + 1
        && name.is_char_boundary(name.len() - ext.len() - 1)
        && name[name.len() - ext.len() - 1..].eq_ignore_ascii_case(&format!(".{ext}"))
}

/// Whether the first tar member in `head`, the start of a file of `file_len` bytes, is an
/// OVF descriptor.
pub fn probe(head: &[u8], file_len: u64) -> bool {
    let src = archive::Head {
        bytes: head,
        len: file_len,
    };
    matches!(archive::first_member(&src), Ok(Some(m)) if has_ext(&m.name, "ovf"))
}

/// Open the appliance in `file` (see the module docs).
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let members = archive::members(&file)?;
    let ovf = members
        .first()
        .filter(|m| has_ext(&m.name, "ovf"))
        .ok_or_else(|| {
            Error::invalid(match members.first() {
                Some(m) => format!(
                    "the first tar member is '{}', not the .ovf descriptor an OVA starts with",
                    m.name
                ),
                None => "the archive holds no members: not an OVA".to_string(),
            })
            .with_field("tar member 1")
        })?
        .clone();
    if ovf.size > MAX_OVF {
        return Err(Error::limit(format!(
            "the descriptor '{}' is {} bytes, over the limit of {MAX_OVF}",
            ovf.name, ovf.size
        )));
    }
    let text = file.read_vec(ovf.offset, ovf.size, "OVF descriptor")?;
    let desc = Descriptor::parse(&text).map_err(|e| e.with_field(ovf.name.clone()))?;

    let find = |name: &str| members.iter().find(|m| m.name == name);
    let mut disks = Vec::new();
    for d in &desc.disks {
        let Some(fref) = &d.file_ref else { continue }; // a blank disk the importer creates
        let f = desc.files.iter().find(|f| &f.id == fref).ok_or_else(|| {
            Error::corrupt(format!(
                "disk '{}' names file id '{fref}', which References does not list",
                d.disk_id
            ))
            .with_field("ovf:fileRef")
        })?;
        archive::check_name(&f.href, 0)
            .map_err(|e| Error::unsafe_ref(format!("the descriptor's {}", e.message())))?;
        if let Some(c) = &f.compression {
            return Err(Error::unsupported(format!(
                "disk file '{}' is stored with ovf:compression=\"{c}\": not supported",
                f.href
            )));
        }
        if f.chunk_size.is_some() {
            return Err(Error::unsupported(format!(
                "disk file '{}' is split into chunks (ovf:chunkSize): not supported",
                f.href
            )));
        }
        let m = find(&f.href).ok_or_else(|| {
            Error::corrupt(format!(
                "the descriptor references disk file '{}' (disk '{}'), which the archive does not hold",
                f.href, d.disk_id
            ))
            .with_field("ovf:href")
        })?;
        if let Some(s) = f.size.filter(|&s| s != m.size) {
            return Err(Error::corrupt(format!(
                "disk file '{}' is {} bytes in the archive but ovf:size says {s}",
                f.href, m.size
            ))
            .with_field("ovf:size"));
        }
        disks.push(FoundDisk {
            disk_id: d.disk_id.clone(),
            member: m.clone(),
            capacity: d.capacity,
        });
    }
    if disks.is_empty() {
        return Err(Error::invalid(format!(
            "the descriptor '{}' lists no disk stored in the archive",
            ovf.name
        )));
    }
    let chosen = match opts.options.get(DISK_OPTION) {
        None => 0,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=disks.len()).contains(&n) => n - 1,
            _ => {
                return Err(Error::arg(format!(
                    "--disk {v}: the appliance holds {} disk(s): {}",
                    disks.len(),
                    disks
                        .iter()
                        .enumerate()
                        .map(|(i, d)| format!("{} {}", i + 1, d.member.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .with_option("--disk"))
            }
        },
    };
    let disk = disks[chosen].member.clone();

    // The manifest: the one named after the descriptor, else the only one.
    let mfs: Vec<&Member> = members.iter().filter(|m| has_ext(&m.name, "mf")).collect();
    let stem = &ovf.name[..ovf.name.len() - 4];
    let mf = mfs
        .iter()
        .find(|m| m.name[..m.name.len() - 3] == *stem)
        .or(if mfs.len() == 1 { mfs.first() } else { None })
        .copied();
    if mf.is_none() && mfs.len() > 1 {
        return Err(Error::corrupt(format!(
            "the archive holds {} manifests and none is named after the descriptor '{}': which one to check is ambiguous",
            mfs.len(),
            ovf.name
        ))
        .with_field("manifest"));
    }
    let mut algo = None;
    let mut verified = Vec::new();
    if let Some(mf) = mf {
        if mf.size > manifest::MAX_MANIFEST {
            return Err(Error::limit(format!(
                "the manifest '{}' is {} bytes, over the limit of {}",
                mf.name,
                mf.size,
                manifest::MAX_MANIFEST
            )));
        }
        let entries = manifest::parse(&file.read_vec(mf.offset, mf.size, "manifest")?)?;
        for e in &entries {
            if find(&e.name).is_none() {
                return Err(Error::corrupt(format!(
                    "the manifest lists '{}', which the archive does not hold",
                    e.name
                ))
                .with_field("manifest"));
            }
        }
        for m in [&ovf, &disk] {
            let e = entries.iter().find(|e| e.name == m.name).ok_or_else(|| {
                Error::corrupt(format!(
                    "the manifest '{}' has no digest for '{}'",
                    mf.name, m.name
                ))
                .with_field("manifest")
            })?;
            let actual = digest(&file, m.offset, m.size, e.algo)?;
            if actual != e.hex {
                return Err(Error::corrupt(format!(
                    "member '{}' fails the manifest check: {} expected {}, actual {actual}",
                    m.name,
                    e.algo.name(),
                    e.hex
                ))
                .with_field("manifest"));
            }
            algo = Some(e.algo);
            verified.push(m.name.clone());
        }
    }

    let path = file.path().to_path_buf();
    let name: PathBuf = Path::new(&path).join(&disk.name);
    let file = Arc::new(file);
    let window = Arc::new(Window {
        file,
        base: disk.offset,
        len: disk.size,
    });
    let inner_file = HostFile::from_source(window, disk.size, &name)?;
    // The member is read by what it is (streamOptimized vmdk mostly; monolithicSparse,
    // qcow2 and raw are seen too), and never opens a host file: nothing it names is an
    // archive member, and a name beside the archive is not the appliance's.
    let mut inner_opts = OpenOptions::new();
    inner_opts.no_backing = opts.no_backing;
    inner_opts.options = opts.options.clone();
    inner_opts.options.remove(DISK_OPTION);
    let format = crate::probe::probe_file(&inner_file)?;
    if format == Format::Ova {
        return Err(Error::unsupported(format!(
            "disk member '{}' is itself an OVA: nested appliances are refused",
            disk.name
        )));
    }
    inner_opts.format = Some(format);
    let inner = crate::formats::open_host(inner_file, &inner_opts)?;
    let ii = inner.info();
    if !ii.referenced_files.is_empty() {
        return Err(Error::unsafe_ref(format!(
            "disk member '{}' names other files ({}): a disk in an OVA is read only from its own member",
            disk.name,
            ii.referenced_files.join(", ")
        )));
    }
    Ok(Box::new(OvaDevice {
        inner,
        disks,
        chosen,
        manifest: algo,
        verified,
        ovf_name: ovf.name,
    }))
}
