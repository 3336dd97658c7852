//! Standard output as the image's stream (DST `-`): never a terminal, written through a
//! descriptor of its own, and the reports moved to stderr.

use std::io::IsTerminal;

use diskconv::{Error, Result};

/// Refuse DST `-` when stdout is a terminal: an image would fill it with binary.
pub fn refuse_terminal() -> Result<()> {
    if std::io::stdout().is_terminal() {
        return Err(Error::arg(
            "refusing to write a disk image to a terminal; redirect stdout or name a file",
        )
        .with_path("-"));
    }
    Ok(())
}

/// Stdout as a file of its own: unbuffered, whole runs per write(2), not std's line buffer.
pub fn file() -> Result<std::fs::File> {
    use std::os::fd::AsFd;
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("cannot use stdout", e).with_path("-"))?;
    Ok(std::fs::File::from(out))
}

/// A line on stdout, or on stderr when stdout carries the image.
pub fn side_println(to_stderr: bool, s: &str) {
    if to_stderr {
        eprintln!("{s}");
    } else {
        println!("{s}");
    }
}
