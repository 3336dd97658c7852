//! The [`Format`] enum and its qemu-img names: core vocabulary, imported by the core and by
//! every format folder, importing nothing above it. Which format a file *is* (probing) and
//! what each one accepts (`-o` options) live in the dispatch, [`crate::formats`].

use crate::error::{Error, Result};

/// A disk image format. Serialized as its qemu-img name (`"vpc"` for [`Format::Vhd`]).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// Plain guest bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// Microsoft Virtual Hard Disk (qemu calls it "vpc").
    Vhd,
    /// VMware virtual disk.
    Vmdk,
    /// VirtualBox disk image.
    Vdi,
    /// Microsoft Hyper-V virtual hard disk v2.
    Vhdx,
    /// An OVF appliance in a tar (Glance's `container_format=ova`): read, its chosen
    /// disk; written, a streamOptimized vmdk with its descriptor and manifest.
    Ova,
    /// QEMU copy-on-write version 1 (read only).
    Qcow,
    /// QEMU enhanced disk (read only).
    Qed,
}

impl Format {
    /// Every format, in probe order.
    pub const ALL: [Format; 9] = [
        Format::Qcow2,
        Format::Qcow,
        Format::Qed,
        Format::Ova,
        Format::Vhdx,
        Format::Vhd,
        Format::Vmdk,
        Format::Vdi,
        Format::Raw,
    ];

    /// The name qemu-img uses (`vpc` for VHD).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vpc",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
            Format::Ova => "ova",
            Format::Qcow => "qcow",
            Format::Qed => "qed",
        }
    }

    /// Parse a qemu-img format name (`vhd` is accepted as an alias of `vpc`).
    pub fn from_name(name: &str) -> Result<Format> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vpc" | "vhd" => Format::Vhd,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            "vhdx" => Format::Vhdx,
            "ova" => Format::Ova,
            "qcow" => Format::Qcow,
            "qed" => Format::Qed,
            other => {
                return Err(Error::arg(format!(
                    "unknown format '{other}' (known: raw, qcow2, vpc, vmdk, vdi, vhdx, ova, qcow, qed)"
                )))
            }
        })
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Format::from_name(s)
    }
}

impl serde::Serialize for Format {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}
