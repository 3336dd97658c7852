//! What is inside a guest disk, without booting it: its partitions and logical volumes
//! with their filesystems, and for every operating-system root found the distribution,
//! version, architecture, hostname, package manager, mountpoints and firmware, what
//! `virt-inspector` reports. Read-only, over any [`BlockDevice`].
//!
//! [`Guest::open`] finds the volumes (partition table, then LVM inside partitions);
//! [`Guest::inspect`] opens each filesystem and looks for roots; [`Guest::mounts`]
//! assembles one root's filesystems as its fstab mounts them, for file access by path.

mod elf;
pub mod glance;
pub mod hive;
mod linux;
mod mounts;
mod windows;

pub use mounts::{normalize, Mounts};

use std::sync::Arc;

use serde::Serialize;

use super::files::{self, FileSystem, Volume};
use super::{gpt, lvm, scan, table, FreeMap, Region};
use crate::device::BlockDevice;
use crate::error::{Error, Result};

/// One partition or logical volume, and the filesystem on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeReport {
    /// "disk" (no partition table), "gpt 1", "mbr 5", "lvm vg/lv".
    pub location: String,
    /// Size in bytes.
    pub size: u64,
    /// The partition type (GPT type GUID or MBR type byte), for partitions.
    pub partition_type: Option<String>,
    /// "ext4", "vfat", "xfs", "ntfs", "swap", "LVM2_member", ...
    pub filesystem: Option<String>,
    /// The filesystem label.
    pub label: Option<String>,
    /// The filesystem UUID, as blkid prints it.
    pub uuid: Option<String>,
    /// Bytes in use, from the filesystem's own counters, where this reader knows them.
    pub used: Option<u64>,
    /// Why the volume or its filesystem could not be read.
    pub error: Option<String>,
}

/// One operating system found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct OsReport {
    /// The volume holding its root filesystem.
    pub root: String,
    /// "linux", "windows", ...
    pub os_type: String,
    /// libguestfs's distro name: "debian", "ubuntu", "rhel", "rocky", "fedora",
    /// "alpinelinux", "archlinux", "opensuse", "sles", ... or "unknown".
    pub distro: String,
    /// The product name (`PRETTY_NAME`, or the release file's line).
    pub product_name: Option<String>,
    /// Major version.
    pub major_version: u32,
    /// Minor version.
    pub minor_version: u32,
    /// The version as the distro writes it ("22.04", "3.19.1", "12").
    pub version: Option<String>,
    /// Windows: the build number ("19045").
    pub build: Option<String>,
    /// Windows: the edition ("Professional", "ServerStandard").
    pub edition: Option<String>,
    /// Windows: the system root ("C:\\Windows").
    pub system_root: Option<String>,
    /// "x86_64", "aarch64", "i686", ... from the ELF header of a system binary, or
    /// Windows's PROCESSOR_ARCHITECTURE.
    pub arch: Option<String>,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// "deb", "rpm", "apk", "pacman".
    pub package_format: Option<String>,
    /// "apt", "dnf", "yum", "zypper", "apk", "pacman".
    pub package_manager: Option<String>,
    /// The libosinfo short-id ("ubuntu22.04", "debian12", "rhel9.3", "alpinelinux3.19").
    pub osinfo: Option<String>,
    /// Mountpoints from fstab, each with the volume it names (when found).
    pub mountpoints: Vec<Mountpoint>,
    /// "uefi" (an EFI system partition on a GPT disk) or "bios".
    pub firmware: String,
    /// Installed packages, when the package database is cheap to read.
    pub applications: Vec<Application>,
    /// What could not be read, and was left out.
    pub notes: Vec<String>,
}

/// One fstab line that mounts a filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mountpoint {
    /// Where it is mounted ("/", "/boot", "/home").
    pub path: String,
    /// What fstab names ("UUID=...", "/dev/mapper/vg-root", "LABEL=boot").
    pub spec: String,
    /// The filesystem type fstab gives.
    pub fs_type: String,
    /// The volume that spec names, when one of this disk's volumes matches.
    pub volume: Option<String>,
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Application {
    /// Package name.
    pub name: String,
    /// Version as the package manager writes it.
    pub version: String,
    /// Architecture ("amd64", "x86_64", "noarch"), when recorded.
    pub arch: Option<String>,
}

/// The whole inspection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestInspection {
    /// "gpt", "mbr", "none" or "untrusted".
    pub partition_table: String,
    /// Every partition and logical volume.
    pub volumes: Vec<VolumeReport>,
    /// Every operating-system root found.
    pub operating_systems: Vec<OsReport>,
    /// Findings not tied to one volume.
    pub notes: Vec<String>,
}

/// A disk opened for inspection: its volumes found, nothing else read yet.
pub struct Guest {
    table: String,
    volumes: Vec<(VolumeReport, Option<Volume>)>,
    notes: Vec<String>,
}

fn report(location: &str, size: u64, partition_type: Option<String>) -> VolumeReport {
    VolumeReport {
        location: location.to_string(),
        size,
        partition_type,
        filesystem: None,
        label: None,
        uuid: None,
        used: None,
        error: None,
    }
}

impl Guest {
    /// Find the volumes of `dev`: its partitions (or the whole disk when it has no
    /// table) and the linear logical volumes of LVM physical volumes among them.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Guest> {
        let size = dev.virtual_size();
        let whole = Region::whole(&*dev);
        let mut g = Guest {
            table: String::new(),
            volumes: Vec::new(),
            notes: Vec::new(),
        };
        let t = match table::read(&whole).and_then(|t| table::check(&t, size).map(|()| t)) {
            Ok(t) => t,
            Err(e) => {
                g.table = "untrusted".into();
                g.notes
                    .push(format!("partition table does not validate: {e}"));
                return Ok(g);
            }
        };
        g.table = t.kind.to_string();
        g.notes.extend(t.notes.iter().cloned());
        if t.kind == "none" {
            g.add_volume(&dev, "disk", 0, size, None);
            return Ok(g);
        }
        let mut parts = t.partitions.clone();
        parts.sort_by_key(|p| p.start);
        for p in &parts {
            g.add_volume(&dev, &p.location, p.start, p.len, Some(p.type_id.clone()));
        }
        Ok(g)
    }

    /// Add the partition at `start`, and the logical volumes when it is an LVM PV.
    fn add_volume(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        location: &str,
        start: u64,
        len: u64,
        ptype: Option<String>,
    ) {
        let mut r = report(location, len, ptype);
        let region = match Region::new(&**dev, start, len) {
            Ok(x) => x,
            Err(e) => {
                r.error = Some(e.to_string());
                self.volumes.push((r, None));
                return;
            }
        };
        match lvm::read_label(&region) {
            Ok(None) => {
                self.volumes
                    .push((r, Volume::new(dev.clone(), start, len).ok()));
            }
            Ok(Some(label)) => {
                r.filesystem = Some("LVM2_member".into());
                r.uuid = Some(label.uuid.clone());
                let vg = lvm::read_metadata(&region, &label)
                    .and_then(|t| lvm::parse_text(&t))
                    .and_then(|root| lvm::read_vg(&root, &label.uuid, len));
                match vg {
                    Ok(vg) => {
                        self.volumes.push((r, None));
                        for lv in vg.lvs {
                            self.add_lv(dev, start, lv);
                        }
                    }
                    Err(e) => {
                        r.error = Some(e.to_string());
                        self.volumes.push((r, None));
                    }
                }
            }
            Err(e) => {
                r.error = Some(format!("LVM label: {e}"));
                self.volumes.push((r, None));
            }
        }
    }

    fn add_lv(&mut self, dev: &Arc<dyn BlockDevice>, pv_start: u64, lv: lvm::Lv) {
        let mut r = report(&format!("lvm {}", lv.name), lv.size, None);
        let vol = match &lv.layout {
            Ok(extents) => {
                let pieces: Vec<(u64, u64)> = extents
                    .iter()
                    .map(|e| (pv_start + e.pv_off, e.len))
                    .collect();
                Volume::from_pieces(dev.clone(), &pieces)
                    .map_err(|e| r.error = Some(e.to_string()))
                    .ok()
            }
            Err(why) => {
                r.error = Some(why.clone());
                None
            }
        };
        self.volumes.push((r, vol));
    }

    /// Every volume found, with its filesystem details filled in by [`Guest::inspect`].
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeReport> {
        self.volumes.iter().map(|(r, _)| r)
    }

    /// Open the filesystem on the volume at `location` ("gpt 1", "lvm vg/root", "disk").
    pub fn filesystem(&self, location: &str) -> Result<Box<dyn FileSystem>> {
        let (r, vol) = self
            .volumes
            .iter()
            .find(|(r, _)| r.location == location)
            .ok_or_else(|| {
                Error::arg(format!(
                    "no volume {location:?} on this disk (it has: {})",
                    self.volumes
                        .iter()
                        .map(|(r, _)| r.location.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let vol = vol.as_ref().ok_or_else(|| {
            Error::unsupported(format!(
                "{location} cannot be read: {}",
                r.error.as_deref().unwrap_or("it holds no filesystem")
            ))
        })?;
        files::open(vol)?.ok_or_else(|| {
            Error::unsupported(format!(
                "{location}: no filesystem this reader can open (ext2/3/4, FAT12/16/32, NTFS)"
            ))
        })
    }

    /// True when the disk boots with UEFI: a GPT with an EFI system partition.
    fn uefi(&self) -> bool {
        self.table == "gpt"
            && self
                .volumes
                .iter()
                .any(|(r, _)| r.partition_type.as_deref() == Some(gpt::ESP_TYPE))
    }

    /// Open every filesystem, fill in the volume reports and look for operating systems.
    pub fn inspect(&mut self) -> GuestInspection {
        let mut roots = Vec::new();
        for i in 0..self.volumes.len() {
            let Some(vol) = self.volumes[i].1.clone() else {
                continue;
            };
            let r = &mut self.volumes[i].0;
            match files::open(&vol) {
                Ok(Some(fs)) => {
                    r.filesystem = Some(fs.fs_type().to_string());
                    r.label = fs.label();
                    r.uuid = fs.uuid();
                    r.used = fs.usage().map(|(_, used)| used);
                    if linux::is_root(&*fs) || windows::is_root(&*fs) {
                        roots.push((r.location.clone(), fs));
                    }
                }
                Ok(None) => r.filesystem = other_filesystem(&vol),
                Err(e) => {
                    r.filesystem = other_filesystem(&vol);
                    r.error = Some(e.to_string());
                }
            }
        }
        let firmware = if self.uefi() { "uefi" } else { "bios" };
        let operating_systems = roots
            .iter()
            .map(|(loc, fs)| {
                let mut os = if windows::is_root(&**fs) {
                    windows::inspect(&**fs)
                } else {
                    linux::inspect(&**fs)
                };
                os.root = loc.clone();
                os.firmware = firmware.to_string();
                for m in &mut os.mountpoints {
                    m.volume = self.resolve_spec(&m.spec);
                }
                os
            })
            .collect();
        GuestInspection {
            partition_table: self.table.clone(),
            volumes: self.volumes.iter().map(|(r, _)| r.clone()).collect(),
            operating_systems,
            notes: self.notes.clone(),
        }
    }

    /// The volume an fstab spec names: UUID=, LABEL=, /dev/disk/by-uuid|by-label/,
    /// /dev/mapper/VG-LV, /dev/VG/LV, or a disk device's partition number.
    pub fn resolve_spec(&self, spec: &str) -> Option<String> {
        let find = |f: &dyn Fn(&VolumeReport) -> bool| {
            self.volumes
                .iter()
                .find(|(r, _)| f(r))
                .map(|(r, _)| r.location.clone())
        };
        let uuid = spec
            .strip_prefix("UUID=")
            .or_else(|| spec.strip_prefix("/dev/disk/by-uuid/"));
        if let Some(u) = uuid {
            let u = u.trim_matches('"');
            return find(&|r| r.uuid.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(u)));
        }
        let label = spec
            .strip_prefix("LABEL=")
            .or_else(|| spec.strip_prefix("/dev/disk/by-label/"));
        if let Some(l) = label {
            let l = l.trim_matches('"');
            return find(&|r| r.label.as_deref() == Some(l));
        }
        if let Some(name) = linux::lv_name(spec) {
            let loc = format!("lvm {name}");
            return find(&|r| r.location == loc);
        }
        let n = linux::partition_number(spec)?;
        find(&|r| r.location == format!("gpt {n}") || r.location == format!("mbr {n}"))
    }
}

/// The name of a filesystem no file reader here opens, from the sparsify scanners
/// (which validate it), for the report.
fn other_filesystem(vol: &Volume) -> Option<String> {
    let region = Region::whole(vol);
    let mut map = FreeMap::new(vol.virtual_size());
    scan::scan_region(&mut map, region, "volume").filesystem
}

/// Inspect `dev`: volumes, filesystems, operating systems.
pub fn inspect(dev: Arc<dyn BlockDevice>) -> Result<GuestInspection> {
    Ok(Guest::open(dev)?.inspect())
}
