//! fat: not read yet; claims nothing, so nothing is dropped.

use super::{FreeSink, Outcome, Region};
use crate::error::Result;

/// Never claims a region (placeholder until this filesystem's reader lands).
pub fn scan(_region: &Region<'_>, _sink: &mut dyn FreeSink) -> Result<Outcome> {
    Ok(Outcome::NotMine)
}
