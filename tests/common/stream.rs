//! Helpers the planned-stream tests share: one conversion through a real FIFO.

use std::path::Path;

use diskconv::formats::create_planned_writer;
use diskconv::writer::AllocationPlan;
use diskconv::{convert_device, BlockDevice, ConvertOptions, Format};

use super::{hang_guard, run, s};

/// Convert `src` with `o` into the planned (sequential) writer of `format` through a FIFO
/// that a thread drains into `dst`; returns (predicted length, bytes that came out). The
/// stream sink refuses a backward write, so a writer that seeks fails here.
pub fn planned_through_fifo(
    format: Format,
    src: &dyn BlockDevice,
    o: &ConvertOptions,
    plan: &AllocationPlan,
    dst: &Path,
) -> (u64, u64) {
    let _guard = hang_guard("streaming a planned output into a FIFO");
    let fifo = dst.with_extension("fifo");
    let _ = std::fs::remove_file(&fifo);
    run(&["mkfifo", s(&fifo)]);
    let (f2, d2) = (fifo.clone(), dst.to_path_buf());
    let drain = std::thread::spawn(move || {
        let mut r = std::fs::File::open(&f2).unwrap();
        let mut w = std::fs::File::create(&d2).unwrap();
        std::io::copy(&mut r, &mut w).unwrap()
    });
    let (out, sink) = diskconv::Output::open(&fifo, &Default::default()).unwrap();
    assert_eq!(out.kind(), diskconv::OutputKind::Stream);
    let w = create_planned_writer(format, sink, &fifo, &o.create, plan).unwrap();
    assert!(w.streams(), "the planned {format} writer streams");
    let predicted = w
        .output_len()
        .unwrap_or_else(|| panic!("a planned {format} output knows its length"));
    convert_device(src, w, o).unwrap();
    out.finish(false).unwrap();
    let n = drain.join().unwrap();
    std::fs::remove_file(&fifo).unwrap();
    (predicted, n)
}
