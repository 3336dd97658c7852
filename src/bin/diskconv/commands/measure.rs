//! `measure -O FMT (IMG | --size SIZE)`: the CLI's side of [`diskconv::measure`]
//! (qemu-img's lines, or its JSON object).

use std::path::PathBuf;

use diskconv::{Error, Format, Result};

use crate::flags::{open_options, output_is_json};
use crate::sizes::size_arg;

/// How many bytes an output of format -O (default raw) would take, like qemu-img measure.
#[derive(clap::Args, Debug)]
pub struct MeasureArgs {
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Measure an empty guest of SIZE bytes instead of an image.
    #[arg(long = "size")]
    size: Option<String>,
    /// Input format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format (raw when not given, as qemu-img measure).
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output options, key=value[,key=value...].
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure a compressed output.
    #[arg(short = 'c')]
    compress: bool,
    /// Allow opening files named inside the image, confined to its folder.
    #[arg(long = "allow-references", alias = "allow-backing")]
    allow_references: bool,
    /// Accepted for qemu-img compatibility: the image is opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Input image.
    image: Option<PathBuf>,
}

/// Run `measure`: qemu-img's lines, or its JSON object.
pub fn exec(a: MeasureArgs) -> Result<()> {
    let json = output_is_json(&a.output)?;
    let format = Format::from_name(&a.out_format)?;
    let mut create = diskconv::CreateOptions::default();
    for o in &a.options {
        create.parse_option_string(o)?;
    }
    create.compress = a.compress;
    let mut convert = diskconv::ConvertOptions::new(format);
    convert.open = open_options(a.format.as_deref(), a.allow_references)?;
    let m = match (&a.size, &a.image) {
        (Some(s), None) => {
            create.size = size_arg("--size", s)?;
            diskconv::measure_device(None, format, &create, &convert)?
        }
        (None, Some(img)) => diskconv::measure(img, format, &create, &convert)?,
        _ => {
            return Err(Error::arg(
                "give either --size SIZE or an image to measure, not both or neither",
            ))
        }
    };
    if json {
        // qemu's schema types these as signed 64-bit: a size of 2^63 prints negative.
        let mut s = String::from("{\n");
        if let Some(b) = m.bitmaps {
            s += &format!("    \"bitmaps\": {},\n", b as i64);
        }
        s += &format!(
            "    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
            m.required as i64, m.fully_allocated as i64
        );
        print!("{s}");
    } else {
        println!("required size: {}", m.required);
        let bound = if m.fully_allocated_is_bound {
            " (upper bound: compressed)"
        } else {
            ""
        };
        println!("fully allocated size: {}{bound}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(())
}
