//! Glance's common image properties from an inspection: `os_type`, `os_distro`,
//! `os_version`, `architecture`, `hw_firmware_type`, with `os_distro` from the
//! libosinfo vocabulary Glance documents for it.

use super::{GuestInspection, OsReport};

/// The libosinfo distro name (Glance's `os_distro`) for a libguestfs distro name.
fn osinfo_distro(distro: &str) -> Option<&'static str> {
    Some(match distro {
        "debian" => "debian",
        "ubuntu" => "ubuntu",
        "rhel" => "rhel",
        "centos" => "centos",
        "rocky" => "rocky",
        "almalinux" => "almalinux",
        "fedora" => "fedora",
        "opensuse" => "opensuse",
        "sles" => "sles",
        "alpinelinux" => "alpinelinux",
        "archlinux" => "arch",
        "oraclelinux" => "ol",
        "gentoo" => "gentoo",
        "mageia" => "mageia",
        "cirros" => "cirros",
        "windows" => "windows",
        "freebsd" => "freebsd",
        _ => return None,
    })
}

/// The libosinfo short-id of an OS ("ubuntu22.04", "debian12", "rhel9.3", "rocky9",
/// "fedora39", "alpinelinux3.19", "almalinux9"), where libosinfo's naming for the distro
/// is known here.
pub fn osinfo_id(os: &OsReport) -> Option<String> {
    if os.os_type == "windows" {
        return os.osinfo.clone();
    }
    let (a, b) = (os.major_version, os.minor_version);
    if a == 0 {
        return None;
    }
    Some(match os.distro.as_str() {
        "ubuntu" => format!("ubuntu{a}.{b:02}"),
        "debian" | "fedora" | "rocky" | "almalinux" => format!("{}{a}", os.distro),
        "centos" if a >= 9 => format!("centos-stream{a}"),
        "centos" if a == 8 => "centos8".to_string(),
        "centos" => format!("centos{a}.0"),
        "rhel" | "opensuse" | "alpinelinux" => format!("{}{a}.{b}", os.distro),
        _ => return None,
    })
}

/// The version Glance's `os_version` carries: major.minor, as libosinfo writes it
/// ("22.04" for Ubuntu, "12" for Debian, "9.3" for Rocky, "3.19" for Alpine).
fn os_version(os: &OsReport) -> String {
    match os.distro.as_str() {
        "ubuntu" => format!("{}.{:02}", os.major_version, os.minor_version),
        "debian" | "fedora" => os.major_version.to_string(),
        _ => format!("{}.{}", os.major_version, os.minor_version),
    }
}

/// The properties of the first operating system found, in a fixed order; empty when
/// none was found. A property whose value is unknown is left out, never guessed.
pub fn properties(insp: &GuestInspection) -> Vec<(&'static str, String)> {
    let Some(os) = insp.operating_systems.first() else {
        return Vec::new();
    };
    let mut p = vec![("os_type", os.os_type.clone())];
    if let Some(d) = osinfo_distro(&os.distro) {
        p.push(("os_distro", d.to_string()));
    }
    if os.major_version > 0 {
        p.push(("os_version", os_version(os)));
    }
    if let Some(a) = &os.arch {
        p.push(("architecture", a.clone()));
    }
    p.push(("hw_firmware_type", os.firmware.clone()));
    p
}

/// `given` (the user's `--property` pairs) with each inspected property the user did not
/// set appended: the user's value always wins.
pub fn merge(given: &[(String, String)], insp: &GuestInspection) -> Vec<(String, String)> {
    let mut out = given.to_vec();
    for (k, v) in properties(insp) {
        if !given.iter().any(|(g, _)| g == k) {
            out.push((k.to_string(), v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_and_properties() {
        let mut os = OsReport {
            os_type: "linux".into(),
            distro: "ubuntu".into(),
            major_version: 22,
            minor_version: 4,
            arch: Some("x86_64".into()),
            firmware: "uefi".into(),
            ..Default::default()
        };
        assert_eq!(osinfo_id(&os).as_deref(), Some("ubuntu22.04"));
        let insp = GuestInspection {
            partition_table: "gpt".into(),
            volumes: vec![],
            operating_systems: vec![os.clone()],
            notes: vec![],
        };
        assert_eq!(
            properties(&insp),
            vec![
                ("os_type", "linux".to_string()),
                ("os_distro", "ubuntu".to_string()),
                ("os_version", "22.04".to_string()),
                ("architecture", "x86_64".to_string()),
                ("hw_firmware_type", "uefi".to_string()),
            ]
        );
        let user = vec![("os_distro".to_string(), "mine".to_string())];
        let merged = merge(&user, &insp);
        assert_eq!(merged[0], ("os_distro".to_string(), "mine".to_string()));
        assert_eq!(merged.len(), 5);
        assert!(!merged[1..].iter().any(|(k, _)| k == "os_distro"));
        os.distro = "alpinelinux".into();
        os.major_version = 3;
        os.minor_version = 19;
        assert_eq!(osinfo_id(&os).as_deref(), Some("alpinelinux3.19"));
        os.distro = "debian".into();
        os.major_version = 12;
        assert_eq!(osinfo_id(&os).as_deref(), Some("debian12"));
    }
}
