//! A Windows root: product, version, build, edition, system root from the SOFTWARE hive;
//! hostname and architecture from the SYSTEM hive's current control set.

use super::hive::Hive;
use super::OsReport;
use crate::guest::files::FileSystem;

const SOFTWARE: &str = "/Windows/System32/config/SOFTWARE";
const SYSTEM: &str = "/Windows/System32/config/SYSTEM";
/// The most read of one hive (a SOFTWARE hive of a long-lived server is ~100 MiB).
const MAX_HIVE: u64 = 256 << 20;
const CURRENT_VERSION: &[&str] = &["Microsoft", "Windows NT", "CurrentVersion"];

/// True when `fs` holds a Windows system root (its SOFTWARE hive).
pub fn is_root(fs: &dyn FileSystem) -> bool {
    fs.exists(SOFTWARE).unwrap_or(false)
}

fn hive(fs: &dyn FileSystem, path: &str, notes: &mut Vec<String>) -> Option<Hive> {
    match fs.read_file(path, MAX_HIVE).and_then(Hive::parse) {
        Ok(h) => Some(h),
        Err(e) => {
            notes.push(format!("{path}: {e}"));
            None
        }
    }
}

/// libvirt's name for a PROCESSOR_ARCHITECTURE value.
fn arch(p: &str) -> Option<&'static str> {
    Some(match p.to_ascii_uppercase().as_str() {
        "AMD64" => "x86_64",
        "X86" => "i686",
        "ARM64" => "aarch64",
        "IA64" => "ia64",
        _ => return None,
    })
}

fn software(h: &Hive, os: &mut OsReport) -> crate::error::Result<()> {
    let s = |n: &str| h.string(CURRENT_VERSION, n);
    os.product_name = s("ProductName")?;
    os.edition = s("EditionID")?;
    os.system_root = s("SystemRoot")?;
    os.build = s("CurrentBuildNumber")?.or(s("CurrentBuild")?);
    let installation = s("InstallationType")?;
    match (
        h.dword(CURRENT_VERSION, "CurrentMajorVersionNumber")?,
        h.dword(CURRENT_VERSION, "CurrentMinorVersionNumber")?,
    ) {
        (Some(a), Some(b)) => (os.major_version, os.minor_version) = (a, b),
        _ => {
            if let Some((a, b)) = s("CurrentVersion")?
                .as_deref()
                .and_then(super::linux::split_version)
            {
                (os.major_version, os.minor_version) = (a, b);
            }
        }
    }
    os.version = Some(format!("{}.{}", os.major_version, os.minor_version));
    os.osinfo = osinfo(os, installation.as_deref() == Some("Server"));
    Ok(())
}

/// The libosinfo short-id of a Windows release, from its version, build and kind.
fn osinfo(os: &OsReport, server: bool) -> Option<String> {
    let build: u32 = os.build.as_deref()?.parse().ok()?;
    Some(
        match (os.major_version, os.minor_version, server) {
            (10, 0, false) if build >= 22000 => "win11",
            (10, 0, false) => "win10",
            (10, 0, true) if build >= 26100 => "win2k25",
            (10, 0, true) if build >= 20348 => "win2k22",
            (10, 0, true) if build >= 17763 => "win2k19",
            (10, 0, true) => "win2k16",
            (6, 3, false) => "win8.1",
            (6, 3, true) => "win2k12r2",
            (6, 2, false) => "win8",
            (6, 2, true) => "win2k12",
            (6, 1, false) => "win7",
            (6, 1, true) => "win2k8r2",
            _ => return None,
        }
        .to_string(),
    )
}

fn system(h: &Hive, os: &mut OsReport) -> crate::error::Result<()> {
    let current = h.dword(&["Select"], "Current")?.unwrap_or(1);
    if current == 0 || current > 999 {
        return Ok(());
    }
    let set = format!("ControlSet{current:03}");
    os.hostname = h.string(
        &[&set, "Control", "ComputerName", "ComputerName"],
        "ComputerName",
    )?;
    let p = h.string(
        &[&set, "Control", "Session Manager", "Environment"],
        "PROCESSOR_ARCHITECTURE",
    )?;
    os.arch = p.as_deref().and_then(arch).map(str::to_string);
    Ok(())
}

/// Inspect the Windows root on `fs` (its `root` and `firmware` are the caller's).
pub fn inspect(fs: &dyn FileSystem) -> OsReport {
    let mut os = OsReport {
        os_type: "windows".into(),
        distro: "windows".into(),
        ..Default::default()
    };
    if let Some(h) = hive(fs, SOFTWARE, &mut os.notes) {
        if let Err(e) = software(&h, &mut os) {
            os.notes.push(format!("{SOFTWARE}: {e}"));
        }
    }
    if let Some(h) = hive(fs, SYSTEM, &mut os.notes) {
        if let Err(e) = system(&h, &mut os) {
            os.notes.push(format!("{SYSTEM}: {e}"));
        }
    }
    os
}
