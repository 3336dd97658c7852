//! The integration tests that check diskconv against qemu-img and the host's tools (mkfs,
//! strace, losetup): every format, convert, check, map, measure, resize, snapshot,
//! sparsify, streaming. One binary, one module per area (`cargo test --test qemu vhd::`).

#[path = "../common/mod.rs"]
mod common;

mod check;
mod cli;
mod compare;
mod convert_existing;
mod discard;
mod guest_inspect;
mod guest_xfs;
mod hostile;
mod inplace_crash;
mod map;
mod matrix;
mod measure;
mod mutation_decisions;
mod ova;
mod parity;
mod probe;
mod qcow1;
mod qcow2;
mod qed;
mod raw;
mod resize_cli;
mod resize_crash;
mod resize_qcow2;
mod resize_vdi;
mod resize_vhd;
mod resize_vmdk;
mod snapshot;
mod snapshot_crash;
mod sparsify;
mod sparsify_ext;
mod sparsify_fat;
mod sparsify_ntfs;
mod sparsify_xfs;
mod special_files;
mod stream_qcow2;
mod stream_signals;
mod stream_vdi;
mod stream_vhd;
mod vdi;
mod vhd;
mod vhdx;
mod vmdk;
