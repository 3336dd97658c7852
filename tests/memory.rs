//! Peak memory of whole conversions, measured on the CLI in a child process (its own test
//! binary, so no other test's children share the RUSAGE_CHILDREN maximum).
mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::process::Command;

fn child_peak_rss_kib() -> i64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we pass.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) },
        0
    );
    ru.ru_maxrss
}

#[test]
fn converting_a_100_gib_mostly_empty_image_stays_under_64_mib() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(100 << 30).unwrap();
    let mut rng = Rng(5);
    let mut chunk = vec![0u8; 4 << 20];
    rng.fill(&mut chunk);
    // 64 MiB of data spread over the 100 GiB.
    for i in 0..16u64 {
        f.write_all_at(&chunk, i * (6 << 30) + 12345 * 512).unwrap();
    }
    drop(f);
    let bin = env!("CARGO_BIN_EXE_diskconv");
    for fmt in ["raw", "qcow2", "vpc", "vmdk", "vdi"] {
        let dst = dir.path().join(format!("out.{fmt}"));
        let out = Command::new(bin)
            .args(["convert", "-O", fmt, s(&src), s(&dst)])
            .output()
            .unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            // Only a format not yet writable may fail.
            assert!(err.contains("not supported yet"), "{fmt}: {err}");
            continue;
        }
        let peak = child_peak_rss_kib();
        assert!(
            peak < 64 * 1024,
            "peak RSS {peak} KiB after converting to {fmt}"
        );
        let dev = diskconv::open(&dst, &diskconv::OpenOptions::new()).unwrap();
        assert_eq!(dev.virtual_size(), 100 << 30);
        let mut b = vec![0u8; 4 << 20];
        dev.read_at(&mut b, 6 * (6 << 30) + 12345 * 512).unwrap();
        assert!(b == chunk, "{fmt}: data chunk differs");
        std::fs::remove_file(&dst).unwrap();
    }
}

/// Every compressed pair (zlib and zstd qcow2, streamOptimized vmdk, both directions, and
/// inputs qemu-img compressed) stays under 64 MiB, at the default thread count and at 8
/// workers, whose units in flight are the memory that grows with the pool.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img (apt-get install qemu-utils)")]
fn compressed_pairs_stay_under_64_mib() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mixed.raw");
    // 96 MiB of text-like runs (compressible), random runs (stored as they are) and holes.
    make_raw(&src, 96 << 20, 19);
    let p = |n: &str| dir.path().join(n);
    let made_by_qemu: [(&[&str], &str); 3] = [
        (&["-O", "qcow2", "-c"], "q-zlib.qcow2"),
        (
            &["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
            "q-zstd.qcow2",
        ),
        (
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
            "q-stream.vmdk",
        ),
    ];
    for (args, name) in made_by_qemu {
        let out = p(name);
        let mut a = vec!["convert", "-f", "raw"];
        a.extend_from_slice(args);
        a.extend([s(&src), s(&out)]);
        qemu_img(&a);
    }
    let bin = env!("CARGO_BIN_EXE_diskconv");
    let src_sha = sha256_file(&src);
    let pairs: &[(&str, &[&str], &str)] = &[
        ("mixed.raw", &["-O", "qcow2", "-c"], "zlib.qcow2"),
        (
            "mixed.raw",
            &["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
            "zstd.qcow2",
        ),
        (
            "mixed.raw",
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
            "stream.vmdk",
        ),
        ("q-zlib.qcow2", &["-O", "raw"], "zlib.raw"),
        ("q-zstd.qcow2", &["-O", "raw"], "zstd.raw"),
        ("q-stream.vmdk", &["-O", "raw"], "stream.raw"),
        ("q-stream.vmdk", &["-O", "qcow2", "-c"], "restream.qcow2"),
    ];
    for threads in ["0", "8"] {
        for (input, args, output) in pairs {
            let dst = p(output);
            let out = Command::new(bin)
                .args(["convert", "-m", threads])
                .args(*args)
                .args([s(&p(input)), s(&dst)])
                .output()
                .unwrap();
            assert!(out.status.success(), "{input} {args:?}: {out:?}");
            let peak = child_peak_rss_kib();
            eprintln!("{input} {args:?} -m {threads}: peak so far {peak} KiB");
            assert!(
                peak < 64 * 1024,
                "peak RSS {peak} KiB after {input} {args:?} -m {threads}"
            );
            let back = p("back.raw");
            qemu_img(&["convert", "-O", "raw", s(&dst), s(&back)]);
            assert_eq!(sha256_file(&back), src_sha, "{input} {args:?}: content");
            if output.ends_with(".qcow2") || output.ends_with(".vmdk") {
                qemu_img(&["check", s(&dst)]);
            }
            std::fs::remove_file(&dst).unwrap();
        }
    }
}
