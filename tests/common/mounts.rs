//! Unmounting the filesystems the guest filesystem tests mount (shared by
//! `guestfs.rs` and `guestfs_nx.rs`).

use std::path::Path;
use std::process::Command;

/// Unmount `mnt`, retrying while the kernel says it is busy: a FUSE daemon (exfat-fuse,
/// ntfs-3g) or a just-closed file can hold it for a moment after the writes return.
/// Then wait until it is gone from /proc/mounts, so the image is quiet when read.
pub fn umount_retry(mnt: &Path) {
    let m = mnt.to_str().unwrap();
    let mut last = String::new();
    for _ in 0..40 {
        let out = Command::new("umount").arg(m).output().unwrap();
        if out.status.success() {
            for _ in 0..40 {
                let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
                if !mounts.lines().any(|l| l.split(' ').nth(1) == Some(m)) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            panic!("{m} still mounted after umount");
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !last.contains("busy") {
            break;
        }
        let _ = Command::new("sync").status();
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!("umount {m} failed: {last}");
}
