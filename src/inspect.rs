//! Safety inspection for services that accept images from strangers (image registries,
//! upload services): what format a file really is, whether that is the format the uploader
//! claimed, and every reason not to trust it (it names other files, it is a polyglot, it is
//! encrypted, corrupt, dirty, or cannot be opened at all).
//!
//! The inspection never opens a file named inside the image (references are refused, and
//! a refusal is reported as a [`FindingKind::NamesOtherFiles`] finding), never reads guest
//! data, and is bounded in time: it probes, opens, asks `info()`, and walks the whole map
//! (metadata only) with a cap on the number of map calls and on wall time.
//!
//! Format-independent by construction: it learns everything from the probe, from
//! `open()` errors, from [`ImageInfo`] (backing file, referenced files, dirty flag,
//! warnings, and qemu's `format-specific` keys `data-file`, `encrypt`, `corrupt`) and from
//! `map()`, so each format reader is inspected as soon as it exists.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use crate::device::{BlockDevice, HostFile, ImageInfo, MappingKind};
use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;
use crate::options::OpenOptions;
use crate::probe::{probe_report, ProbeReport};

/// Virtual sizes above this are reported as [`FindingKind::VirtualSizeSuspicious`]
/// (informational): no real disk is larger than a pebibyte.
pub const SUSPICIOUS_VIRTUAL_SIZE: u64 = 1 << 50;

/// The default [`InspectLimits::max_virtual_size`]: 64 TiB, far past the disks vhd, vmdk
/// and vdi can describe (about 2 TiB) and any an upload service is likely to accept, and
/// far under the pebibytes a hostile qcow2 header can claim in a few MiB (a consumer that
/// writes the raw image out must have room for the maximum).
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// The default [`InspectLimits::max_table_entries`]: 2^30, a 64 TiB image in 64 KiB
/// clusters (8 GiB of qcow2 L2 tables); an image with smaller clusters reaches it sooner.
pub const DEFAULT_MAX_TABLE_ENTRIES: u64 = 1 << 30;

/// What an inspection accepts: sizes past these are unsafe findings
/// ([`FindingKind::ExceedsLimit`]), and bounds on the map walk, so a hostile or merely huge
/// and fragmented image cannot make an inspection run for long.
///
/// There is no chain depth here: an inspection never opens a file named inside the image,
/// so any backing file is already an unsafe [`FindingKind::NamesOtherFiles`] finding
/// (chains a caller opens with references allowed are bounded by
/// [`MAX_CHAIN_DEPTH`](crate::MAX_CHAIN_DEPTH)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InspectLimits {
    /// Largest virtual size accepted (default [`DEFAULT_MAX_VIRTUAL_SIZE`], 64 TiB). A
    /// service that writes the normalised raw image out writes this much at most.
    pub max_virtual_size: u64,
    /// Most allocation-table entries accepted: the virtual size in the image's allocation
    /// units (qcow2 cluster, vhd block, vmdk grain, vdi block), one table entry each in
    /// every format, so this bounds the metadata a consumer must read and hold (default
    /// [`DEFAULT_MAX_TABLE_ENTRIES`]).
    pub max_table_entries: u64,
    /// Most `map()` calls the walk makes.
    pub max_map_calls: u64,
    /// Most wall time the walk takes.
    pub max_map_time: Duration,
    /// Whether a map walk stopped by the two bounds above makes the image unsafe (the
    /// default: the unwalked part was not checked). Off, [`FindingKind::MapIncomplete`]
    /// is informational.
    pub incomplete_map_is_unsafe: bool,
    /// Which disk of an OVA appliance to inspect (1-based, DiskSection order); None: the
    /// first. Ignored for every other format.
    pub ova_disk: Option<usize>,
}

impl Default for InspectLimits {
    fn default() -> Self {
        InspectLimits {
            max_virtual_size: DEFAULT_MAX_VIRTUAL_SIZE,
            max_table_entries: DEFAULT_MAX_TABLE_ENTRIES,
            max_map_calls: 1_000_000,
            max_map_time: Duration::from_secs(20),
            incomplete_map_is_unsafe: true,
            ova_disk: None,
        }
    }
}

/// What kind of thing an inspection found.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum FindingKind {
    /// The image names other files (backing file, extents, parent, data file). Opening it
    /// as uploaded would read host files; the registry cannot know which.
    NamesOtherFiles,
    /// The image keeps its guest data in a separate file (qcow2 external data file).
    ExternalDataFile,
    /// The image uses features this crate does not know (incompatible feature bits, ...).
    UnknownFeatures,
    /// The image is encrypted: its content cannot be checked.
    Encrypted,
    /// The image's metadata is inconsistent (tables past the end, bad mappings, the
    /// image's own corrupt bit).
    Corrupt,
    /// The image says it was not closed cleanly.
    Dirty,
    /// The file carries the signatures of several formats: tools disagree on what it is.
    Polyglot,
    /// The file carries the signature of a format this crate does not read (qed, vhdx,
    /// luks, ...), which a probing consumer such as qemu-img would honour.
    ForeignFormat,
    /// The detected format is not the claimed one.
    FormatMismatch,
    /// The image cannot be opened as the format in question (details in `error`).
    OpenFailed,
    /// The virtual size is implausibly large (informational: we read it sparsely).
    VirtualSizeSuspicious,
    /// A size is past the caller's [`InspectLimits`] (virtual size, table entries).
    ExceedsLimit,
    /// The map walk hit its time or call bound before the end: the part walked was fine,
    /// the rest was not checked. Unsafe unless [`InspectLimits::incomplete_map_is_unsafe`]
    /// is off.
    MapIncomplete,
    /// A reader warning that is not a hazard by itself (informational).
    Warning,
}

impl FindingKind {
    /// Whether this finding makes the image unsafe to accept under the default limits
    /// ([`Finding::hazard`] says it for the limits an inspection ran with).
    pub fn is_unsafe(self) -> bool {
        !matches!(
            self,
            FindingKind::VirtualSizeSuspicious | FindingKind::Warning
        )
    }

    /// The stable name, as in JSON (`"NamesOtherFiles"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::NamesOtherFiles => "NamesOtherFiles",
            FindingKind::ExternalDataFile => "ExternalDataFile",
            FindingKind::UnknownFeatures => "UnknownFeatures",
            FindingKind::Encrypted => "Encrypted",
            FindingKind::Corrupt => "Corrupt",
            FindingKind::Dirty => "Dirty",
            FindingKind::Polyglot => "Polyglot",
            FindingKind::ForeignFormat => "ForeignFormat",
            FindingKind::FormatMismatch => "FormatMismatch",
            FindingKind::OpenFailed => "OpenFailed",
            FindingKind::VirtualSizeSuspicious => "VirtualSizeSuspicious",
            FindingKind::ExceedsLimit => "ExceedsLimit",
            FindingKind::MapIncomplete => "MapIncomplete",
            FindingKind::Warning => "Warning",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error behind a finding, flattened for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorSummary {
    /// The [`ErrorKind`] name (`"UnsafeReference"`, `"LimitExceeded"`, ...).
    pub kind: String,
    /// The error's message without context.
    pub message: String,
    /// The on-disk field, when the reader named it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The byte offset, when the reader named it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl ErrorSummary {
    fn of(e: &Error) -> Self {
        ErrorSummary {
            kind: error_kind_name(e.kind()).to_string(),
            message: e.message().to_string(),
            field: e.field().map(str::to_string),
            offset: e.offset(),
        }
    }
}

/// The stable name of an error kind, as used in [`ErrorSummary::kind`].
pub fn error_kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidFormat => "InvalidFormat",
        ErrorKind::Unsupported => "Unsupported",
        ErrorKind::Corrupt => "Corrupt",
        ErrorKind::Io => "Io",
        ErrorKind::LimitExceeded => "LimitExceeded",
        ErrorKind::UnsafeReference => "UnsafeReference",
        ErrorKind::InvalidArgument => "InvalidArgument",
        ErrorKind::Encrypted => "Encrypted",
        ErrorKind::Cancelled => "Cancelled",
    }
}

/// One reason to (dis)trust an image.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What was found.
    pub kind: FindingKind,
    /// Whether it makes the image unsafe, under the limits the inspection ran with.
    pub hazard: bool,
    /// A human sentence saying what and where.
    pub detail: String,
    /// The format the image was opened as when this was found (None: found by probing).
    #[serde(serialize_with = "ser_format", skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// The error behind it, when an open or map call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorSummary>,
}

impl Finding {
    fn new(kind: FindingKind, detail: impl Into<String>) -> Self {
        Finding {
            kind,
            hazard: kind.is_unsafe(),
            detail: detail.into(),
            format: None,
            error: None,
        }
    }
    fn with_error(mut self, e: &Error) -> Self {
        self.error = Some(ErrorSummary::of(e));
        self
    }
}

/// What walking the map found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MapSummary {
    /// `map()` calls made.
    pub calls: u64,
    /// Whether the walk reached the end of the virtual size without error.
    pub complete: bool,
    /// Bytes mapped as data.
    pub data_bytes: u64,
    /// Bytes mapped as explicit zeros.
    pub zero_bytes: u64,
    /// Bytes mapped as unallocated.
    pub unallocated_bytes: u64,
}

/// The result of [`inspect`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inspection {
    /// The file inspected.
    pub path: String,
    /// Its length in bytes.
    pub file_size: u64,
    /// The format the caller claimed, if any.
    #[serde(serialize_with = "ser_format")]
    pub claimed_format: Option<Format>,
    /// The format probing detects: raw when no signature matches, None when several do or
    /// the one that does is a format this crate does not read (`unsupported_format`).
    #[serde(serialize_with = "ser_format")]
    pub detected_format: Option<Format>,
    /// Every format of this crate whose signature the file carries.
    #[serde(serialize_with = "ser_formats")]
    pub matching_formats: Vec<Format>,
    /// Foreign formats (qemu names) whose signature the file carries.
    pub foreign_signatures: Vec<String>,
    /// Every format (qemu names) that claims the file; several make it ambiguous (see
    /// [`ProbeReport::claims`]).
    pub claiming_formats: Vec<String>,
    /// The foreign format (qemu name) the file is, when that is what probing finds: a
    /// format this crate does not read, which probing refuses (`detected_format` is None).
    pub unsupported_format: Option<String>,
    /// Whether the detected format is the claimed one (None when nothing was claimed).
    pub format_matches_claim: Option<bool>,
    /// The format the image was opened as for size and map (the claim, else the
    /// detected format), when it opened.
    #[serde(serialize_with = "ser_format")]
    pub opened_as: Option<Format>,
    /// Guest size, when the image opened.
    pub virtual_size: Option<u64>,
    /// The map walk, when the image opened.
    pub map: Option<MapSummary>,
    /// Everything found, unsafe and informational.
    pub findings: Vec<Finding>,
    /// [`Inspection::is_safe`], for JSON consumers.
    pub safe: bool,
}

impl Inspection {
    /// True when the format matches the claim (or nothing was claimed and the format is
    /// unambiguous) and no finding is of an unsafe kind.
    pub fn is_safe(&self) -> bool {
        self.format_matches_claim != Some(false)
            && self.detected_format.is_some()
            && !self.findings.iter().any(|f| f.hazard)
    }

    /// The findings that make the image unsafe.
    pub fn unsafe_findings(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.hazard)
    }

    /// Whether any finding is of `kind`.
    pub fn has(&self, kind: FindingKind) -> bool {
        self.findings.iter().any(|f| f.kind == kind)
    }
}

fn ser_format<S: Serializer>(f: &Option<Format>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match f {
        Some(f) => s.serialize_some(f.name()),
        None => s.serialize_none(),
    }
}

fn ser_formats<S: Serializer>(v: &[Format], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|f| f.name()))
}

/// Inspect the image at `path` (see the module docs) with the default limits. Errors only
/// when the file itself cannot be read; everything wrong with the image is a finding.
pub fn inspect(path: impl AsRef<Path>, claimed_format: Option<Format>) -> Result<Inspection> {
    inspect_with(path, claimed_format, &InspectLimits::default())
}

/// [`inspect`] with explicit limits.
pub fn inspect_with(
    path: impl AsRef<Path>,
    claimed_format: Option<Format>,
    limits: &InspectLimits,
) -> Result<Inspection> {
    let path = path.as_ref();
    // Opening a FIFO or socket would block or fail oddly; say what it is instead.
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io("cannot inspect image", e).with_path(path))?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(Error::arg("not a regular file (a folder, FIFO or socket)").with_path(path));
    }
    let file = HostFile::open(path)?;
    Ok(inspect_host(file, claimed_format, limits)?.0)
}

/// Inspect the already opened `file` (named `path` in the findings; nothing is opened by
/// that name) as [`inspect`] does, under `limits`, and hand back the device it opened for
/// the size and map: the claimed format, else the detected one (None when it did not
/// open). Using that device, never a second open of the path, leaves no gap between the
/// check and the use: a file swapped at the path afterwards is not what gets read.
///
/// Check [`Inspection::is_safe`] before using the device. Errors only when the file
/// itself cannot be read (or is a folder, FIFO or socket); everything wrong with the
/// image is a finding.
///
/// ```no_run
/// use diskconv::{inspect_file, DeviceReader, Format, InspectLimits};
/// let file = std::fs::File::open("upload.img")?;
/// let (report, dev) = inspect_file(file, "upload.img", Some(Format::Qcow2), &InspectLimits::default())?;
/// match dev {
///     Some(dev) if report.is_safe() => {
///         std::io::copy(&mut DeviceReader::new(dev), &mut std::io::sink())?;
///     }
///     _ => eprintln!("refused: {:?}", report.unsafe_findings().collect::<Vec<_>>()),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn inspect_file(
    file: File,
    path: impl AsRef<Path>,
    claimed_format: Option<Format>,
    limits: &InspectLimits,
) -> Result<(Inspection, Option<Box<dyn BlockDevice>>)> {
    let file = HostFile::from_file(file, path.as_ref())?;
    inspect_host(file, claimed_format, limits)
}

fn inspect_host(
    file: HostFile,
    claimed_format: Option<Format>,
    limits: &InspectLimits,
) -> Result<(Inspection, Option<Box<dyn BlockDevice>>)> {
    let path = file.path().to_path_buf();
    let path = path.as_path();
    let file_size = file.len();
    let report: ProbeReport = probe_report(&file)?;
    let detected = report.detected();
    let mut findings = Vec::new();

    let claims = report.claims();
    if claims.len() > 1 {
        findings.push(Finding::new(
            FindingKind::Polyglot,
            format!(
                "the file carries the signatures of several formats ({}): tools would disagree on what it is",
                claims.join(", ")
            ),
        ));
    }
    for (fmt, why) in &report.distrusted {
        let mut f = Finding::new(FindingKind::Polyglot, why.clone());
        f.format = Some(*fmt);
        findings.push(f);
    }
    let unsupported = report.unsupported();
    for name in &report.foreign {
        let detail = if *name == "dmg" && report.dmg_by_name {
            "the file's name ends in .dmg, so a consumer that probes (qemu-img) reads it as dmg, never as a raw disk; probing refuses it".to_string()
        } else if unsupported == Some(name) {
            format!(
                "the file is a {name} image, a format diskconv does not read (probing refuses it): a consumer that probes (qemu-img) reads it as {name}, never as a raw disk"
            )
        } else {
            format!(
                "the file carries a {name} signature: a consumer that probes (qemu-img) would read it as {name}"
            )
        };
        findings.push(Finding::new(FindingKind::ForeignFormat, detail));
    }
    let format_matches_claim = claimed_format.map(|c| detected == Some(c));
    if let (Some(claim), Some(false)) = (claimed_format, format_matches_claim) {
        let what = match (detected, unsupported) {
            (Some(d), _) => format!("detected {d}"),
            (None, Some(name)) => format!("the file is a {name} image"),
            (None, None) => "the format is ambiguous".to_string(),
        };
        findings.push(Finding::new(
            FindingKind::FormatMismatch,
            format!("claimed {claim}, but {what}"),
        ));
    }

    // The claim decides how the image is read; without one, the detection does. Every
    // other signature found is opened too, because a consumer that probes would read the
    // file that way, and what it would find there matters as much.
    let primary = claimed_format.or(detected);
    let secondary: Vec<Format> = report
        .matches
        .iter()
        .copied()
        .filter(|f| Some(*f) != primary)
        .collect();

    let mut opened_as = None;
    let mut virtual_size = None;
    let mut map = None;
    let mut device = None;
    if let Some(fmt) = primary {
        let mut found = Vec::new();
        if let Some(dev) = open_and_collect(&file, fmt, limits.ova_disk, &mut found)? {
            let size = dev.virtual_size();
            opened_as = Some(fmt);
            virtual_size = Some(size);
            size_findings(size, dev.info().cluster_size, file_size, limits, &mut found);
            map = Some(walk_map(dev.as_ref(), file_size, limits, &mut found));
            device = Some(dev);
        }
        tag(&mut found, fmt);
        findings.extend(found);
    }
    for fmt in secondary {
        let mut found = Vec::new();
        open_and_collect(&file, fmt, limits.ova_disk, &mut found)?;
        for f in &mut found {
            f.detail = format!("read as {fmt}: {}", f.detail);
        }
        tag(&mut found, fmt);
        findings.extend(found);
    }

    let mut insp = Inspection {
        path: path.display().to_string(),
        file_size,
        claimed_format,
        detected_format: detected,
        matching_formats: report.matches.clone(),
        foreign_signatures: report.foreign.iter().map(|s| s.to_string()).collect(),
        claiming_formats: claims.iter().map(|s| s.to_string()).collect(),
        unsupported_format: unsupported.map(str::to_string),
        format_matches_claim,
        opened_as,
        virtual_size,
        map,
        findings,
        safe: false,
    };
    insp.safe = insp.is_safe();
    Ok((insp, device))
}

/// Findings from the sizes an image claims, against the caller's limits.
fn size_findings(
    size: u64,
    cluster: Option<u64>,
    file_size: u64,
    limits: &InspectLimits,
    found: &mut Vec<Finding>,
) {
    if size > limits.max_virtual_size {
        found.push(Finding::new(
            FindingKind::ExceedsLimit,
            format!(
                "virtual size {size} bytes is past the limit of {} bytes (InspectLimits::max_virtual_size) in a {file_size}-byte file",
                limits.max_virtual_size
            ),
        ));
    }
    if size > SUSPICIOUS_VIRTUAL_SIZE {
        found.push(Finding::new(
            FindingKind::VirtualSizeSuspicious,
            format!(
                "virtual size {size} bytes is larger than any real disk (> 1 PiB) in a {file_size}-byte file"
            ),
        ));
    }
    if let Some(c) = cluster.filter(|&c| c > 0) {
        let entries = size.div_ceil(c);
        if entries > limits.max_table_entries {
            found.push(Finding::new(
                FindingKind::ExceedsLimit,
                format!(
                    "{entries} allocation units of {c} bytes is past the limit of {} table entries (InspectLimits::max_table_entries)",
                    limits.max_table_entries
                ),
            ));
        }
    }
}

fn tag(found: &mut [Finding], fmt: Format) {
    for f in found {
        f.format = Some(fmt);
    }
}

/// Open `file` as `fmt` with references refused (through a duplicate of its descriptor,
/// so every reading is of the same file); record what `open` and `info` reveal. Errs only
/// when the descriptor cannot be duplicated.
fn open_and_collect(
    file: &HostFile,
    fmt: Format,
    ova_disk: Option<usize>,
    found: &mut Vec<Finding>,
) -> Result<Option<Box<dyn BlockDevice>>> {
    let path = file.path();
    let dup = file
        .file()
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e).with_path(path))?;
    let mut opts = OpenOptions::new().format(fmt);
    if let (Format::Ova, Some(n)) = (fmt, ova_disk) {
        opts = opts.option("disk", &n.to_string());
    }
    Ok(match crate::formats::open_file(dup, path, &opts) {
        Ok(dev) => {
            let own_name = path.file_name().and_then(|n| n.to_str());
            info_findings(&dev.info(), own_name, found);
            Some(dev)
        }
        Err(e) => {
            found.extend(error_findings(&e, &format!("opening as {fmt}")));
            None
        }
    })
}

/// Does a reader's field name say "external data file"? (`data_file`, `data-file`, ...)
fn is_data_file_field(field: &str) -> bool {
    let f = field.to_ascii_lowercase();
    f.contains("data_file") || f.contains("data-file") || f.contains("data file")
}

/// The findings an error stands for. Every error yields at least one unsafe finding: an
/// image that fails to open or map is not safe, whatever the reason.
fn error_findings(e: &Error, stage: &str) -> Vec<Finding> {
    let msg = e.message().to_ascii_lowercase();
    let detail = format!("{stage}: {e}");
    let mut out = Vec::new();
    match e.kind() {
        ErrorKind::UnsafeReference => {
            out.push(Finding::new(FindingKind::NamesOtherFiles, detail.clone()).with_error(e));
            if e.field().is_some_and(is_data_file_field) || msg.contains("data file") {
                out.push(Finding::new(FindingKind::ExternalDataFile, detail).with_error(e));
            }
        }
        ErrorKind::Corrupt => out.push(Finding::new(FindingKind::Corrupt, detail).with_error(e)),
        ErrorKind::Encrypted => {
            out.push(Finding::new(FindingKind::Encrypted, detail).with_error(e))
        }
        // Readers refuse encrypted images and unknown incompatible features as
        // Unsupported; the message is the only place the reason lives. Whatever the
        // words, the finding is unsafe, so a reworded message only changes its label.
        ErrorKind::Unsupported if msg.contains("encrypt") => {
            out.push(Finding::new(FindingKind::Encrypted, detail).with_error(e))
        }
        ErrorKind::Unsupported if msg.contains("feature") => {
            out.push(Finding::new(FindingKind::UnknownFeatures, detail).with_error(e))
        }
        _ => out.push(Finding::new(FindingKind::OpenFailed, detail).with_error(e)),
    }
    out
}

/// Findings from what an opened image says about itself. `own_name` is the image's file
/// name: a monolithicSparse vmdk's embedded descriptor lists the image itself as its
/// extent, which names no other file.
fn info_findings(info: &ImageInfo, own_name: Option<&str>, found: &mut Vec<Finding>) {
    let mut named: Vec<&str> = Vec::new();
    if let Some(b) = &info.backing_file {
        let fmt = info
            .backing_format
            .as_deref()
            .map(|f| format!(" (format {f})"))
            .unwrap_or_default();
        found.push(Finding::new(
            FindingKind::NamesOtherFiles,
            format!("backing file '{b}'{fmt}"),
        ));
        named.push(b);
    }
    for r in &info.referenced_files {
        let is_self = own_name.is_some_and(|own| r == own || r.strip_prefix("./") == Some(own));
        if !is_self && !named.contains(&r.as_str()) {
            found.push(Finding::new(
                FindingKind::NamesOtherFiles,
                format!("names the file '{r}'"),
            ));
            named.push(r);
        }
    }
    let data = info
        .format_specific
        .as_ref()
        .and_then(|fs| fs.get("data"))
        .and_then(|d| d.as_object());
    if let Some(data) = data {
        if let Some(df) = data.get("data-file") {
            let name = df.as_str().map(str::to_string).unwrap_or(df.to_string());
            found.push(Finding::new(
                FindingKind::ExternalDataFile,
                format!("guest data lives in the external data file '{name}'"),
            ));
        }
        if let Some(enc) = data.get("encrypt") {
            let how = enc
                .get("format")
                .and_then(|f| f.as_str())
                .unwrap_or("unknown");
            found.push(Finding::new(
                FindingKind::Encrypted,
                format!("the image is encrypted ({how})"),
            ));
        }
        if data.get("corrupt").and_then(|c| c.as_bool()) == Some(true) {
            found.push(Finding::new(
                FindingKind::Corrupt,
                "the image's own header marks it corrupt",
            ));
        }
    }
    if info.dirty == Some(true) {
        found.push(Finding::new(
            FindingKind::Dirty,
            "the image was not closed cleanly (dirty flag set)",
        ));
    }
    for w in &info.warnings {
        let lw = w.to_ascii_lowercase();
        let kind = if lw.contains("unknown") && lw.contains("feature") {
            FindingKind::UnknownFeatures
        } else {
            FindingKind::Warning
        };
        found.push(Finding::new(kind, w.clone()));
    }
}

/// Walk the map from 0 to the virtual size (metadata only), checking each answer is a
/// well-formed mapping and that stored data starts inside the file.
fn walk_map(
    dev: &dyn BlockDevice,
    file_size: u64,
    limits: &InspectLimits,
    found: &mut Vec<Finding>,
) -> MapSummary {
    let size = dev.virtual_size();
    let start = Instant::now();
    let mut s = MapSummary::default();
    let mut off = 0u64;
    while off < size {
        if s.calls >= limits.max_map_calls || start.elapsed() > limits.max_map_time {
            let mut f = Finding::new(
                FindingKind::MapIncomplete,
                format!(
                    "map walk stopped after {} calls and {:.1} s at guest offset {off:#x} of {size}: the rest was not checked",
                    s.calls,
                    start.elapsed().as_secs_f64()
                ),
            );
            f.hazard = limits.incomplete_map_is_unsafe;
            found.push(f);
            return s;
        }
        s.calls += 1;
        let m = match dev.map(off, size - off) {
            Ok(m) => m,
            Err(e) => {
                found.extend(error_findings(
                    &e,
                    &format!("mapping guest offset {off:#x}"),
                ));
                return s;
            }
        };
        if m.offset != off || m.len == 0 || m.len > size - off {
            found.push(Finding::new(
                FindingKind::Corrupt,
                format!(
                    "map at guest offset {off:#x} returned an invalid range ({} bytes at {:#x})",
                    m.len, m.offset
                ),
            ));
            return s;
        }
        match m.kind {
            MappingKind::Data { host } => {
                if let Some(h) = host.filter(|&h| h >= file_size) {
                    found.push(Finding::new(
                        FindingKind::Corrupt,
                        format!(
                            "guest offset {off:#x} maps to host offset {h:#x}, past the end of the file ({file_size} bytes)"
                        ),
                    ));
                    return s;
                }
                s.data_bytes += m.len;
            }
            MappingKind::Zero => s.zero_bytes += m.len,
            MappingKind::Unallocated => s.unallocated_bytes += m.len,
        }
        off += m.len;
    }
    s.complete = true;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_raw_is_safe_and_claims_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        let i = inspect(&p, Some(Format::Raw)).unwrap();
        assert!(i.is_safe(), "{i:?}");
        assert_eq!(i.virtual_size, Some(4096));
        let m = i.map.as_ref().unwrap();
        assert!(m.complete);
        assert_eq!(m.data_bytes + m.zero_bytes + m.unallocated_bytes, 4096);
        let i = inspect(&p, None).unwrap();
        assert!(i.is_safe());
        assert_eq!(i.format_matches_claim, None);
        let i = inspect(&p, Some(Format::Qcow2)).unwrap();
        assert!(!i.is_safe());
        assert!(i.has(FindingKind::FormatMismatch));
    }

    #[test]
    fn signatures_make_raw_claims_unsafe() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        let mut b = b"QFI\xfb\0\0\0\x03".to_vec();
        b.resize(1024, 0);
        std::fs::write(&p, &b).unwrap();
        let i = inspect(&p, Some(Format::Raw)).unwrap();
        assert_eq!(i.detected_format, Some(Format::Qcow2));
        assert!(i.has(FindingKind::FormatMismatch) && !i.safe);
        // Read as raw it opened; the qcow2 reading is reported as well.
        assert_eq!(i.opened_as, Some(Format::Raw));

        let mut b = b"WithoutFreeSpace\x02\0\0\0".to_vec();
        b.resize(1024, 0);
        std::fs::write(&p, &b).unwrap();
        let i = inspect(&p, Some(Format::Raw)).unwrap();
        assert!(i.has(FindingKind::ForeignFormat) && !i.safe);
        let v = serde_json::to_value(&i).unwrap();
        assert_eq!(v["foreign_signatures"][0], "parallels");
        assert_eq!(v["findings"][0]["kind"], "ForeignFormat");
        assert_eq!(v["claimed_format"], "raw");
    }

    #[test]
    fn folders_and_fifos_are_not_inspected() {
        let dir = tempfile::tempdir().unwrap();
        let e = inspect(dir.path(), None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = inspect(&fifo, Some(Format::Raw)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn errors_become_unsafe_findings() {
        let e = Error::unsafe_ref("data file names '/etc/passwd'").with_field("data_file");
        let f = error_findings(&e, "opening");
        assert_eq!(f[0].kind, FindingKind::NamesOtherFiles);
        assert_eq!(f[1].kind, FindingKind::ExternalDataFile);
        assert_eq!(f[0].error.as_ref().unwrap().kind, "UnsafeReference");
        let f = error_findings(&Error::unsupported("AES encryption"), "opening");
        assert_eq!(f[0].kind, FindingKind::Encrypted);
        let f = error_findings(&Error::limit("L1 table too big"), "opening");
        assert_eq!(f[0].kind, FindingKind::OpenFailed);
        assert!(f.iter().all(|f| f.kind.is_unsafe()));
    }

    #[test]
    fn info_reveals_references_and_flags() {
        let info = ImageInfo {
            backing_file: Some("/etc/passwd".into()),
            referenced_files: vec!["/etc/passwd".into(), "x.raw".into(), "y.raw".into()],
            dirty: Some(true),
            format_specific: Some(serde_json::json!({"type": "qcow2", "data": {
                "data-file": "d.raw", "encrypt": {"format": "luks"}, "corrupt": true}})),
            warnings: vec!["unknown autoclear feature bits 0x4".into(), "note".into()],
            ..Default::default()
        };
        let mut f = Vec::new();
        info_findings(&info, Some("x.raw"), &mut f);
        let kinds: Vec<FindingKind> = f.iter().map(|f| f.kind).collect();
        use FindingKind::*;
        assert_eq!(
            kinds,
            vec![
                NamesOtherFiles,
                NamesOtherFiles,
                ExternalDataFile,
                Encrypted,
                Corrupt,
                Dirty,
                UnknownFeatures,
                Warning
            ]
        );
    }
}
