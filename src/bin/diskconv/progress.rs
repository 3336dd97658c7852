//! `convert -p`: a bar on a terminal, otherwise qemu-img's `(x.xx/100%)` lines.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the engine calls with (bytes done, bytes in all): a bar when the progress goes to a
/// terminal (`tty`), else qemu-img's lines; on stderr when stdout carries the image.
pub fn reporter(tty: bool, to_stderr: bool) -> Box<dyn Fn(u64, u64) + Sync> {
    if tty {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(100),
            if to_stderr {
                indicatif::ProgressDrawTarget::stderr()
            } else {
                indicatif::ProgressDrawTarget::stdout()
            },
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {percent:>3}% {elapsed_precise}")
                .expect("static template"),
        );
        Box::new(move |done: u64, total: u64| {
            bar.set_position(done.saturating_mul(100).checked_div(total).unwrap_or(100))
        })
    } else {
        // Like qemu-img: a new line of figures only after another 1% or at the end.
        let last = AtomicU64::new(u64::MAX);
        Box::new(move |done: u64, total: u64| {
            let hundredths = done
                .saturating_mul(10_000)
                .checked_div(total)
                .unwrap_or(10_000);
            let prev = last.load(Ordering::Relaxed);
            if prev == u64::MAX || hundredths >= prev + 100 || (done == total && hundredths != prev)
            {
                last.store(hundredths, Ordering::Relaxed);
                print_progress(done, total, to_stderr);
            }
        })
    }
}

/// qemu-img's non-terminal progress line on stdout (stderr when stdout carries the image),
/// rewritten in place.
fn print_progress(done: u64, total: u64, to_stderr: bool) {
    use std::io::Write;
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let line = format!("    ({pct:.2}/100%)\r");
    if to_stderr {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }
}
