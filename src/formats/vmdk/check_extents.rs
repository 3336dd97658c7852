//! Checking a VMDK descriptor file (monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat): every extent it lists, each file opened through the reference
//! gate.
//!
//! qemu's `vmdk_co_check` asks of a FLAT extent only that its start offset lie inside its
//! file ("cluster offset ... points after EOF"); here the whole extent must (qemu and
//! VMware both write flat files at their full length, so a shorter one lost data). A
//! SPARSE extent gets the same check as a monolithicSparse file, its findings naming the
//! extent. ZERO and NOACCESS extents have nothing to check. qemu-img repairs no VMDK;
//! neither do we through a descriptor (the extent files are opened read-only).

use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::descriptor::{looks_like_descriptor, Access, Descriptor, ExtentType};
use super::reader::check_descriptor_create_type;
use super::sparse::{KDMV_MAGIC, MAX_DESCRIPTOR_BYTES, SECTOR};
use crate::check::{read_padded, Repair, Tally};
use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::options::OpenOptions;

/// Whether `host` (not a `KDMV` file) holds descriptor text, as qemu probes it.
pub fn is_descriptor_file(host: &HostFile) -> Result<bool> {
    let head = read_padded(host, 0, host.len().min(SECTOR), "descriptor")?;
    Ok(looks_like_descriptor(&head) || head.starts_with(b"# Disk DescriptorFile"))
}

/// Check the extents the descriptor file `host` at `path` lists; their files are opened
/// through `refs` (refused unless the caller allowed references).
pub fn check(host: &HostFile, path: &Path, repair: Repair, refs: &OpenOptions) -> Result<Tally> {
    if repair != Repair::None {
        return Err(Error::unsupported(
            "repairing a VMDK whose extents are separate files is not supported (qemu-img repairs no VMDK either): check it without -r",
        ));
    }
    let len = host.len();
    if len > MAX_DESCRIPTOR_BYTES {
        return Err(Error::limit(format!(
            "not a sparse VMDK and too large ({len} bytes) for a descriptor file (1 MiB limit)"
        ))
        .with_field("descriptor"));
    }
    let d = Descriptor::parse(&host.read_vec(0, len, "descriptor")?)?;
    check_descriptor_create_type(d.create_type.as_deref())?;
    if d.extents.is_empty() {
        return Err(Error::invalid("VMDK descriptor lists no extents").with_field("descriptor"));
    }
    let mut t = Tally::default();
    let mut first_sector = 0u64;
    for (i, e) in d.extents.iter().enumerate() {
        let field = format!("extent {i}");
        let name = e.file.as_deref().unwrap_or("");
        match (&e.kind, e.access) {
            (_, Access::NoAccess) | (ExtentType::Zero, _) => {}
            (ExtentType::Flat | ExtentType::Vmfs, _) => {
                let f = refs.open_reference_file(path, name, &field)?;
                let overflow = || Error::limit("flat extent overflows 64 bits").with_field(&field);
                let start = e.offset.checked_mul(SECTOR).ok_or_else(overflow)?;
                let end = e
                    .sectors
                    .checked_mul(SECTOR)
                    .and_then(|n| n.checked_add(start))
                    .ok_or_else(overflow)?;
                let flen = f.len();
                if start >= flen {
                    t.corrupt(format!(
                        "ERROR: cluster offset for sector {first_sector} points after EOF"
                    ));
                } else if end > flen {
                    t.corrupt(format!(
                        "ERROR: flat extent {i} ('{name}') runs from {start:#x} to {end:#x}, past the end of its file ({flen} bytes)"
                    ));
                }
            }
            (ExtentType::Sparse, _) => {
                let f = refs.open_reference_file(path, name, &field)?;
                let magic = read_padded(&f, 0, 4, "extent magic")?;
                if LE::read_u32(&magic) != KDMV_MAGIC {
                    return Err(Error::unsupported(format!(
                        "{field} ('{name}') is not a KDMV sparse extent: checking legacy COWD extents is not supported"
                    ))
                    .with_path(f.path()));
                }
                let mut et = Tally::default();
                super::check::check_sparse(&f, None, Repair::None, &mut et)
                    .map_err(|err| err.with_field(field.clone()).with_path(f.path()))?;
                t.check_errors += et.check_errors;
                t.corruptions += et.corruptions;
                t.leaks += et.leaks;
                t.findings.extend(
                    et.findings
                        .iter()
                        .map(|m| format!("{m} ({field}, '{name}')")),
                );
            }
            (kind, _) => {
                return Err(Error::unsupported(format!(
                    "checking VMDK extents of type {} is not supported",
                    kind.name()
                ))
                .with_field(field))
            }
        }
        first_sector = first_sector.saturating_add(e.sectors);
    }
    Ok(t)
}
