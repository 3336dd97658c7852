//! One error type for the whole crate: a small kind enum plus context.
//!
//! Every failure names what is wrong (field, offset, limit, path) so that a user
//! who feeds us a broken or hostile image learns why it was refused, in one line.

use std::fmt;
use std::path::{Path, PathBuf};

/// What class of failure this is; callers branch on this, never on message text.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The bytes are not a valid image of the expected format (bad magic, bad checksum, ...).
    InvalidFormat,
    /// A valid image that uses a feature this crate does not implement (encryption, ...).
    Unsupported,
    /// The image's metadata is inconsistent (tables past the end of file, overlapping, ...).
    Corrupt,
    /// The operating system failed a read or write.
    Io,
    /// A size or count exceeds a fixed safety limit or the file's real length.
    LimitExceeded,
    /// The image names another file (backing, extent, parent, data file) that we refuse to open.
    UnsafeReference,
    /// The caller asked for something invalid (unknown option, bad size, same input and output).
    InvalidArgument,
    /// The image is encrypted (qcow2 AES or LUKS): its content cannot be read without a
    /// key, which this crate does not take.
    Encrypted,
    /// The caller cancelled the operation (a [`CancelToken`](crate::convert::CancelToken)).
    Cancelled,
}

impl ErrorKind {
    /// Short lowercase name used in messages and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidFormat => "invalid format",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Io => "I/O error",
            ErrorKind::LimitExceeded => "limit exceeded",
            ErrorKind::UnsafeReference => "unsafe reference",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Encrypted => "encrypted image",
            ErrorKind::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which end of an operation failed: the image being read or the image (file, stream,
/// sink) being written. A service answers differently to each: a bad upload is the
/// client's fault, a failing sink is its own.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Side {
    /// The input: opening, mapping or reading the source image.
    Source,
    /// The output: creating, writing or committing the destination.
    Destination,
}

impl Side {
    /// Lowercase name used in messages and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The crate's error: a kind, a message, and where it happened.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    field: Option<String>,
    offset: Option<u64>,
    side: Option<Side>,
    option: Option<&'static str>,
    #[source]
    source: Option<std::io::Error>,
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a human message; add context with the builder methods.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            path: None,
            field: None,
            offset: None,
            side: None,
            option: None,
            source: None,
        }
    }
    /// Shorthand for [`ErrorKind::InvalidFormat`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidFormat, message)
    }
    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// Shorthand for [`ErrorKind::LimitExceeded`].
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::LimitExceeded, message)
    }
    /// Shorthand for [`ErrorKind::UnsafeReference`].
    pub fn unsafe_ref(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::UnsafeReference, message)
    }
    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn arg(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    /// Shorthand for [`ErrorKind::Encrypted`].
    pub fn encrypted(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Encrypted, message)
    }
    /// Shorthand for [`ErrorKind::Cancelled`].
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cancelled, message)
    }
    /// An I/O error with what we were doing when it happened.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        let mut e = Self::new(ErrorKind::Io, what);
        e.source = Some(source);
        e
    }

    /// Attach the image path (kept if already set: the innermost path is the precise one).
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }
    /// Put what was being done before the message (`"{what}: {message}"`), keeping the
    /// kind and the context.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
    /// Attach the on-disk field name that is wrong.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    /// Attach the byte offset (host file offset unless the message says guest).
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// Say which side failed (kept if already set: the innermost caller knows best).
    pub fn on_side(mut self, side: Side) -> Self {
        if self.side.is_none() {
            self.side = Some(side);
        }
        self
    }
    /// Name the library option that decides this outcome, as `Type::field`
    /// (`"ResizeOptions::shrink"`, `"OpenOptions::allow_references"`): messages name
    /// options this way, never a command-line flag, and a front end maps the name to its
    /// own flag for a hint.
    pub fn with_option(mut self, option: &'static str) -> Self {
        self.option = Some(option);
        self
    }

    /// The class of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The message without context.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The image path, when known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    /// The on-disk field, when known.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }
    /// The byte offset, when known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }
    /// Which side failed, when the operation had two (conversions, streams, readers).
    pub fn side(&self) -> Option<Side> {
        self.side
    }
    /// The library option that decides this outcome (see [`Error::with_option`]).
    pub fn option(&self) -> Option<&'static str> {
        self.option
    }
    /// The [`std::io::ErrorKind`] this error stands for: the operating system's own for
    /// an I/O failure (`NotFound`, `PermissionDenied`, `BrokenPipe`, ...), otherwise the
    /// closest one (`InvalidData` for a bad image, `Unsupported`, `InvalidInput`, ...). The
    /// same kind the [`std::io::Error`] made from this error has.
    pub fn io_kind(&self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        if let Some(src) = &self.source {
            return src.kind();
        }
        match self.kind {
            ErrorKind::InvalidFormat | ErrorKind::Corrupt | ErrorKind::LimitExceeded => {
                K::InvalidData
            }
            ErrorKind::Unsupported | ErrorKind::Encrypted => K::Unsupported,
            ErrorKind::UnsafeReference => K::PermissionDenied,
            ErrorKind::InvalidArgument => K::InvalidInput,
            ErrorKind::Cancelled => K::Interrupted,
            ErrorKind::Io => K::Other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        write!(f, "{}: {}", self.kind.as_str(), self.message)?;
        match (&self.field, self.offset) {
            (Some(field), Some(off)) => write!(f, " (field {field} at offset {off:#x})")?,
            (Some(field), None) => write!(f, " (field {field})")?,
            (None, Some(off)) => write!(f, " (at offset {off:#x})")?,
            (None, None) => {}
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

/// An [`std::io::Error`] made from one of ours (with `into()`) gives it back whole:
/// its kind, side, path and source survive a trip through `std::io` (a [`Read`] adapter
/// such as [`DeviceReader`](crate::DeviceReader), `std::io::copy`).
///
/// [`Read`]: std::io::Read
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        // Checked first: `into_inner` would drop an OS error's code.
        let e = if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            let kind = e.kind();
            match e.into_inner().map(|inner| inner.downcast::<Error>()) {
                Some(Ok(ours)) => return *ours,
                Some(Err(other)) => std::io::Error::new(kind, other),
                None => std::io::Error::from(kind),
            }
        } else {
            e
        };
        Error::io("I/O failed", e)
    }
}

/// Keeps the kind ([`Error::io_kind`]) and carries the whole error inside: get it back with
/// `Error::from(io_error)`, or `io_error.get_ref()` and `downcast_ref::<diskconv::Error>()`.
impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        std::io::Error::new(e.io_kind(), e)
    }
}

/// Checked arithmetic that turns overflow into a [`ErrorKind::LimitExceeded`] error naming `what`.
pub fn checked_mul(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_mul(b)
        .ok_or_else(|| Error::limit(format!("{what}: {a} x {b} overflows 64 bits")))
}

/// Checked addition; see [`checked_mul`].
pub fn checked_add(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_add(b)
        .ok_or_else(|| Error::limit(format!("{what}: {a} + {b} overflows 64 bits")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_path_field_and_offset() {
        let e = Error::corrupt("L1 table past end of file")
            .with_field("l1_table_offset")
            .at(0x28)
            .with_path("/x/y.qcow2");
        assert_eq!(
            e.to_string(),
            "/x/y.qcow2: corrupt image: L1 table past end of file (field l1_table_offset at offset 0x28)"
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn checked_ops_report_overflow() {
        assert_eq!(
            checked_mul(u64::MAX, 2, "size").unwrap_err().kind(),
            ErrorKind::LimitExceeded
        );
        assert_eq!(checked_add(1, 2, "x").unwrap(), 3);
    }
}
