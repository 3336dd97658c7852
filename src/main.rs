//! The `diskconv` command: qemu-img-compatible flags over the diskconv library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use diskconv::parse_size;
use diskconv::{ConvertOptions, CreateOptions, Error, Format, ImageInfo, OpenOptions, Result};

#[derive(Parser)]
#[command(
    name = "diskconv",
    version,
    about = "Convert and inspect disk images (raw, qcow2, vpc/vhd, vmdk, vdi)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert SRC into a new image DST of format -O.
    Convert {
        /// Input format (never probed when given).
        #[arg(short = 'f')]
        src_format: Option<String>,
        /// Output format.
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// Output options, key=value[,key=value...]; `-o help` lists them.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Compress the output (qcow2, streamOptimized vmdk).
        #[arg(short = 'c')]
        compress: bool,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Quiet (accepted for compatibility).
        #[arg(short = 'q')]
        quiet: bool,
        /// Zero runs of at least SIZE stay unallocated (default 4k); 0 writes everything.
        #[arg(short = 'S', default_value = "4k")]
        sparse_size: String,
        /// Output cache mode like qemu-img's: `unsafe` (default) skips the final flush;
        /// any other mode (writeback, none, writethrough, directsync) flushes before the rename.
        #[arg(short = 't', default_value = "unsafe")]
        cache: String,
        /// Worker threads (0: one per core).
        #[arg(short = 'm', long = "threads", default_value_t = 0)]
        threads: usize,
        /// Accepted for qemu-img compatibility (writes are already out of order-safe).
        #[arg(short = 'W')]
        _unordered: bool,
        /// Allow opening files named inside the input image (backing files, extents),
        /// confined to its folder.
        #[arg(long = "allow-references", alias = "allow-backing")]
        allow_references: bool,
        /// Input image.
        src: PathBuf,
        /// Output image.
        dst: Option<PathBuf>,
    },
    /// Show facts about an image.
    Info {
        /// Image format (never probed when given).
        #[arg(short = 'f')]
        format: Option<String>,
        /// human or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// Allow opening files named inside the image, confined to its folder.
        #[arg(long = "allow-references", alias = "allow-backing")]
        allow_references: bool,
        /// Image.
        image: PathBuf,
    },
    /// Check an uploaded image before accepting it: detected format vs the claim, and
    /// every safety finding. Never opens files the image names. Exit status 0 only for a
    /// safe image of the claimed format, 2 for an unsafe one, 1 on errors.
    Inspect {
        /// The format the image is claimed to be.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// human or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// Image.
        image: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diskconv: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open_options(format: Option<&str>, allow: bool) -> Result<OpenOptions> {
    let mut o = OpenOptions::new().allow_references(allow, None);
    if let Some(f) = format {
        o = o.format(Format::from_name(f)?);
    }
    Ok(o)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Convert {
            src_format,
            out_format,
            options,
            compress,
            progress,
            quiet,
            sparse_size,
            cache,
            threads,
            _unordered,
            allow_references,
            src,
            dst,
        } => {
            let format = Format::from_name(&out_format)?;
            let mut create = CreateOptions {
                compress,
                ..Default::default()
            };
            for o in &options {
                create.parse_option_string(o)?;
            }
            if create.options.contains_key("help") || create.options.contains_key("?") {
                print_option_help(format);
                return Ok(());
            }
            let dst = dst.ok_or_else(|| Error::arg("convert needs SRC and DST"))?;
            let min_sparse =
                parse_size(&sparse_size).map_err(|e| Error::arg(format!("-S: {}", e.message())))?;
            let mut opts = ConvertOptions::new(format);
            opts.open = open_options(src_format.as_deref(), allow_references)?;
            opts.create = create;
            opts.min_sparse = min_sparse;
            opts.threads = threads;
            opts.sync = match cache.as_str() {
                "unsafe" => false,
                "writeback" | "none" | "writethrough" | "directsync" => true,
                other => return Err(Error::arg(format!("-t: unknown cache mode '{other}'"))),
            };
            let tty = std::io::stderr().is_terminal();
            let reporter: Box<dyn Fn(u64, u64) + Sync> = if tty {
                let bar = indicatif::ProgressBar::new(100);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {percent:>3}% {elapsed_precise}",
                    )
                    .expect("static template"),
                );
                Box::new(move |done: u64, total: u64| {
                    bar.set_position(done.saturating_mul(100).checked_div(total).unwrap_or(100))
                })
            } else {
                // Like qemu-img: a new line of figures only after another 1% or at the end.
                let last = std::sync::atomic::AtomicU64::new(u64::MAX);
                Box::new(move |done: u64, total: u64| {
                    let hundredths = done
                        .saturating_mul(10_000)
                        .checked_div(total)
                        .unwrap_or(10_000);
                    let prev = last.load(std::sync::atomic::Ordering::Relaxed);
                    if prev == u64::MAX
                        || hundredths >= prev + 100
                        || (done == total && hundredths != prev)
                    {
                        last.store(hundredths, std::sync::atomic::Ordering::Relaxed);
                        print_progress(done, total);
                    }
                })
            };
            if progress && !quiet {
                opts.progress = Some(reporter.as_ref());
            }
            remove_temp_on_interrupt(&dst);
            let report = diskconv::convert(&src, &dst, &opts)?;
            if progress && !quiet && !tty {
                eprintln!();
            }
            for w in &report.warnings {
                eprintln!("diskconv: note: {w}");
            }
            Ok(())
        }
        Cmd::Info {
            format,
            output,
            allow_references,
            image,
        } => {
            // Like qemu-img info: backing and parent images are named, never opened.
            let opts = open_options(format.as_deref(), allow_references)?.without_backing();
            let dev = diskconv::open(&image, &opts)?;
            let info = dev.info();
            match output.as_str() {
                "json" => println!(
                    "{}",
                    serde_json::to_string_pretty(&info_json(&image, &info)).expect("json")
                ),
                "human" => print!("{}", info_human(&image, &info)),
                other => {
                    return Err(Error::arg(format!(
                        "--output must be human or json, not '{other}'"
                    )))
                }
            }
            Ok(())
        }
        Cmd::Inspect {
            format,
            output,
            image,
        } => {
            let claim = format.as_deref().map(Format::from_name).transpose()?;
            let insp = diskconv::inspect(&image, claim)?;
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&insp).expect("json")),
                "human" => print!("{}", inspection_human(&insp)),
                other => {
                    return Err(Error::arg(format!(
                        "--output must be human or json, not '{other}'"
                    )))
                }
            }
            if !insp.safe {
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(2);
            }
            Ok(())
        }
    }
}

/// An interrupted conversion must leave nothing behind: on SIGINT/SIGTERM remove this
/// process's temporary siblings of `dst` (named by `AtomicOutput` with our pid) and exit.
fn remove_temp_on_interrupt(dst: &Path) {
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(
        ".{}.diskconv-{}-",
        dst.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    );
    let _ = ctrlc::set_handler(move || {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        eprintln!("\ndiskconv: interrupted; partial output removed");
        std::process::exit(130);
    });
}

fn inspection_human(i: &diskconv::Inspection) -> String {
    let fmt = |f: Option<Format>| f.map(|f| f.name().to_string());
    let mut s = format!("image: {}\nfile size: {}\n", i.path, i.file_size);
    s += &format!(
        "claimed format: {}\n",
        fmt(i.claimed_format).unwrap_or_else(|| "(none)".into())
    );
    let detected = fmt(i.detected_format).unwrap_or_else(|| {
        let names: Vec<&str> = i.matching_formats.iter().map(|f| f.name()).collect();
        format!("ambiguous ({})", names.join(", "))
    });
    s += &format!("detected format: {detected}\n");
    if let Some(v) = i.virtual_size {
        s += &format!("virtual size: {} ({v} bytes)\n", human_size(v));
    }
    if let Some(m) = &i.map {
        s += &format!(
            "map: {} calls, {}; data {} B, zero {} B, unallocated {} B\n",
            m.calls,
            if m.complete { "complete" } else { "incomplete" },
            m.data_bytes,
            m.zero_bytes,
            m.unallocated_bytes
        );
    }
    s += &format!("verdict: {}\n", if i.safe { "safe" } else { "UNSAFE" });
    for f in &i.findings {
        let class = if f.kind.is_unsafe() { "unsafe" } else { "info" };
        s += &format!("[{class}] {:?}: {}\n", f.kind, f.detail);
    }
    s
}

/// qemu-img's non-terminal progress line, rewritten in place.
fn print_progress(done: u64, total: u64) {
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    eprint!("\r    ({pct:.2}/100%)");
}

fn print_option_help(format: Format) {
    println!("Supported options for {format}:");
    for o in format.create_options() {
        println!("  {:<24} <{}>  {}", o.name, o.kind, o.help);
    }
}

/// Disk space the file really uses (blocks allocated), like qemu-img's actual-size.
fn actual_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn info_json(path: &Path, info: &ImageInfo) -> serde_json::Value {
    let file_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let child = serde_json::json!({
        "children": [],
        "virtual-size": file_len,
        "filename": path.display().to_string(),
        "format": "file",
        "actual-size": actual_size(path),
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": false,
    });
    let mut v = serde_json::json!({
        "children": [{"name": "file", "info": child}],
        "virtual-size": info.virtual_size,
        "filename": path.display().to_string(),
    });
    let m = v.as_object_mut().expect("object");
    if let Some(c) = info.cluster_size {
        m.insert("cluster-size".into(), c.into());
    }
    m.insert("format".into(), info.format.clone().into());
    m.insert("actual-size".into(), actual_size(path).into());
    if let Some(b) = &info.backing_file {
        m.insert("backing-filename".into(), b.clone().into());
    }
    if let Some(b) = &info.backing_format {
        m.insert("backing-filename-format".into(), b.clone().into());
    }
    if let Some(fs) = &info.format_specific {
        m.insert("format-specific".into(), fs.clone());
    }
    m.insert("dirty-flag".into(), info.dirty.unwrap_or(false).into());
    v
}

/// Sizes the way qemu-img prints them: "1 GiB", "2.44 GiB", "512 B".
fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

fn info_human(path: &Path, info: &ImageInfo) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        path.display(),
        info.format,
        human_size(info.virtual_size),
        info.virtual_size,
        human_size(actual_size(path))
    );
    if let Some(c) = info.cluster_size {
        s += &format!("cluster_size: {c}\n");
    }
    if let Some(b) = &info.backing_file {
        s += &format!("backing file: {b}\n");
    }
    if let Some(b) = &info.backing_format {
        s += &format!("backing file format: {b}\n");
    }
    if info.dirty == Some(true) {
        s += "dirty flag: true\n";
    }
    if let Some(data) = info.format_specific.as_ref().and_then(|f| f.get("data")) {
        s += "Format specific information:\n";
        human_value(&mut s, data, 1);
    }
    let file_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    s += &format!(
        "Child node '/file':\n    filename: {}\n    protocol type: file\n    file length: {} ({file_len} bytes)\n    disk size: {}\n",
        path.display(),
        human_size(file_len),
        human_size(actual_size(path))
    );
    for w in &info.warnings {
        s += &format!("warning: {w}\n");
    }
    s
}

fn human_value(out: &mut String, v: &serde_json::Value, depth: usize) {
    let pad = "    ".repeat(depth);
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m {
                let key = k.replace('-', " ");
                if val.is_object() || val.is_array() {
                    out.push_str(&format!("{pad}{key}:\n"));
                    human_value(out, val, depth + 1);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(val)));
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                out.push_str(&format!("{pad}[{i}]:\n"));
                human_value(out, val, depth + 1);
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(104857600), "100 MiB");
        assert_eq!(human_size(2621440000), "2.44 GiB");
    }
}
