//! `convert` into a stream: push the converted image into any [`Write`]
//! ([`convert_to_writer`]), or pull it through a [`Read`] ([`ConvertedReader`], e.g. an
//! HTTP request body).
//!
//! Both run the same engine as a file conversion ([`crate::convert_device`]) on its worker
//! threads, for the output formats whose writer streams ([`ImageWriter::streams`]); the
//! others are refused before anything is read or written. Memory stays bounded whatever
//! the image size: the engine keeps a fixed number of units in flight, and a slow sink
//! holds it back (a blocked `write` stops the writer side, which stops handing out work).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::convert::{ConvertOptions, ConvertReport};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::ops::convert::{prepare, run};
use crate::writer::{ImageWriter, Output};

/// The name a stream output has in errors and where a format records its own file name
/// (the vmdk descriptor's extent).
const STREAM_NAME: &str = "-";

/// Convert `src` into `sink`, written strictly in order (the output bytes exactly as the
/// file conversion would lay them out, apart from the fields each new image gets fresh).
///
/// Every output format streams (see [`crate::ops::convert::STREAMING_OUTPUTS`]; those that
/// place tables before their data are laid out from a first pass over the source). A failing `sink` (a closed pipe, a full disk)
/// stops the conversion at its next write with an error naming the output as `-`. With
/// [`ConvertOptions::digests`], the digests are computed over the bytes as they are sent,
/// on the thread writing them. The report's [`size`](ConvertReport::size) is the number of
/// bytes sent; [`output_len`](ConvertReport::output_len) what was predicted before.
pub fn convert_to_writer(
    src: &dyn BlockDevice,
    sink: impl Write + Send + 'static,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let (out, writer) = prepare_stream(src, Box::new(sink), opts)?;
    run(src, out, writer, opts)
}

fn prepare_stream(
    src: &dyn BlockDevice,
    sink: Box<dyn Write + Send>,
    opts: &ConvertOptions,
) -> Result<(Output, Box<dyn ImageWriter>)> {
    if opts.existing_target {
        return Err(Error::arg(
            "existing_target (writing into an existing image) cannot be used with a stream output",
        )
        .with_option("ConvertOptions::existing_target")
        .with_path(STREAM_NAME));
    }
    let (out, s) = Output::from_writer(Path::new(STREAM_NAME), sink);
    prepare(src, out, s, opts)
}

/// Chunks in flight between the conversion and the reader: with at most [`CHUNK`] bytes
/// each, what the reader has not taken yet stays under a few MiB.
const CHUNKS: usize = 4;
const CHUNK: usize = 1 << 20;

/// The converted image as a [`Read`]: the conversion runs on its own threads and hands
/// its bytes over as they are read, so nothing is buffered beyond a few MiB and a reader
/// that stops reading stops the conversion.
///
/// [`len`](Self::len) gives the exact length before the first byte where the format
/// allows it (an HTTP Content-Length). A failed conversion makes `read` return the error
/// (its message as an [`std::io::Error`] of its [`io_kind`](Error::io_kind)); [`finish`](Self::finish) gives the report or the
/// typed error. Dropped early, the conversion stops at its next write and every thread it
/// started is joined before `drop` returns.
pub struct ConvertedReader {
    rx: Option<Receiver<Vec<u8>>>,
    cur: Vec<u8>,
    at: usize,
    len: Option<u64>,
    thread: Option<std::thread::JoinHandle<Result<ConvertReport>>>,
    result: Option<Result<ConvertReport>>,
}

impl std::fmt::Debug for ConvertedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertedReader")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// The writing end of a [`ConvertedReader`].
struct ChannelWriter(Sender<Vec<u8>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(CHUNK);
        if n == 0 {
            return Ok(0);
        }
        self.0.send(buf[..n].to_vec()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the reader of the converted image went away",
            )
        })?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConvertedReader {
    /// Start converting `src` as `opts` says. The writer is made and checked here (bad
    /// options fail now, and a planned layout's first pass runs now); the data then flows
    /// as it is read.
    pub fn new(src: Arc<dyn BlockDevice>, opts: ConvertOptions<'static>) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(CHUNKS);
        let (out, writer) = prepare_stream(src.as_ref(), Box::new(ChannelWriter(tx)), &opts)?;
        let len = writer.output_len();
        let thread = std::thread::Builder::new()
            .name("diskconv-stream".into())
            .spawn(move || run(src.as_ref(), out, writer, &opts))
            .map_err(|e| Error::io("cannot start the conversion thread", e))?;
        Ok(ConvertedReader {
            rx: Some(rx),
            cur: Vec::new(),
            at: 0,
            len,
            thread: Some(thread),
            result: None,
        })
    }

    /// The exact number of bytes the reader will give, when known before the first byte
    /// (None for compressed outputs).
    pub fn len(&self) -> Option<u64> {
        self.len
    }

    /// Whether the output is known to be empty (never, for an image).
    pub fn is_empty(&self) -> bool {
        self.len == Some(0)
    }

    fn join(&mut self) -> &Result<ConvertReport> {
        if self.result.is_none() {
            // Closing our end first makes a conversion blocked on a full channel fail
            // its write and unwind, so the join cannot hang.
            self.rx = None;
            let r = match self.thread.take().map(|t| t.join()) {
                Some(Ok(r)) => r,
                Some(Err(_)) => Err(Error::arg("the conversion thread panicked")),
                None => Err(Error::arg("the conversion was not started")),
            };
            self.result = Some(r);
        }
        self.result.as_ref().expect("set above")
    }

    /// Read whatever is left (discarding it), wait for the conversion and return its
    /// report: the output length, the digests, the notes.
    pub fn finish(mut self) -> Result<ConvertReport> {
        let copied = std::io::copy(&mut self, &mut std::io::sink());
        self.join();
        // The conversion's own (typed) error before the one `read` turned it into.
        let report = self.result.take().expect("joined")?;
        copied.map_err(|e| Error::io("reading the converted image", e))?;
        Ok(report)
    }
}

impl Read for ConvertedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.at == self.cur.len() {
            let Some(rx) = &self.rx else {
                return Ok(0);
            };
            match rx.recv() {
                Ok(c) => {
                    self.cur = c;
                    self.at = 0;
                }
                // The conversion ended: end of data, or its error.
                Err(_) => {
                    return match self.join() {
                        Ok(_) => Ok(0),
                        Err(e) => Err(std::io::Error::new(e.io_kind(), e.to_string())),
                    };
                }
            }
        }
        let n = buf.len().min(self.cur.len() - self.at);
        buf[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Drop for ConvertedReader {
    fn drop(&mut self) {
        self.join();
    }
}
