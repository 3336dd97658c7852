//! `snapshot -l` and the snapshot lists of `info`: an image's internal snapshots as
//! qemu-img prints them; `snapshot -c/-d/-a`: making, deleting and applying them in place.
//! Converting a snapshot's contents is `convert` with the open option `snapshot.id` or
//! `snapshot.name` (see [`crate::OpenOptions::option`]).

use std::path::Path;

use crate::device::{SnapshotInfo, SnapshotOp};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::formats::open_editor;
use crate::options::OpenOptions;

/// Create, delete or apply an internal snapshot of the image at `path`, of `format`
/// (probed when None), in place, as `qemu-img snapshot -c/-d/-a` does; errors carry
/// qemu-img's words ("Could not delete snapshot 'x': snapshot not found"). The image reads
/// as before or as after whatever write fails. `fail_at_write` is the test hook of
/// [`ResizeOptions::fail_at_write`](crate::options::ResizeOptions::fail_at_write).
pub fn snapshot_edit(
    path: &Path,
    format: Option<Format>,
    op: &SnapshotOp<'_>,
    fail_at_write: Option<u64>,
) -> Result<()> {
    let what = match op {
        SnapshotOp::Create(n) => format!("Could not create snapshot '{n}'"),
        SnapshotOp::Delete(s) => format!("Could not delete snapshot '{}'", s.text()),
        SnapshotOp::Apply(s) => format!("Could not apply snapshot '{}'", s.text()),
    };
    let (format, file, opts) = super::open_for_edit(path, format, fail_at_write)?;
    let mut editor = open_editor(format, file, path, &opts).map_err(|e| e.context(&what))?;
    editor.snapshot(op).map_err(|e| {
        // A format without internal snapshots: qemu-img's words, then which format.
        let e = if format != Format::Qcow2 && e.kind() == crate::ErrorKind::Unsupported {
            Error::unsupported(format!(
                "{what}: {} ({} images have no internal snapshots; qcow2 images do)",
                e.message(),
                format.name()
            ))
        } else {
            e.context(what)
        };
        e.with_path(path)
    })
}

/// The internal snapshots of the image at `path` (none for formats without them).
/// Backing images are not opened: the list is the image's own.
pub fn snapshots(path: &Path, opts: &OpenOptions) -> Result<Vec<SnapshotInfo>> {
    let dev = super::open_source(path, &opts.clone().without_backing())?;
    Ok(dev.info().snapshots)
}

/// qemu's `size_to_str`: three significant digits and a binary unit ("0 B", "1.5 KiB").
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp's exponent of val*1024/1000, minus one, over ten: the unit.
    let x = val as f64 / (1000.0 / 1024.0);
    let exp = if x == 0.0 {
        0
    } else {
        x.log2().floor() as i64 + 1
    };
    let i = (((exp - 1) / 10).max(0) as usize).min(SUFFIXES.len() - 1);
    let v = val as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", g3(v), SUFFIXES[i])
}

/// C's `%0.3g` for 0 <= v < 1000.
fn g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let mut x = v.log10().floor() as i32;
    // Rounding to three digits can carry into a new digit (999.7 -> 1e+03 never occurs
    // here: values stay below 1000 by the unit choice, but 9.996 -> 10.0).
    let r = |x: i32| format!("{:.*}", (2 - x).max(0) as usize, v);
    let mut s = r(x);
    if s.trim_start_matches('0').trim_start_matches('.').len() > 4 && x < 2 {
        x += 1;
        s = r(x);
    }
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    s
}

/// Seconds since the epoch as local time, `YYYY-MM-DD HH:MM:SS` (qemu prints local time).
fn local_date(sec: u32) -> String {
    let t = libc::time_t::from(sec);
    // SAFETY: localtime_r writes only into the zeroed struct we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return sec.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// qemu's `bdrv_snapshot_dump`: the header row for None, else one snapshot's row.
pub fn snapshot_row(sn: Option<&SnapshotInfo>) -> String {
    let Some(sn) = sn else {
        return format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
    };
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (sn.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = sn.icount.map_or("--".to_string(), |i| i.to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        sn.id,
        sn.name,
        size_to_str(sn.vm_state_size),
        local_date(sn.date_sec),
        clock,
        icount
    )
}

/// `Snapshot list:` and the table, as `qemu-img snapshot -l` and `info` print it (empty
/// when there are no snapshots, as qemu-img prints nothing then).
pub fn snapshot_table(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut s = format!("Snapshot list:\n{}\n", snapshot_row(None));
    for sn in list {
        s += &snapshot_row(Some(sn));
        s.push('\n');
    }
    s
}

/// The `snapshots` array of `qemu-img info --output=json`.
pub fn snapshots_json(list: &[SnapshotInfo]) -> serde_json::Value {
    list.iter()
        .map(|sn| {
            let mut m = serde_json::Map::new();
            if let Some(i) = sn.icount {
                m.insert("icount".into(), i.into());
            }
            m.insert(
                "vm-clock-nsec".into(),
                (sn.vm_clock_nsec % 1_000_000_000).into(),
            );
            m.insert("name".into(), sn.name.clone().into());
            m.insert("date-sec".into(), sn.date_sec.into());
            m.insert("date-nsec".into(), sn.date_nsec.into());
            m.insert(
                "vm-clock-sec".into(),
                (sn.vm_clock_nsec / 1_000_000_000).into(),
            );
            m.insert("id".into(), sn.id.clone().into());
            m.insert("vm-state-size".into(), sn.vm_state_size.into());
            serde_json::Value::Object(m)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_prints_them() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(10 * (1 << 20) - 1), "10 MiB");
    }
}
