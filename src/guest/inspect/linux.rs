//! A Linux root: what its release files, hostname, fstab and package database say.
//! Every file is read with a size cap; one that is missing or unreadable leaves its
//! field empty with a note, never a guess.

use super::{elf, Application, Mountpoint, OsReport};
use crate::guest::files::FileSystem;

/// The most read of a small configuration file (os-release, fstab, hostname).
const SMALL: u64 = 1 << 20;
/// The most read of a package database (dpkg's status of a large desktop is ~10 MiB).
const PACKAGE_DB: u64 = 64 << 20;
/// The most packages listed.
const MAX_APPS: usize = 100_000;

const RELEASE_FILES: &[&str] = &[
    "/etc/os-release",
    "/usr/lib/os-release",
    "/etc/redhat-release",
    "/etc/debian_version",
    "/etc/alpine-release",
    "/etc/SuSE-release",
    "/etc/arch-release",
];

/// System binaries whose ELF header names the architecture, tried in turn.
const BINARIES: &[&str] = &[
    "/bin/sh",
    "/usr/bin/sh",
    "/bin/ls",
    "/usr/bin/ls",
    "/bin/busybox",
    "/bin/bash",
    "/usr/bin/bash",
    "/sbin/init",
    "/usr/bin/true",
    "/bin/true",
];

fn exists(fs: &dyn FileSystem, path: &str) -> bool {
    fs.exists(path).unwrap_or(false)
}

/// True when `fs` looks like a Linux root: an /etc with a release file, or with an
/// fstab beside a /bin.
pub fn is_root(fs: &dyn FileSystem) -> bool {
    if !exists(fs, "/etc") {
        return false;
    }
    RELEASE_FILES.iter().any(|p| exists(fs, p))
        || (exists(fs, "/etc/fstab") && (exists(fs, "/bin") || exists(fs, "/usr/bin")))
}

/// Read a small text file; `None` when it is absent, a note when it cannot be read.
fn text(fs: &dyn FileSystem, path: &str, limit: u64, notes: &mut Vec<String>) -> Option<String> {
    match fs.exists(path) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            notes.push(format!("{path}: {e}"));
            return None;
        }
    }
    match fs.read_file(path, limit) {
        Ok(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Err(e) => {
            notes.push(format!("{path}: {e}"));
            None
        }
    }
}

/// The value of a shell-style assignment as os-release writes it: quotes removed,
/// backslash escapes inside double quotes undone.
fn unquote(v: &str) -> String {
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
        return inner.to_string();
    }
    let Some(inner) = v.strip_prefix('"').and_then(|x| x.strip_suffix('"')) else {
        return v.to_string();
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The KEY=value pairs of an os-release file.
pub fn parse_os_release(s: &str) -> Vec<(String, String)> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), unquote(v)))
        .collect()
}

/// libguestfs's distro name for an os-release `ID` (and `ID_LIKE` when the ID is
/// not one it knows).
fn distro_of_id(id: &str) -> Option<&'static str> {
    Some(match id {
        "debian" => "debian",
        "ubuntu" => "ubuntu",
        "rhel" => "rhel",
        "centos" => "centos",
        "rocky" => "rocky",
        "almalinux" => "almalinux",
        "fedora" => "fedora",
        "ol" => "oraclelinux",
        "opensuse" | "opensuse-leap" | "opensuse-tumbleweed" | "opensuse-microos" => "opensuse",
        "sles" | "sled" => "sles",
        "alpine" => "alpinelinux",
        "arch" => "archlinux",
        "linuxmint" => "linuxmint",
        "kali" => "kalilinux",
        "gentoo" => "gentoo",
        "void" => "voidlinux",
        "altlinux" => "altlinux",
        "mageia" => "mageia",
        "scientific" => "scientificlinux",
        "cirros" => "cirros",
        "amzn" => "amazonlinux",
        _ => return None,
    })
}

/// Major and minor of a version text: "22.04" -> (22, 4), "3.19.1" -> (3, 19), "12" -> (12, 0).
pub fn split_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

fn set_version(os: &mut OsReport, v: &str) {
    if let Some((a, b)) = split_version(v) {
        os.major_version = a;
        os.minor_version = b;
        os.version = Some(v.trim().to_string());
    }
}

fn from_os_release(os: &mut OsReport, text: &str) {
    let kv = parse_os_release(text);
    let get = |k: &str| {
        kv.iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let id = get("ID").unwrap_or("").to_ascii_lowercase();
    let distro = distro_of_id(&id).or_else(|| {
        get("ID_LIKE")?
            .split_whitespace()
            .find_map(|l| distro_of_id(&l.to_ascii_lowercase()))
    });
    os.distro = distro.unwrap_or("unknown").to_string();
    os.product_name = get("PRETTY_NAME").or(get("NAME")).map(str::to_string);
    if let Some(v) = get("VERSION_ID") {
        set_version(os, v);
    }
}

/// "CentOS Linux release 7.9.2009 (Core)", "Red Hat Enterprise Linux Server release 6.10
/// (Santiago)", "Fedora release 20 (Heisenbug)".
fn from_redhat_release(os: &mut OsReport, line: &str) {
    let line = line.lines().next().unwrap_or("").trim();
    os.product_name = Some(line.to_string());
    let lower = line.to_ascii_lowercase();
    os.distro = if lower.starts_with("red hat enterprise linux") {
        "rhel"
    } else if lower.starts_with("centos") {
        "centos"
    } else if lower.starts_with("fedora") {
        "fedora"
    } else if lower.starts_with("rocky") {
        "rocky"
    } else if lower.starts_with("almalinux") {
        "almalinux"
    } else if lower.starts_with("oracle") {
        "oraclelinux"
    } else if lower.starts_with("scientific") {
        "scientificlinux"
    } else {
        "redhat-based"
    }
    .to_string();
    if let Some(v) = line
        .split(" release ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
    {
        set_version(os, v);
    }
}

/// Distro, product and version from the release files, os-release first.
fn release(fs: &dyn FileSystem, os: &mut OsReport) {
    let notes = &mut os.notes;
    let osr = text(fs, "/etc/os-release", SMALL, notes)
        .or_else(|| text(fs, "/usr/lib/os-release", SMALL, notes));
    let redhat = text(fs, "/etc/redhat-release", SMALL, notes);
    let debian = text(fs, "/etc/debian_version", SMALL, notes);
    let alpine = text(fs, "/etc/alpine-release", SMALL, notes);
    os.distro = "unknown".into();
    if let Some(t) = &osr {
        from_os_release(os, t);
    } else if let Some(t) = &redhat {
        from_redhat_release(os, t);
    } else if let Some(t) = &alpine {
        os.distro = "alpinelinux".into();
        set_version(os, t.trim());
    } else if let Some(t) = &debian {
        os.distro = "debian".into();
        set_version(os, t.trim());
    } else if exists(fs, "/etc/arch-release") {
        os.distro = "archlinux".into();
    }
    // Debian's os-release carries only the major version; debian_version has the point
    // release ("12.5"), as libguestfs reads it.
    if os.distro == "debian" {
        if let Some(v) = debian.as_deref().map(str::trim) {
            if let Some((a, b)) = split_version(v).filter(|&(a, _)| a == os.major_version) {
                os.major_version = a;
                os.minor_version = b;
            }
        }
    }
}

/// The package format and manager: the format from the database present, the manager
/// from the distro (dnf or yum by release).
fn packaging(fs: &dyn FileSystem, os: &mut OsReport) {
    let format = if exists(fs, "/var/lib/dpkg/status") {
        Some("deb")
    } else if exists(fs, "/lib/apk/db/installed") {
        Some("apk")
    } else if exists(fs, "/var/lib/rpm") || exists(fs, "/usr/lib/sysimage/rpm") {
        Some("rpm")
    } else if exists(fs, "/var/lib/pacman") {
        Some("pacman")
    } else {
        None
    };
    let legacy = os.major_version < 8;
    let manager = match (format, os.distro.as_str()) {
        (Some("deb"), _) => Some("apt"),
        (Some("apk"), _) => Some("apk"),
        (Some("pacman"), _) => Some("pacman"),
        (Some("rpm"), "opensuse" | "sles") => Some("zypper"),
        (Some("rpm"), "fedora") => Some(if os.major_version < 22 { "yum" } else { "dnf" }),
        (Some("rpm"), "rhel" | "centos" | "oraclelinux" | "scientificlinux") if legacy => {
            Some("yum")
        }
        (Some("rpm"), _) => Some("dnf"),
        _ => None,
    };
    os.package_format = format.map(str::to_string);
    os.package_manager = manager.map(str::to_string);
}

/// dpkg's status file: the packages whose Status ends in "installed".
pub fn parse_dpkg_status(s: &str) -> Vec<Application> {
    let mut out = Vec::new();
    for para in s.split("\n\n") {
        let field = |k: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_string())
        };
        let installed = field("Status").is_some_and(|s| s.ends_with(" installed"));
        if let (true, Some(name), Some(version)) = (installed, field("Package"), field("Version")) {
            out.push(Application {
                name,
                version,
                arch: field("Architecture"),
            });
        }
        if out.len() >= MAX_APPS {
            break;
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// apk's installed database: `P:` name, `V:` version, `A:` arch, one blank line apart.
pub fn parse_apk_installed(s: &str) -> Vec<Application> {
    let mut out = Vec::new();
    for para in s.split("\n\n") {
        let field = |k: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::to_string)
        };
        if let (Some(name), Some(version)) = (field("P:"), field("V:")) {
            out.push(Application {
                name,
                version,
                arch: field("A:"),
            });
        }
        if out.len() >= MAX_APPS {
            break;
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The fstab lines that mount a filesystem at a path.
pub fn parse_fstab(s: &str) -> Vec<Mountpoint> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[1].starts_with('/') && f[2] != "swap").then(|| Mountpoint {
                path: f[1].replace("\\040", " "),
                spec: f[0].to_string(),
                fs_type: f[2].to_string(),
                volume: None,
            })
        })
        .collect()
}

/// "vg/lv" for /dev/mapper/VG-LV (a dash in a name doubled) or /dev/VG/LV.
pub fn lv_name(spec: &str) -> Option<String> {
    if let Some(m) = spec.strip_prefix("/dev/mapper/") {
        // Split at the first single dash: "--" is an escaped dash inside a name.
        let b = m.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'-' {
                if b.get(i + 1) == Some(&b'-') {
                    i += 2;
                    continue;
                }
                let (vg, lv) = (&m[..i], &m[i + 1..]);
                return Some(format!(
                    "{}/{}",
                    vg.replace("--", "-"),
                    lv.replace("--", "-")
                ));
            }
            i += 1;
        }
        return None;
    }
    let rest = spec.strip_prefix("/dev/")?;
    let (vg, lv) = rest.split_once('/')?;
    (!lv.contains('/') && !matches!(vg, "disk" | "mapper")).then(|| format!("{vg}/{lv}"))
}

/// The partition number of a disk device name: /dev/sda2, /dev/vda1, /dev/xvda3,
/// /dev/hda1, /dev/nvme0n1p2, /dev/mmcblk0p1 -> 2, 1, 3, 1, 2, 1.
pub fn partition_number(spec: &str) -> Option<u32> {
    let dev = spec.strip_prefix("/dev/")?;
    let digits_at = dev.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (head, num) = dev.split_at(digits_at);
    let n = num.parse().ok()?;
    let plain = ["sd", "vd", "xvd", "hd"].iter().any(|p| {
        head.strip_prefix(p)
            .is_some_and(|r| r.len() == 1 && r.chars().all(|c| c.is_ascii_lowercase()))
    });
    let numbered = (head.starts_with("nvme") || head.starts_with("mmcblk")) && head.ends_with('p');
    (plain || numbered).then_some(n)
}

fn hostname(fs: &dyn FileSystem, notes: &mut Vec<String>) -> Option<String> {
    if let Some(t) = text(fs, "/etc/hostname", SMALL, notes) {
        let h = t
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'));
        if let Some(h) = h {
            return Some(h.to_string());
        }
    }
    let t = text(fs, "/etc/sysconfig/network", SMALL, notes)?;
    parse_os_release(&t)
        .into_iter()
        .find(|(k, _)| k == "HOSTNAME")
        .map(|(_, v)| v)
}

fn architecture(fs: &dyn FileSystem, notes: &mut Vec<String>) -> Option<String> {
    for b in BINARIES {
        if !exists(fs, b) {
            continue;
        }
        match fs.read_prefix(b, 64) {
            Ok(head) => match elf::arch(&head) {
                Some(a) => return Some(a.to_string()),
                None => notes.push(format!("{b} is not an ELF binary this reader knows")),
            },
            Err(e) => notes.push(format!("{b}: {e}")),
        }
    }
    None
}

/// Inspect the Linux root on `fs` (its `root` and `firmware` are the caller's).
pub fn inspect(fs: &dyn FileSystem) -> OsReport {
    let mut os = OsReport {
        os_type: "linux".into(),
        ..Default::default()
    };
    release(fs, &mut os);
    os.arch = architecture(fs, &mut os.notes);
    os.hostname = hostname(fs, &mut os.notes);
    packaging(fs, &mut os);
    if let Some(t) = text(fs, "/etc/fstab", SMALL, &mut os.notes) {
        os.mountpoints = parse_fstab(&t);
    }
    os.applications = match os.package_format.as_deref() {
        Some("deb") => text(fs, "/var/lib/dpkg/status", PACKAGE_DB, &mut os.notes)
            .map(|t| parse_dpkg_status(&t))
            .unwrap_or_default(),
        Some("apk") => text(fs, "/lib/apk/db/installed", PACKAGE_DB, &mut os.notes)
            .map(|t| parse_apk_installed(&t))
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    os.osinfo = super::glance::osinfo_id(&os);
    os
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quotes_and_versions() {
        let kv =
            parse_os_release("NAME=\"Ubuntu\"\n# c\nVERSION_ID=\"22.04\"\nX='a b'\nY=\"q\\\"x\"\n");
        assert_eq!(kv[1], ("VERSION_ID".into(), "22.04".into()));
        assert_eq!(kv[2].1, "a b");
        assert_eq!(kv[3].1, "q\"x");
        assert_eq!(split_version("22.04"), Some((22, 4)));
        assert_eq!(split_version("3.19.1"), Some((3, 19)));
        assert_eq!(split_version("12"), Some((12, 0)));
        assert_eq!(split_version("bookworm/sid"), None);
    }

    #[test]
    fn redhat_release_lines() {
        let mut os = OsReport::default();
        from_redhat_release(&mut os, "CentOS Linux release 7.9.2009 (Core)\n");
        assert_eq!(
            (os.distro.as_str(), os.major_version, os.minor_version),
            ("centos", 7, 9)
        );
        from_redhat_release(
            &mut os,
            "Red Hat Enterprise Linux Server release 6.10 (Santiago)",
        );
        assert_eq!(
            (os.distro.as_str(), os.major_version, os.minor_version),
            ("rhel", 6, 10)
        );
    }

    #[test]
    fn device_names() {
        assert_eq!(
            lv_name("/dev/mapper/vg--a-root").as_deref(),
            Some("vg-a/root")
        );
        assert_eq!(lv_name("/dev/vg0/home").as_deref(), Some("vg0/home"));
        assert_eq!(lv_name("/dev/disk/by-uuid/x"), None);
        assert_eq!(partition_number("/dev/sda2"), Some(2));
        assert_eq!(partition_number("/dev/nvme0n1p3"), Some(3));
        assert_eq!(partition_number("/dev/xvda1"), Some(1));
        assert_eq!(partition_number("/dev/nvme0n1"), None);
        assert_eq!(partition_number("/dev/sr0"), None);
    }

    #[test]
    fn fstab_and_package_databases() {
        let f = parse_fstab("# x\nUUID=ab / ext4 defaults 0 1\n/dev/sda2 none swap sw 0 0\nproc /proc proc defaults 0 0\n");
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].path.as_str(), f[0].spec.as_str()), ("/", "UUID=ab"));
        let d = parse_dpkg_status("Package: b\nStatus: install ok installed\nVersion: 1\nArchitecture: amd64\n\nPackage: a\nStatus: deinstall ok config-files\nVersion: 2\n");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].arch.as_deref(), Some("amd64"));
        let a = parse_apk_installed("C:x\nP:musl\nV:1.2.4-r2\nA:x86_64\n\nP:busybox\nV:1.36\n");
        assert_eq!(a[0].name, "busybox");
        assert_eq!(a[1].version, "1.2.4-r2");
    }
}
