//! `swift://` with Keystone v3 against real servers: the Keystone 30 of glance_up, whose
//! catalog lists as `object-store` a second proxy of swift_up's Swift that validates
//! Keystone tokens (keystonemiddleware's authtoken + Swift's keystoneauth), both started
//! by scripts/test (tests/servers/up.sh). What the server holds is checked with
//! python-swiftclient authenticating to that Keystone itself. Without those servers
//! (`cfg(no_swift_keystone)`, see build.rs) the tests are ignored; under CI they fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_diskconv");

/// The `OS_*` settings of one Keystone credential (password or application credential).
fn os_env(var: &str) -> BTreeMap<String, String> {
    let path = std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test (tests/servers/up.sh starts Keystone and Swift)")
    });
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("OS_"))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn password_env() -> BTreeMap<String, String> {
    os_env("DISKCONV_TEST_KEYSTONE_ENV")
}

fn appcred_env() -> BTreeMap<String, String> {
    os_env("DISKCONV_TEST_KEYSTONE_APPCRED")
}

/// `cmd` with exactly `env`'s OS_* settings: no tempauth, no other OpenStack variables.
fn with_env<'a>(cmd: &'a mut Command, env: &BTreeMap<String, String>) -> &'a mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("OS_") || k.starts_with("ST_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env)
}

/// python-swiftclient, authenticated by Keystone v3 with the password credential.
fn swift(args: &[&str]) -> String {
    let out = with_env(&mut Command::new("swift"), &password_env())
        .args(args)
        .output()
        .expect("swift (python3-swiftclient)");
    assert!(
        out.status.success(),
        "swift {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn diskconv(env: &BTreeMap<String, String>, args: &[&str]) -> Output {
    with_env(&mut Command::new(BIN), env)
        .args(args)
        .output()
        .expect("diskconv")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "diskconv failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(p).unwrap(), &mut h).unwrap();
    format!("{:x}", h.finalize())
}

fn data_raw(dir: &Path) -> PathBuf {
    let p = dir.join("data.raw");
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn container(name: &str) -> String {
    let c = format!("ks-{name}-{}", std::process::id());
    swift(&["post", &c]);
    c
}

/// Password and application credential from the standard OS_* variables: diskconv takes
/// the token and the catalog's object-store endpoint, uploads raw and qcow2, and the
/// objects are what python-swiftclient (its own Keystone login) downloads; both read
/// back through swift:// input; no secret is printed.
#[test]
#[cfg_attr(
    no_swift_keystone,
    ignore = "no Keystone-validated Swift: run scripts/test (it starts Keystone and Swift)"
)]
fn password_and_application_credential_upload_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let raw = data_raw(dir.path());
    let c = container("creds");
    for (name, env, secret) in [
        ("pw", password_env(), "OS_PASSWORD"),
        ("ac", appcred_env(), "OS_APPLICATION_CREDENTIAL_SECRET"),
    ] {
        let secret = env[secret].clone();
        for fmt in ["raw", "qcow2"] {
            let url = format!("swift://{c}/{name}.{fmt}");
            let out = diskconv(
                &env,
                &[
                    "convert",
                    "--output=json",
                    "-O",
                    fmt,
                    raw.to_str().unwrap(),
                    &url,
                ],
            );
            let text = ok(&out);
            assert!(text.contains(&url), "{text}");
            assert!(
                !text.contains(&secret) && !String::from_utf8_lossy(&out.stderr).contains(&secret)
            );
            let back = dir.path().join(format!("{name}.{fmt}.down"));
            swift(&[
                "download",
                &c,
                &format!("{name}.{fmt}"),
                "-o",
                back.to_str().unwrap(),
            ]);
            if fmt == "raw" {
                assert_eq!(sha256_file(&back), sha256_file(&raw));
            } else {
                ok(&diskconv(
                    &env,
                    &["compare", back.to_str().unwrap(), raw.to_str().unwrap()],
                ));
            }
            let out = diskconv(&env, &["compare", &url, raw.to_str().unwrap()]);
            ok(&out);
            assert!(!String::from_utf8_lossy(&out.stderr).contains(&secret));
        }
    }
    // The account is the project's (AUTH_<project id>), the same one swiftclient sees.
    let stat = swift(&["stat", &c]);
    assert!(stat.contains("Account: AUTH_"), "{stat}");
    assert!(stat.contains("Objects: 4"), "{stat}");
}

/// A token Swift refuses (revoked in Keystone before the upload) is replaced through the
/// session (invalidate, authenticate again) and the upload goes on.
#[test]
#[cfg_attr(
    no_swift_keystone,
    ignore = "no Keystone-validated Swift: run scripts/test (it starts Keystone and Swift)"
)]
fn revoked_token_is_renewed_through_keystone() {
    use diskconv::remote::{AuthConfig, KeystoneSwift, Session, SwiftAuth, SwiftUrl};
    let env = password_env();
    let cfg = AuthConfig::from_os_vars(&|n| env.get(n).cloned()).unwrap();
    let session = Arc::new(Session::new(cfg).unwrap());
    let stale = session.token().unwrap();
    let revoke = session
        .client()
        .delete(format!("{}/auth/tokens", env["OS_AUTH_URL"]))
        .header("X-Auth-Token", &stale)
        .header("X-Subject-Token", &stale)
        .send()
        .unwrap();
    assert_eq!(revoke.status().as_u16(), 204, "revoking the token");
    assert_eq!(session.authentications(), 1);

    let dir = tempfile::tempdir().unwrap();
    let raw = data_raw(dir.path());
    let c = container("renew");
    let auth = SwiftAuth::Other(Arc::new(KeystoneSwift::new(session.clone())));
    let dev = diskconv::open(&raw, &diskconv::OpenOptions::default()).unwrap();
    let r = diskconv::remote::convert_to_swift(
        dev.as_ref(),
        &SwiftUrl::parse(&format!("swift://{c}/renewed.raw")).unwrap(),
        &auth,
        &Default::default(),
        &diskconv::ConvertOptions::new(diskconv::Format::Raw),
    )
    .unwrap();
    assert_eq!(r.logins, 2, "one login, one renewal");
    assert_eq!(session.authentications(), 2);
    assert_ne!(session.token().unwrap(), stale);
    let back = dir.path().join("renewed.down");
    swift(&["download", &c, "renewed.raw", "-o", back.to_str().unwrap()]);
    assert_eq!(sha256_file(&back), sha256_file(&raw));
}

/// A token about to expire is renewed before a request starts, not after Swift refuses it:
/// with the session's refresh margin longer than the token's life every token is stale at
/// once, so each of the SLO's requests (3 segments of 1 MiB, then the manifest) renews
/// first, and no request is refused.
#[test]
#[cfg_attr(
    no_swift_keystone,
    ignore = "no Keystone-validated Swift: run scripts/test (it starts Keystone and Swift)"
)]
fn token_near_expiry_is_renewed_ahead() {
    use diskconv::remote::{
        AuthConfig, KeystoneSwift, Session, SwiftAuth, SwiftUploadOptions, SwiftUrl,
    };
    let env = password_env();
    let cfg = AuthConfig::from_os_vars(&|n| env.get(n).cloned()).unwrap();
    let session = Arc::new(Session::new(cfg).unwrap());
    assert!(
        session.token_renew_at().is_some(),
        "Keystone gives an expiry"
    );
    session.set_refresh_margin(std::time::Duration::from_secs(400 * 24 * 3600));
    let dir = tempfile::tempdir().unwrap();
    let raw = data_raw(dir.path());
    let c = container("ahead");
    let auth = SwiftAuth::Other(Arc::new(KeystoneSwift::new(session.clone())));
    let dev = diskconv::open(&raw, &diskconv::OpenOptions::default()).unwrap();
    let up = SwiftUploadOptions {
        segment_size: Some(1 << 20),
        in_flight: 1,
        ..Default::default()
    };
    let r = diskconv::remote::convert_to_swift(
        dev.as_ref(),
        &SwiftUrl::parse(&format!("swift://{c}/ahead.raw")).unwrap(),
        &auth,
        &up,
        &diskconv::ConvertOptions::new(diskconv::Format::Raw),
    )
    .unwrap();
    assert_eq!(r.segments, 3);
    assert!(r.logins >= 4, "{} logins for 4 requests", r.logins);
    assert!(session.authentications() >= r.logins);
    let back = dir.path().join("ahead.down");
    swift(&["download", &c, "ahead.raw", "-o", back.to_str().unwrap()]);
    assert_eq!(sha256_file(&back), sha256_file(&raw));
}

/// A wrong password: one line, exit non-zero, the password never printed, nothing
/// uploaded.
#[test]
#[cfg_attr(
    no_swift_keystone,
    ignore = "no Keystone-validated Swift: run scripts/test (it starts Keystone and Swift)"
)]
fn wrong_password_is_one_line_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let raw = data_raw(dir.path());
    let c = container("wrong");
    let mut env = password_env();
    let bad = "not-the-password-4711".to_string();
    env.insert("OS_PASSWORD".into(), bad.clone());
    let out = diskconv(
        &env,
        &[
            "convert",
            "-O",
            "raw",
            raw.to_str().unwrap(),
            &format!("swift://{c}/x.raw"),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("Keystone refused the credentials"), "{err}");
    assert!(!err.contains(&bad) && !String::from_utf8_lossy(&out.stdout).contains(&bad));
    assert_eq!(swift(&["list", &c]), "");
}

/// python-swiftclient's precedence: with ST_AUTH, ST_USER and ST_KEY set, tempauth is
/// used even though OS_AUTH_URL is set too (here the ST_* point nowhere, so the error
/// names tempauth's URL, not Keystone).
#[test]
#[cfg_attr(
    no_swift_keystone,
    ignore = "no Keystone-validated Swift: run scripts/test (it starts Keystone and Swift)"
)]
fn tempauth_variables_take_precedence_over_keystone() {
    let dir = tempfile::tempdir().unwrap();
    let raw = data_raw(dir.path());
    let out = with_env(&mut Command::new(BIN), &password_env())
        .env("ST_AUTH", "http://127.0.0.1:9/auth/v1.0")
        .env("ST_USER", "a:b")
        .env("ST_KEY", "k")
        .args([
            "convert",
            "-O",
            "raw",
            raw.to_str().unwrap(),
            "swift://c/x.raw",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authenticating"), "{err}");
    assert!(!err.contains("Keystone"), "{err}");
}
