//! The allocation plan: what a planned (sequential) writer lays out before its first byte.

/// The guest ranges a conversion will hand to its writer, found before the first byte is
/// written (see [`crate::convert::plan_allocation`]), so that a writer can lay out all of
/// its metadata ahead of the data and write strictly forward.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocationPlan {
    /// The granule the plan was made for: every range starts on a multiple of it and
    /// ends on one or at the virtual size.
    pub granularity: u64,
    /// The guest size the plan covers.
    pub virtual_size: u64,
    /// Written guest ranges `[start, end)`, ascending, disjoint and never touching
    /// (touching ranges are merged).
    pub ranges: Vec<(u64, u64)>,
    /// Sum of the ranges' lengths.
    pub bytes: u64,
    /// With an encoder (compression): the granules, by guest offset and ascending, that
    /// encoded to `Some`, with their encoded length; every other granule of the ranges is
    /// stored as is. Encoders are deterministic, so the writing pass gets these lengths.
    pub encoded: Vec<(u64, u32)>,
}

impl AllocationPlan {
    /// Add `[start, end)`, which must start at or after the end of every range so far
    /// (the engine's writes ascend).
    pub fn push(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.bytes += end - start;
        match self.ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => self.ranges.push((start, end)),
        }
    }

    /// Drop what lies at or past `size` (an output smaller than its source, from
    /// `--target-size`): the engine never writes there, so the layout must not plan it.
    pub fn clip(&mut self, size: u64) {
        let ranges = std::mem::take(&mut self.ranges);
        self.bytes = 0;
        for (a, b) in ranges {
            self.push(a, b.min(size));
        }
        self.encoded.retain(|&(off, _)| off < size);
        self.virtual_size = self.virtual_size.min(size);
    }
}
