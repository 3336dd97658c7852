//! `compare`: do two images hold the same guest bytes, as qemu-img compare decides it.
//!
//! Both images' block status is walked side by side and only ranges that some image
//! stores are read: two sparse 1 TiB images holding 2 MiB of data each cost 4 MiB of
//! reads. The verdicts, offsets and their order are qemu-img's: a difference is reported
//! at the start of its 512-byte sector (counted from the start of the range being
//! compared), and with different sizes the longer image's tail must read as zeros.

use std::path::Path;

use crate::device::{BlockDevice, BlockStatus};
use crate::error::Error;
use crate::options::OpenOptions;

/// qemu-img's read buffer: ranges are compared at most this much at a time, which also
/// bounds memory.
const CHUNK: u64 = 2 << 20;

/// How to compare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompareOptions {
    /// qemu-img's `-s`: different sizes, or any range whose allocation status differs,
    /// is a mismatch even when the bytes agree.
    pub strict: bool,
}

/// The verdict of a comparison.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CompareOutcome {
    /// Same guest bytes (the longer image's tail, if any, reads as zeros).
    Identical,
    /// The bytes differ in the 512-byte sector starting at `offset`.
    ContentMismatch {
        /// Guest offset of the first differing sector.
        offset: u64,
    },
    /// Strict: the sizes differ.
    StrictSizeMismatch,
    /// Strict: the allocation status differs in the range starting at `offset`.
    StrictStatusMismatch {
        /// Guest offset of the range.
        offset: u64,
    },
}

/// What a comparison found and what it cost.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CompareReport {
    /// The verdict.
    pub outcome: CompareOutcome,
    /// The sizes differ and the common part matched, so the longer image's tail was
    /// checked (qemu-img then warns "Image size mismatch!").
    pub size_mismatch: bool,
    /// Guest bytes read from both images together.
    pub bytes_read: u64,
}

impl CompareReport {
    /// qemu-img's exit status for the verdict: 0 identical, 1 different.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.outcome != CompareOutcome::Identical)
    }

    /// The lines qemu-img prints for this verdict (without -q), in its order.
    pub fn human(&self) -> String {
        let mut s = String::new();
        match self.outcome {
            CompareOutcome::StrictSizeMismatch => s += "Strict mode: Image size mismatch!\n",
            CompareOutcome::StrictStatusMismatch { offset } => {
                s += &format!("Strict mode: Offset {offset} block status mismatch!\n")
            }
            CompareOutcome::ContentMismatch { offset } => {
                if self.size_mismatch {
                    s += "Warning: Image size mismatch!\n";
                }
                s += &format!("Content mismatch at offset {offset}!\n");
            }
            CompareOutcome::Identical => {
                if self.size_mismatch {
                    s += "Warning: Image size mismatch!\n";
                }
                s += "Images are identical.\n";
            }
        }
        s
    }
}

/// A comparison that could not finish: which image (1 or 2) failed and how. qemu-img
/// exits 2 when an image cannot be opened, 3 when its block status fails, 4 when a read
/// fails; [`exit_code`](Self::exit_code) gives those.
#[derive(Debug)]
pub struct CompareError {
    /// 1 or 2: the image that failed.
    pub image: u8,
    /// What failed.
    pub stage: CompareStage,
    /// Guest offset of the failing request (0 for an open).
    pub offset: u64,
    /// The underlying error (boxed: a comparison's result stays small).
    pub error: Box<Error>,
}

/// The step of a comparison that failed.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareStage {
    /// Opening the image.
    Open,
    /// Asking where its data is.
    Status,
    /// Reading its bytes.
    Read,
}

impl CompareError {
    /// qemu-img's exit status: 2 open, 3 block status, 4 read.
    pub fn exit_code(&self) -> u8 {
        match self.stage {
            CompareStage::Open => 2,
            CompareStage::Status => 3,
            CompareStage::Read => 4,
        }
    }
}

impl std::fmt::Display for CompareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stage {
            CompareStage::Open => write!(f, "cannot open image {}: {}", self.image, self.error),
            CompareStage::Status => write!(
                f,
                "Sector allocation test failed for image {} at offset {}: {}",
                self.image, self.offset, self.error
            ),
            CompareStage::Read => write!(
                f,
                "Error while reading offset {} of image {}: {}",
                self.offset, self.image, self.error
            ),
        }
    }
}

impl std::error::Error for CompareError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.error.as_ref())
    }
}

/// The part of a block status qemu-img's strict mode compares (its status flags:
/// allocated, zero, data, compressed, offset valid, end of file).
fn status_key(s: &BlockStatus, size: u64) -> (bool, bool, bool, bool, bool, bool) {
    (
        s.present,
        s.zero,
        s.data,
        s.compressed,
        s.host.is_some(),
        s.offset + s.len >= size,
    )
}

struct Side<'a> {
    dev: &'a dyn BlockDevice,
    n: u8,
}

impl Side<'_> {
    fn status(&self, off: u64) -> Result<BlockStatus, CompareError> {
        let size = self.dev.virtual_size();
        let s = self
            .dev
            .block_status(off, size - off)
            .map_err(|error| self.fail(CompareStage::Status, off, error))?;
        if s.len == 0 || s.offset != off {
            let e = Error::corrupt(format!("block status at {off:#x} answered an empty range"));
            return Err(self.fail(CompareStage::Status, off, e));
        }
        Ok(s)
    }

    fn read(&self, buf: &mut [u8], off: u64, read: &mut u64) -> Result<(), CompareError> {
        self.dev
            .read_at(buf, off)
            .map_err(|error| self.fail(CompareStage::Read, off, error))?;
        *read += buf.len() as u64;
        Ok(())
    }

    fn fail(&self, stage: CompareStage, offset: u64, error: Error) -> CompareError {
        CompareError {
            image: self.n,
            stage,
            offset,
            error: Box::new(error),
        }
    }
}

/// The start of the 512-byte sector (counted from `base`) holding byte `at`.
fn sector_of(base: u64, at: u64) -> u64 {
    base + ((at - base) & !511)
}

/// Compare the guest bytes of two open devices as qemu-img compare does.
pub fn compare_devices(
    a: &dyn BlockDevice,
    b: &dyn BlockDevice,
    opts: &CompareOptions,
) -> Result<CompareReport, CompareError> {
    let (s1, s2) = (a.virtual_size(), b.virtual_size());
    let mut report = CompareReport {
        outcome: CompareOutcome::Identical,
        size_mismatch: false,
        bytes_read: 0,
    };
    if opts.strict && s1 != s2 {
        report.outcome = CompareOutcome::StrictSizeMismatch;
        return Ok(report);
    }
    let (one, two) = (Side { dev: a, n: 1 }, Side { dev: b, n: 2 });
    let mut buf1 = Vec::new();
    let mut buf2 = Vec::new();
    let common = s1.min(s2);
    let mut off = 0u64;
    while off < common {
        let st1 = one.status(off)?;
        let st2 = two.status(off)?;
        let mut chunk = st1.len.min(st2.len);
        if opts.strict && status_key(&st1, s1) != status_key(&st2, s2) {
            report.outcome = CompareOutcome::StrictStatusMismatch { offset: off };
            return Ok(report);
        }
        if st1.zero && st2.zero {
            // Both read as zeros: nothing to read.
        } else if st1.present == st2.present {
            if st1.present {
                chunk = chunk.min(CHUNK);
                buf1.resize(chunk as usize, 0);
                buf2.resize(chunk as usize, 0);
                one.read(&mut buf1, off, &mut report.bytes_read)?;
                two.read(&mut buf2, off, &mut report.bytes_read)?;
                if let Some(i) = buf1.iter().zip(&buf2).position(|(x, y)| x != y) {
                    report.outcome = CompareOutcome::ContentMismatch {
                        offset: sector_of(off, off + i as u64),
                    };
                    return Ok(report);
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let side = if st1.present { &one } else { &two };
            if let Some(at) = nonzero(side, off, chunk, &mut buf1, &mut report.bytes_read)? {
                report.outcome = CompareOutcome::ContentMismatch { offset: at };
                return Ok(report);
            }
        }
        off += chunk;
    }
    if s1 != s2 {
        report.size_mismatch = true;
        let (over, end) = if s1 > s2 { (&one, s1) } else { (&two, s2) };
        while off < end {
            let st = over.status(off)?;
            let mut chunk = st.len;
            if st.present && !st.zero {
                chunk = chunk.min(CHUNK);
                if let Some(at) = nonzero(over, off, chunk, &mut buf1, &mut report.bytes_read)? {
                    report.outcome = CompareOutcome::ContentMismatch { offset: at };
                    return Ok(report);
                }
            }
            off += chunk;
        }
    }
    Ok(report)
}

/// The start of the first sector of `[off, off+len)` on `side` holding a non-zero byte.
fn nonzero(
    side: &Side,
    off: u64,
    len: u64,
    buf: &mut Vec<u8>,
    read: &mut u64,
) -> Result<Option<u64>, CompareError> {
    buf.resize(len as usize, 0);
    side.read(buf, off, read)?;
    Ok(buf
        .iter()
        .position(|&x| x != 0)
        .map(|i| sector_of(off, off + i as u64)))
}

/// Open both images (`opts1`, `opts2`: their formats and reference gates; an
/// `s3://bucket/key` with the `remote` feature) and compare them.
pub fn compare(
    path1: &Path,
    opts1: &OpenOptions,
    path2: &Path,
    opts2: &OpenOptions,
    opts: &CompareOptions,
) -> Result<CompareReport, CompareError> {
    let open = |p: &Path, o: &OpenOptions, n: u8| {
        super::open_source(p, o).map_err(|error| CompareError {
            image: n,
            stage: CompareStage::Open,
            offset: 0,
            error: Box::new(error),
        })
    };
    let a = open(path1, opts1, 1)?;
    let b = open(path2, opts2, 2)?;
    compare_devices(a.as_ref(), b.as_ref(), opts)
}
