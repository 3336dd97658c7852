//! Zeros, written from one static buffer: stream padding, gap fills, in-place zeroing.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// Zeros for padding streams and filling gaps in place.
pub(super) static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Send `n` zeros to `w`.
pub(super) fn write_zeros(mut w: impl Write, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Write zeros over `[at, end)` of `file`.
pub(super) fn write_zeros_at(file: &File, mut at: u64, end: u64) -> std::io::Result<()> {
    while at < end {
        let k = (end - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..k], at)?;
        at += k as u64;
    }
    Ok(())
}
