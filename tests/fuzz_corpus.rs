//! Replays every fuzz corpus seed (fuzz/corpus/<target>/) and every crash regression
//! (fuzz/artifacts/<target>/) through the fuzz targets' own entry point, so CI guards
//! them without a fuzzer. The folder name picks the target: probe, raw, qcow2, vhd, vmdk,
//! vdi.

use std::path::{Path, PathBuf};

use diskconv::Format;

fn target_format(name: &str) -> Option<Option<Format>> {
    match name {
        "probe" => Some(None),
        other => Format::from_name(other).ok().map(Some),
    }
}

fn inputs(root: &Path) -> Vec<(Option<Format>, PathBuf)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root) else {
        return out;
    };
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let Some(fmt) = target_format(&name) else {
            continue;
        };
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            if f.file_type().is_ok_and(|t| t.is_file()) {
                out.push((fmt, f.path()));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

#[test]
fn every_fuzz_input_replays_without_panicking() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut all = inputs(&fuzz.join("corpus"));
    let seeds = all.len();
    all.extend(inputs(&fuzz.join("artifacts")));
    assert!(
        seeds > 0,
        "no seeds under {}",
        fuzz.join("corpus").display()
    );
    let mut failed = Vec::new();
    for (fmt, path) in &all {
        let data = std::fs::read(path).unwrap();
        // Every input also goes through the probe target: the probe and inspect must
        // cope with whatever a format's corpus holds.
        for f in [*fmt, None] {
            let r = std::panic::catch_unwind(|| diskconv::fuzzing::exercise(&data, f));
            if r.is_err() {
                failed.push(format!("{} (as {:?})", path.display(), f));
            }
        }
    }
    assert!(failed.is_empty(), "panicked on: {failed:#?}");
    eprintln!("replayed {} inputs ({seeds} seeds)", all.len());
}
