//! The write side: an [`ImageWriter`] receives guest data in ascending order and lays it
//! out in its format; [`AtomicOutput`] makes every output appear whole or not at all.
//!
//! Ascending order is what lets a writer stream to a non-seekable sink; alignment to the
//! writer's granularity is what keeps every writer simple (it never merges partial
//! clusters). Ranges the engine never hands over are zeros.
//!
//! One file per idea, each importing only from those listed before it here (no cycles):
//! - `plan.rs`: [`AllocationPlan`], the ranges a conversion will write, known up front;
//! - `uuid.rs`: [`random_uuid_v4`] for the formats that stamp one on each image;
//! - `zeros.rs`: the zero buffer every padding and gap fill writes from;
//! - `digest.rs`: [`DigestAlgo`] and [`Digester`], digests of a byte sequence;
//! - `edit.rs`: [`EditFile`] (the in-place side, with its fail-the-Nth-write test hook)
//!   and [`lock_exclusive`];
//! - `atomic.rs`: [`AtomicOutput`], a file written under a temporary name and renamed;
//! - `sink.rs`: [`Sink`], where a writer's bytes go (a file, in place, a stream), hashing
//!   on the way;
//! - `output.rs`: [`Output`], what a destination is (new or replaced file, block device,
//!   FIFO, stdout, symlink) and how it is finished.
//!
//! This file holds the traits a format's writer implements and re-exports the rest, so
//! every item keeps its `crate::writer::X` path.

use std::sync::Arc;

use crate::error::Result;

mod atomic;
mod digest;
mod edit;
mod output;
mod plan;
mod sink;
mod uuid;
mod zeros;

pub use atomic::{remove_temporaries, AtomicOutput};
pub use digest::{DigestAlgo, Digester};
pub use edit::{lock_exclusive, EditFile};
pub use output::{Finished, Output, OutputKind, OutputOptions};
pub use plan::AllocationPlan;
pub use sink::{write_all_at, zero_fill_at, Sink};
pub use uuid::random_uuid_v4;

/// A per-granule transform (compression) the engine may run on worker threads.
pub trait Encoder: Send + Sync {
    /// Encode one granule of guest data at `offset`. `None` means "store it as is"
    /// (compression did not shrink it); the engine then calls [`ImageWriter::write`].
    fn encode(&self, offset: u64, data: &[u8]) -> Result<Option<Vec<u8>>>;
}

/// A sink for guest data in one image format.
///
/// The engine guarantees: calls come in strictly ascending, non-overlapping order; every
/// `offset` is a multiple of [`granularity`](Self::granularity) and every length is too,
/// except a run that ends at the virtual size; every range never written is guest zeros.
pub trait ImageWriter: Send {
    /// Allocation unit the writer wants data aligned to (a power of two, at least 512).
    fn granularity(&self) -> u64;

    /// The guest size the output will have (may be larger than asked, e.g. rounded up
    /// to whole sectors or MiB for Azure).
    fn virtual_size(&self) -> u64;

    /// An encoder to run on worker threads, one granule at a time, when the writer
    /// compresses. With an encoder, [`write_encoded`](Self::write_encoded) receives each
    /// granule that encoded to `Some`.
    fn encoder(&self) -> Option<Arc<dyn Encoder>> {
        None
    }

    /// Write a run of guest data (one or more whole granules).
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;

    /// Write one granule whose encoded form is `encoded` (`data` is the plain form).
    fn write_encoded(&mut self, offset: u64, data: &[u8], encoded: Vec<u8>) -> Result<()> {
        let _ = encoded;
        self.write(offset, data)
    }

    /// Things the user should know about the output that are not errors (e.g. "size
    /// rounded up to a whole sector"); the CLI prints them as notes.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether this writer's host writes only ever move forward (each at or past the end
    /// of the previous one, [`Sink::set_len`] never below it), so that it can write to a
    /// pipe or character device. Checked before any data is read.
    fn streams(&self) -> bool {
        false
    }

    /// The exact number of bytes the output will have, known before the first byte is
    /// written (an HTTP body's Content-Length, an uploader's part sizes); None when the
    /// layout depends on the data (compressed outputs).
    fn output_len(&self) -> Option<u64> {
        None
    }

    /// Write the remaining metadata and flush. Nothing is valid until this returns Ok.
    fn finish(self: Box<Self>) -> Result<()>;
}
