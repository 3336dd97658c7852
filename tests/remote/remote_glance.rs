//! `convert ... glance://NAME` and `register` against a real Glance 33 (and Keystone 30 for
//! the auth tests) on 127.0.0.1, started by tests/servers/up.sh: every output format and
//! subformat through Glance's own format inspector, the record compared with md5sum and
//! sha512sum of the bytes Glance serves back, cleanup after a refusal and after SIGINT,
//! Keystone's password, application-credential and token methods, catalog endpoints and
//! secrets kept out of every output.
//!
//! Glance keeps its records in sqlite, which refuses concurrent writers ("database is
//! locked"): the tests take one lock so they talk to it one at a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;

static GLANCE: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    GLANCE.lock().unwrap_or_else(|e| e.into_inner())
}

fn glance_url() -> String {
    std::env::var("DISKCONV_TEST_GLANCE_URL").expect(
        "DISKCONV_TEST_GLANCE_URL unset: run ./scripts/test (tests/servers/up.sh starts Glance)",
    )
}

/// The `KEY=VALUE` lines of an env file written by start-keystone.sh.
fn env_file(var: &str) -> Vec<(String, String)> {
    let p = std::env::var(var)
        .unwrap_or_else(|_| panic!("{var} unset: run ./scripts/test (tests/servers/up.sh)"));
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| k.starts_with("OS_"))
        .collect()
}

fn keystone_pw() -> Vec<(String, String)> {
    env_file("DISKCONV_TEST_KEYSTONE_ENV")
}

fn keystone_appcred() -> Vec<(String, String)> {
    env_file("DISKCONV_TEST_KEYSTONE_APPCRED")
}

/// Token auth straight at Glance (the test Glance takes any token): no Keystone.
fn direct() -> Vec<(String, String)> {
    vec![
        ("OS_AUTH_TOKEN".into(), "test-token".into()),
        ("OS_IMAGE_URL".into(), glance_url()),
    ]
}

fn diskconv(args: &[&str], env: &[(String, String)], cwd: &Path) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_diskconv"));
    c.args(args).current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("OS_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    c.output().expect("run diskconv")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(cmd: &mut Command) -> Output {
    let o = cmd.output().expect("run tool");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    o
}

fn qemu_img(args: &[&str]) {
    sh(Command::new("qemu-img").args(args));
}

fn curl_json(url: &str) -> Value {
    let o = sh(Command::new("curl").args(["-sf", "--noproxy", "*", url]));
    serde_json::from_slice(&o.stdout).expect("json")
}

fn images_named(name: &str) -> Vec<Value> {
    let v = curl_json(&format!("{}/v2/images?name={name}&limit=100", glance_url()));
    v["images"].as_array().cloned().unwrap_or_default()
}

fn delete_image(id: &str) {
    let u = format!("{}/v2/images/{id}", glance_url());
    // Protected images first lose the flag (a test image must not stay).
    let _ = Command::new("curl")
        .args(["-s", "--noproxy", "*", "-X", "PATCH", &u, "-H"])
        .arg("Content-Type: application/openstack-images-v2.1-json-patch")
        .args([
            "-d",
            r#"[{"op":"replace","path":"/protected","value":false}]"#,
        ])
        .output();
    let _ = Command::new("curl")
        .args(["-s", "--noproxy", "*", "-X", "DELETE", &u])
        .output();
}

fn tool_digest(tool: &str, p: &Path) -> String {
    let o = sh(Command::new(tool).arg(p));
    text(&o.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// A 64 MiB qcow2 with data, a zero run and holes.
fn source(dir: &Path) -> PathBuf {
    let p = dir.join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
    sh(Command::new("qemu-io").args([
        "-c",
        "write -P 0x5a 1M 3M",
        "-c",
        "write -z 8M 1M",
        "-c",
        "write -P 0x11 40M 64k",
        p.to_str().unwrap(),
    ]));
    p
}

/// Upload `src` as `-O fmt` with `extra` flags; returns the JSON report.
fn upload(dir: &Path, src: &Path, name: &str, fmt: &str, extra: &[&str]) -> Value {
    let mut args = vec!["convert", "-O", fmt];
    args.extend_from_slice(extra);
    let dst = format!("glance://{name}");
    args.extend_from_slice(&[src.to_str().unwrap(), &dst, "--output", "json"]);
    let o = diskconv(&args, &direct(), dir);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("json report")
}

/// Download an image's data from Glance.
fn download(id: &str, to: &Path) {
    sh(Command::new("curl").args([
        "-sf",
        "--noproxy",
        "*",
        "-o",
        to.to_str().unwrap(),
        &format!("{}/v2/images/{id}/file", glance_url()),
    ]));
}

#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_glance)), ignore = "qemu-img not installed")]
fn every_output_format_passes_glance_inspector_and_matches_its_record() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let cases: &[(&str, &[&str], &str, &str)] = &[
        ("raw", &[], "raw", "raw"),
        ("qcow2", &[], "qcow2", "qcow2"),
        ("qcow2", &["-c"], "qcow2", "qcow2-compressed"),
        ("vpc", &["-o", "subformat=dynamic"], "vhd", "vhd-dynamic"),
        ("vmdk", &[], "vmdk", "vmdk-monolithicSparse"),
        (
            "vmdk",
            &["-o", "subformat=streamOptimized"],
            "vmdk",
            "vmdk-streamOptimized",
        ),
        ("vdi", &[], "vdi", "vdi"),
        ("vhdx", &[], "vhdx", "vhdx-dynamic"),
        ("vhdx", &["-o", "subformat=fixed"], "vhdx", "vhdx-fixed"),
    ];
    for (fmt, opts, disk_format, label) in cases {
        let name = format!("fmt-{label}");
        let mut extra = opts.to_vec();
        extra.extend_from_slice(&["--glance-method", "upload"]);
        let j = upload(d.path(), &src, &name, fmt, &extra);
        let rec = &j["glance-image"];
        let id = j["glance-id"].as_str().unwrap().to_string();
        assert_eq!(rec["status"], "active", "{label}: {rec}");
        assert_eq!(rec["disk_format"], *disk_format, "{label}");
        assert_eq!(rec["container_format"], "bare", "{label}");
        // Glance's inspector computed the guest size from the header it accepted.
        assert_eq!(rec["virtual_size"], 64 << 20, "{label}: {rec}");
        assert_eq!(rec["min_disk"], 1, "{label}");
        // The bytes Glance serves back, digested by the coreutils.
        let back = d.path().join(format!("{label}.back"));
        download(&id, &back);
        let len = std::fs::metadata(&back).unwrap().len();
        assert_eq!(rec["size"], len, "{label}");
        assert_eq!(j["size"], len, "{label}");
        let md5 = tool_digest("md5sum", &back);
        let sha512 = tool_digest("sha512sum", &back);
        assert_eq!(rec["checksum"], md5.as_str(), "{label}");
        assert_eq!(rec["os_hash_algo"], "sha512", "{label}");
        assert_eq!(rec["os_hash_value"], sha512.as_str(), "{label}");
        assert_eq!(j["digests"]["md5"], md5.as_str(), "{label}");
        assert_eq!(j["digests"]["sha512"], sha512.as_str(), "{label}");
        // And they are the source's guest data.
        sh(Command::new("qemu-img").args([
            "compare",
            "-q",
            src.to_str().unwrap(),
            back.to_str().unwrap(),
        ]));
        std::fs::remove_file(&back).unwrap();
        delete_image(&id);
    }
}

#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
fn raw_over_one_gib_with_little_data() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("big.raw");
    let virt: u64 = (1 << 30) + (64 << 20);
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(virt).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xc3; 1 << 20], 5 << 20).unwrap();
    f.write_all_at(b"tail", virt - 4).unwrap();
    drop(f);
    let j = upload(
        d.path(),
        &src,
        "big-raw",
        "raw",
        &["-f", "raw", "--glance-method", "upload"],
    );
    let rec = &j["glance-image"];
    let id = rec["id"].as_str().unwrap().to_string();
    assert_eq!(rec["size"], virt);
    assert_eq!(rec["virtual_size"], virt);
    assert_eq!(rec["min_disk"], 2, "1 GiB + 64 MiB rounds up to 2 GiB");
    assert_eq!(rec["checksum"], tool_digest("md5sum", &src).as_str());
    assert_eq!(
        rec["os_hash_value"],
        tool_digest("sha512sum", &src).as_str()
    );
    delete_image(&id);
}

#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_glance)), ignore = "qemu-img not installed")]
fn record_fields_and_glance_direct_import() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let j = upload(
        d.path(),
        &src,
        "fields",
        "qcow2",
        &[
            "--glance-method",
            "glance-direct",
            "--property",
            "os_distro=debian",
            "--property",
            "hw_disk_bus=scsi",
            "--tag",
            "normalised",
            "--tag",
            "diskconv",
            "--visibility",
            "private",
            "--min-disk",
            "3",
            "--protected",
        ],
    );
    let rec = &j["glance-image"];
    let id = j["glance-id"].as_str().unwrap().to_string();
    assert_eq!(j["glance-method"], "glance-direct");
    assert_eq!(rec["status"], "active");
    assert_eq!(rec["os_distro"], "debian");
    assert_eq!(rec["hw_disk_bus"], "scsi");
    assert_eq!(rec["visibility"], "private");
    assert_eq!(rec["min_disk"], 3);
    assert_eq!(rec["protected"], true);
    let mut tags: Vec<&str> = rec["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, ["diskconv", "normalised"]);
    let back = d.path().join("back");
    download(&id, &back);
    assert_eq!(rec["checksum"], tool_digest("md5sum", &back).as_str());
    assert_eq!(
        rec["os_hash_value"],
        tool_digest("sha512sum", &back).as_str()
    );
    delete_image(&id);
    assert!(images_named("fields").is_empty());
}

#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_glance)), ignore = "qemu-img not installed")]
fn refused_upload_deletes_the_image_and_says_why() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    // Raw bytes claimed as qcow2: Glance's inspector refuses them with 415.
    let o = diskconv(
        &[
            "convert",
            "-O",
            "raw",
            src.to_str().unwrap(),
            "glance://refused",
            "--disk-format",
            "qcow2",
            "--glance-method",
            "upload",
        ],
        &direct(),
        d.path(),
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("HTTP 415"), "{err}");
    assert!(err.contains("disk_format qcow2"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        images_named("refused").is_empty(),
        "the refused image was left"
    );
}

/// Glance 33's inspector sees a fixed VHD (raw data, footer only) as raw and answers 415:
/// diskconv says so before making a record; uploaded by hand, Glance does refuse it.
#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_glance)), ignore = "qemu-img not installed")]
fn fixed_vhd_is_refused_before_upload_as_glance_would() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let o = diskconv(
        &[
            "convert",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed",
            src.to_str().unwrap(),
            "glance://fixed-vhd",
        ],
        &direct(),
        d.path(),
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("fixed VHD") && err.contains("subformat=dynamic"),
        "{err}"
    );
    assert!(images_named("fixed-vhd").is_empty());
    let vhd = d.path().join("fixed.vhd");
    let o = diskconv(
        &[
            "convert",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed",
            src.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ],
        &[],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let id = {
        let o = sh(Command::new("curl").args([
            "-sf",
            "--noproxy",
            "*",
            "-X",
            "POST",
            &format!("{}/v2/images", glance_url()),
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"name":"fixed-vhd-by-hand","disk_format":"vhd","container_format":"bare"}"#,
        ]));
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let o = sh(Command::new("curl").args([
        "-s",
        "--noproxy",
        "*",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        &format!("{}/v2/images/{id}/file", glance_url()),
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &format!("@{}", vhd.display()),
    ]));
    delete_image(&id);
    assert_eq!(text(&o.stdout), "415");
}

#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
fn sigint_mid_upload_leaves_no_image() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("slow.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(512 << 20).unwrap();
    drop(f);
    let mut c = Command::new(env!("CARGO_BIN_EXE_diskconv"));
    c.args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        "-r",
        "16M",
        src.to_str().unwrap(),
        "glance://interrupted",
        "--glance-method",
        "upload",
    ])
    .current_dir(d.path())
    .stderr(std::process::Stdio::piped());
    for (k, v) in direct() {
        c.env(k, v);
    }
    let child = c.spawn().unwrap();
    // Wait until Glance is receiving the data.
    let mut saw = None;
    for _ in 0..300 {
        if let Some(i) = images_named("interrupted")
            .into_iter()
            .find(|i| i["status"] == "saving")
        {
            saw = Some(i);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(saw.is_some(), "the upload never reached 'saving'");
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGINT), "{out:?}");
    assert!(
        images_named("interrupted").is_empty(),
        "an interrupted upload left its image: {:?}",
        images_named("interrupted")
    );
}

/// Images Glance must refuse, made by qemu-img: `diskconv inspect` refuses each too
/// (exit 2) and Glance answers its upload with 415.
#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_glance)), ignore = "qemu-img not installed")]
fn inspect_refuses_what_glance_refuses() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p("base.qcow2"), "16M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &p("base.qcow2"),
        "-F",
        "qcow2",
        &p("backed.qcow2"),
        "16M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p("data.bin")),
        &p("datafile.qcow2"),
        "16M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        &p("flat.vmdk"),
        "16M",
    ]);
    for (file, fmt) in [
        ("backed.qcow2", "qcow2"),
        ("datafile.qcow2", "qcow2"),
        ("flat.vmdk", "vmdk"),
    ] {
        let o = diskconv(&["inspect", "-f", fmt, &p(file)], &[], d.path());
        assert_eq!(
            o.status.code(),
            Some(2),
            "inspect {file}: {}",
            text(&o.stdout)
        );
        let id = {
            let o = sh(Command::new("curl").args([
                "-sf",
                "--noproxy",
                "*",
                "-X",
                "POST",
                &format!("{}/v2/images", glance_url()),
                "-H",
                "Content-Type: application/json",
                "-d",
                &format!(
                    r#"{{"name":"bad-{file}","disk_format":"{fmt}","container_format":"bare"}}"#
                ),
            ]));
            serde_json::from_slice::<Value>(&o.stdout).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let o = sh(Command::new("curl").args([
            "-s",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            &format!("{}/v2/images/{id}/file", glance_url()),
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", p(file)),
        ]));
        delete_image(&id);
        assert_eq!(text(&o.stdout), "415", "Glance accepted {file}");
    }
}

#[test]
#[cfg_attr(no_keystone, ignore = "no Keystone test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_keystone)), ignore = "qemu-img not installed")]
fn keystone_password_and_appcred_find_glance_in_the_catalog() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    for (label, env) in [("pw", keystone_pw()), ("appcred", keystone_appcred())] {
        let secret = env
            .iter()
            .find(|(k, _)| k == "OS_PASSWORD" || k == "OS_APPLICATION_CREDENTIAL_SECRET")
            .unwrap()
            .1
            .clone();
        assert!(!env.iter().any(|(k, _)| k == "OS_IMAGE_URL"));
        let name = format!("ks-{label}");
        let o = diskconv(
            &[
                "convert",
                "-O",
                "qcow2",
                src.to_str().unwrap(),
                &format!("glance://{name}"),
                "--glance-method",
                "upload",
                "--output",
                "json",
            ],
            &env,
            d.path(),
        );
        let all = format!("{}{}", text(&o.stdout), text(&o.stderr));
        assert!(o.status.success(), "{label}: {all}");
        assert!(!all.contains(&secret), "{label}: the secret was printed");
        let j: Value = serde_json::from_slice(&o.stdout).unwrap();
        let id = j["glance-id"].as_str().unwrap();
        // The catalog's image endpoint is the local Glance: the image is there.
        let rec = curl_json(&format!("{}/v2/images/{id}", glance_url()));
        assert_eq!(rec["status"], "active");
        assert_eq!(rec["checksum"], j["digests"]["md5"]);
        delete_image(id);
    }
}

#[test]
#[cfg_attr(no_keystone, ignore = "no Keystone test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_keystone)), ignore = "qemu-img not installed")]
fn wrong_password_is_one_line_without_secrets() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let mut env = keystone_pw();
    let real = env
        .iter()
        .find(|(k, _)| k == "OS_PASSWORD")
        .unwrap()
        .1
        .clone();
    let wrong = "not-the-Password-4242";
    env.retain(|(k, _)| k != "OS_PASSWORD");
    env.push(("OS_PASSWORD".into(), wrong.into()));
    let o = diskconv(
        &[
            "convert",
            "-O",
            "raw",
            src.to_str().unwrap(),
            "glance://never",
            "--output",
            "json",
        ],
        &env,
        d.path(),
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("Keystone refused the credentials"), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    for s in [wrong, real.as_str()] {
        assert!(!err.contains(s) && !text(&o.stdout).contains(s), "{err}");
    }
    assert!(images_named("never").is_empty());
}

#[test]
#[cfg_attr(no_keystone, ignore = "no Keystone test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_keystone)), ignore = "qemu-img not installed")]
fn clouds_yaml_with_os_cloud() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let env = keystone_appcred();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
    std::fs::write(
        d.path().join("clouds.yaml"),
        format!(
            "clouds:\n  lab:\n    auth_type: v3applicationcredential\n    auth:\n      auth_url: {}\n      application_credential_id: {}\n      application_credential_secret: {}\n    region_name: {}\n    interface: public\n",
            get("OS_AUTH_URL"),
            get("OS_APPLICATION_CREDENTIAL_ID"),
            get("OS_APPLICATION_CREDENTIAL_SECRET"),
            get("OS_REGION_NAME"),
        ),
    )
    .unwrap();
    let o = diskconv(
        &[
            "convert",
            "-O",
            "vdi",
            src.to_str().unwrap(),
            "glance://cloudsyaml",
            "--glance-method",
            "upload",
            "--output",
            "json",
        ],
        &[
            ("OS_CLOUD".into(), "lab".into()),
            ("HOME".into(), "/nonexistent".into()),
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["glance-image"]["disk_format"], "vdi");
    delete_image(j["glance-id"].as_str().unwrap());
    // A region the catalog lacks: a clear error, and no record made.
    let yaml = std::fs::read_to_string(d.path().join("clouds.yaml")).unwrap();
    let other = yaml.replace("  lab:", "  elsewhere:").replace(
        &format!("region_name: {}", get("OS_REGION_NAME")),
        "region_name: Nowhere",
    );
    std::fs::write(d.path().join("clouds.yaml"), other).unwrap();
    let o = diskconv(
        &[
            "convert",
            "-O",
            "raw",
            src.to_str().unwrap(),
            "glance://noregion",
        ],
        &[("OS_CLOUD".into(), "elsewhere".into())],
        d.path(),
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("no 'image' endpoint for interface public in region Nowhere"),
        "{err}"
    );
    assert!(images_named("noregion").is_empty());
}

/// The session renews its token before each request once it is within the margin of
/// expiry: with a margin longer than the token's life every request re-authenticates, and
/// the one-pass upload still completes (it is never restarted).
#[test]
#[cfg_attr(no_keystone, ignore = "no Keystone test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_keystone)), ignore = "qemu-img not installed")]
fn token_renewal_during_an_upload() {
    use diskconv::remote::keystone::AuthConfig;
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let env = keystone_pw();
    let cfg = AuthConfig::from_os_vars(&|k: &str| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .unwrap();
    let session = diskconv::remote::Session::new(cfg).unwrap();
    assert_eq!(session.authentications(), 1);
    assert!(
        !format!("{session:?}").contains(&env.iter().find(|(k, _)| k == "OS_PASSWORD").unwrap().1)
    );
    session.set_refresh_margin(std::time::Duration::from_secs(400 * 24 * 3600));
    let dev: std::sync::Arc<dyn diskconv::BlockDevice> =
        std::sync::Arc::from(diskconv::open(&src, &diskconv::OpenOptions::new()).unwrap());
    let opts = diskconv::ConvertOptions::new(diskconv::Format::Qcow2);
    let g = diskconv::remote::GlanceOptions {
        method: diskconv::remote::UploadMethod::Direct,
        ..Default::default()
    };
    let r = diskconv::remote::convert_to_glance(dev, "renewed", &session, &opts, &g).unwrap();
    // Create, data, at least one status poll: each with a new token.
    assert!(
        session.authentications() >= 4,
        "{}",
        session.authentications()
    );
    assert_eq!(r.record["status"], "active");
    assert_eq!(r.record["size"], r.convert.size);
    // A 401 makes the next request authenticate again.
    session.set_refresh_margin(std::time::Duration::ZERO);
    let n = session.authentications();
    session.token().unwrap();
    assert_eq!(session.authentications(), n);
    session.invalidate();
    session.token().unwrap();
    assert_eq!(session.authentications(), n + 1);
    assert_eq!(
        session.endpoint("image").unwrap(),
        glance_url().trim_end_matches('/')
    );
    delete_image(&r.id);
}

#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_glance)), ignore = "qemu-img not installed")]
fn register_by_location_is_refused_clearly_without_the_policy() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let o = diskconv(
        &[
            "register",
            "glance://by-location",
            "--location",
            "s3://bucket/img.qcow2",
            "--image",
            src.to_str().unwrap(),
        ],
        &direct(),
        d.path(),
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("HTTP 403"), "{err}");
    assert!(err.contains("policy"), "{err}");
    assert!(
        images_named("by-location").is_empty(),
        "the record was left"
    );
}

/// tests/servers/rangeserve.py on `root`: a plain web server for http:// locations.
struct WebServer {
    child: std::process::Child,
    port: u16,
}

impl WebServer {
    fn start(root: &Path) -> Self {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/rangeserve.py"))
            .arg(root)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 tests/servers/rangeserve.py");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("rangeserve.py prints its port");
        WebServer { child, port }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `register --location http://...` through Glance's http store: an active image whose
/// size, digests and disk_format are the local copy's, and whose data Glance serves back.
#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_glance)), ignore = "qemu-img not installed")]
fn register_by_http_location_makes_an_active_image_glance_serves() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let web = WebServer::start(d.path());
    let url = format!("http://127.0.0.1:{}/src.qcow2", web.port);
    let o = diskconv(
        &[
            "register",
            "glance://by-http",
            "--location",
            &url,
            "--image",
            src.to_str().unwrap(),
            "--output",
            "json",
        ],
        &direct(),
        d.path(),
    );
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let j: Value = serde_json::from_slice(&o.stdout).expect("json");
    let id = j["glance-id"].as_str().unwrap().to_string();
    let rec = curl_json(&format!("{}/v2/images/{id}", glance_url()));
    let len = std::fs::metadata(&src).unwrap().len();
    assert_eq!(rec["status"], "active", "{rec}");
    assert_eq!(rec["disk_format"], "qcow2", "{rec}");
    assert_eq!(rec["size"], len, "{rec}");
    assert_eq!(
        rec["checksum"],
        tool_digest("md5sum", &src).as_str(),
        "{rec}"
    );
    assert_eq!(rec["os_hash_algo"], "sha512", "{rec}");
    assert_eq!(
        rec["os_hash_value"],
        tool_digest("sha512sum", &src).as_str(),
        "{rec}"
    );
    let back = d.path().join("back");
    download(&id, &back);
    assert_eq!(
        tool_digest("sha256sum", &back),
        tool_digest("sha256sum", &src)
    );
    delete_image(&id);
}

/// A location whose bytes are not the local copy's: Glance 33 (do_secure_hash, the
/// default) reads it, its sha512 differs from the validation data, and the image goes back
/// to `queued`; diskconv says so and deletes the record.
#[test]
#[cfg_attr(no_glance, ignore = "no Glance test server (tests/servers/up.sh)")]
#[cfg_attr(all(no_qemu, not(no_glance)), ignore = "qemu-img not installed")]
fn register_by_http_location_with_other_bytes_is_refused() {
    let _g = lock();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let other = d.path().join("other.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        other.to_str().unwrap(),
        "64M",
    ]);
    let web = WebServer::start(d.path());
    let url = format!("http://127.0.0.1:{}/other.qcow2", web.port);
    let o = diskconv(
        &[
            "register",
            "glance://by-http-wrong",
            "--location",
            &url,
            "--image",
            src.to_str().unwrap(),
        ],
        &direct(),
        d.path(),
    );
    assert!(!o.status.success(), "{}", text(&o.stdout));
    let err = text(&o.stderr);
    // Glance's task says only "Internal Error"; its log names the os_hash_value mismatch.
    assert!(err.contains("refused the location"), "{err}");
    assert!(err.contains("sha512 differs"), "{err}");
    assert!(
        images_named("by-http-wrong").is_empty(),
        "the record was left"
    );
}
