//! `map IMG`: the CLI's side of [`diskconv::map`] (flags, qemu-img's human and JSON
//! output).

use std::path::PathBuf;

use diskconv::Result;

use crate::flags::{open_options, output_is_json};
use crate::sizes::size_arg;

/// Show where an image's guest ranges are allocated, like qemu-img map.
#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Guest offset to start at.
    #[arg(short = 's', long = "start-offset")]
    start_offset: Option<String>,
    /// Bytes to map at most.
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    /// Allow opening files named inside the image (backing files, extents), confined to
    /// its folder.
    #[arg(long = "allow-references", alias = "allow-backing")]
    allow_references: bool,
    /// Accepted for qemu-img compatibility: the image is opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Image.
    image: PathBuf,
}

/// Run `map`.
pub fn exec(a: MapArgs) -> Result<()> {
    let json = output_is_json(&a.output)?;
    let opts = open_options(a.format.as_deref(), a.allow_references)?;
    let range = diskconv::MapRange {
        start: a
            .start_offset
            .as_deref()
            .map(|v| size_arg("--start-offset", v))
            .transpose()?
            .unwrap_or(0),
        max_length: a
            .max_length
            .as_deref()
            .map(|v| size_arg("--max-length", v))
            .transpose()?,
    };
    let entries = diskconv::map(&a.image, &opts, range)?;
    if json {
        print!("{}", diskconv::map_json(&entries));
    } else {
        // qemu-img prints the lines before a range it cannot show, then fails.
        let (text, err) = diskconv::map_human_partial(&entries);
        print!("{text}");
        if let Some(e) = err {
            return Err(e);
        }
    }
    Ok(())
}
