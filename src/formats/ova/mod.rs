//! OVA appliances (DMTF OVF packages in a tar, Glance's `container_format=ova`).
//!
//! Reading: the archive's headers are walked without reading member data; the first
//! member must be the `.ovf` descriptor (DSP0243 requires it, and it is what probing
//! looks for). The descriptor's DiskSection names the disks and References their members;
//! `-o disk=N` (`--disk N`, 1-based) picks one, the first by default. When a `.mf`
//! manifest is present the descriptor's and the chosen disk's digests (SHA1, SHA256 or
//! SHA512) are checked by one streaming pass before the device is handed out. The disk
//! member is then opened in place, a window of the archive file that no read can leave,
//! by whatever format it is (streamOptimized vmdk usually; monolithicSparse vmdk, qcow2
//! and raw are seen too) through the format dispatch, with every referenced file refused.
//! Members with paths, `..`, links, devices, sparse members and members past the end of
//! the file are refused.
//!
//! Writing: see [`writer`]: the descriptor, a streamOptimized vmdk and a SHA256 manifest.

pub mod archive;
pub mod manifest;
pub mod ovf;
pub mod reader;
pub mod writer;

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::options::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

/// `-o` options of `-O ova` (passed to its streamOptimized vmdk; the adapter type also
/// picks the descriptor's disk controller).
pub const CREATE_OPTIONS: &[OptionHelp] = &[
    OptionHelp {
        name: "adapter_type",
        kind: "string",
        help: "lsilogic (default), buslogic or legacyESX (a SCSI controller), or ide",
    },
    OptionHelp {
        name: "hwversion",
        kind: "string",
        help: "virtual hardware version: ddb.virtualHWVersion and the descriptor's vmx-NN (default vmx-07)",
    },
    OptionHelp {
        name: "toolsversion",
        kind: "string",
        help: "ddb.toolsVersion to record in the vmdk",
    },
    OptionHelp {
        name: "compression_level",
        kind: "number",
        help: "deflate level 0-9 of the vmdk's grains",
    },
];

/// Whether the first tar member in `head` (the start of a file of `file_len` bytes) is an
/// `.ovf` descriptor.
pub fn probe(head: &[u8], file_len: u64) -> bool {
    reader::probe(head, file_len)
}

/// Open the appliance's chosen disk (`opts.options["disk"]`, 1-based).
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    reader::open(file, opts)
}

/// The appliance writer for destination `dest`.
pub fn create_writer(
    file: crate::writer::Sink,
    dest: &std::path::Path,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(writer::OvaWriter::new(file, dest, opts)?))
}

/// Why an appliance is not written into or changed in place: its disk is a member of a
/// tar archive, whose length the archive's headers and manifest fix.
pub fn in_place_refused() -> Error {
    Error::unsupported("an OVA appliance cannot be changed in place: convert its disk instead")
}

/// Why `check` does not check an appliance: its disk is checked as the image it is.
pub fn check_refused() -> Error {
    Error::unsupported("check an OVA appliance's disk: extract it or convert it first")
}
