//! The integration tests against real servers started on 127.0.0.1 by scripts/test
//! (SeaweedFS, Ceph, Swift, Keystone, Glance): one binary, one module per service
//! (`cargo test --test remote remote_s3::`).

#[path = "../common/mod.rs"]
mod common;

mod ceph_rbd;
mod remote_glance;
mod remote_s3;
mod remote_swift;
mod remote_swift_keystone;
mod stdin_spool;
