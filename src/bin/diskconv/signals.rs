//! Termination signals: an interrupted conversion leaves no partial output behind and the
//! process still dies of the signal, so its parent sees it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// An interrupted conversion must leave nothing behind: on SIGINT/SIGTERM/SIGHUP remove
/// this process's temporary output files (wherever a symlinked DST put them), then die of
/// the same signal, as qemu-img does (it has no handler), so a parent sees the signal (a
/// shell reports 130 for SIGINT, 143 for SIGTERM).
/// A stream (stdout, a FIFO, a character device) has nothing to remove: its reader is
/// told the image it got is incomplete.
pub fn remove_temp_on_interrupt(dst: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let stream = dst == Path::new("-")
        || std::fs::metadata(dst).is_ok_and(|m| {
            let t = m.file_type();
            t.is_fifo() || t.is_char_device()
        });
    let shown = dst.display().to_string();
    on_termination_signal(move || {
        #[cfg(feature = "remote")]
        diskconv::remote::abort_uploads();
        #[cfg(feature = "remote")]
        diskconv::remote::abort_glance_uploads();
        diskconv::writer::remove_temporaries();
        if stream {
            eprintln!("\ndiskconv: interrupted; the image sent to {shown} is incomplete");
        } else {
            eprintln!("\ndiskconv: interrupted; partial output removed");
        }
    });
}

/// Whether the process is being terminated by a signal (its cleanup is under way).
pub fn signalled() -> bool {
    SIGNALLED.load(Ordering::SeqCst)
}

/// Write end of the pipe the signal handler reports on (-1 until installed).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// Set by the signal handler: the process is being terminated by a signal.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_signal(sig: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
    // Only async-signal-safe work here: one write(2); the thread below does the rest.
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: writing one byte from a valid local to a pipe fd we own.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// Run `cleanup` on a thread when SIGINT, SIGTERM or SIGHUP arrives, then terminate the
/// process by that signal (default action restored and the signal raised again).
fn on_termination_signal(cleanup: impl FnOnce() + Send + 'static) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe(2) fills the two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    for sig in signals {
        // SAFETY: installing a handler that only calls write(2).
        unsafe { libc::signal(sig, note_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte into a valid buffer from the pipe's read end.
        let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
        if n != 1 {
            return;
        }
        let sig = libc::c_int::from(b[0]);
        cleanup();
        // SAFETY: restoring the default action and raising the signal ends the process.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    });
}
