//! Flags several commands take, lowered into the library's options: `-f FMT` with
//! `--allow-references`, and `--output human|json`.

use diskconv::{Error, Format, OpenOptions, Result};

/// `-f FMT` (never probed when given) and `--allow-references` as [`OpenOptions`].
pub fn open_options(format: Option<&str>, allow: bool) -> Result<OpenOptions> {
    let mut o = OpenOptions::new().allow_references(allow, None);
    if let Some(f) = format {
        o = o.format(Format::from_name(f)?);
    }
    Ok(o)
}

/// `--output`: true for json, false for human, an error naming the flag otherwise.
pub fn output_is_json(output: &str) -> Result<bool> {
    match output {
        "json" => Ok(true),
        "human" => Ok(false),
        other => Err(Error::arg(format!(
            "--output must be human or json, not '{other}'"
        ))),
    }
}
