//! kiln: builds offline, self-installing edge Kubernetes disk images.
//!
//! The library holds all the logic; `main.rs` is a thin CLI over it. Modules are named by the
//! domain noun or on-disk format they own.

pub mod arch;
pub mod assets;
pub mod bmap;
pub mod board;
pub mod busybox;
pub mod cache;
pub mod cluster;
pub mod compress;
pub mod containerd;
pub mod cpio;
pub mod deb;
pub mod debian;
pub mod deploy;
pub mod digest;
pub mod elfclosure;
pub mod error;
pub mod esp;
pub mod fat;
pub mod fetch;
pub mod flash;
pub mod gpt;
pub mod image_ref;
pub mod init;
pub mod initramfs;
pub mod inittab;
pub mod installer;
pub mod k3s;
pub mod kmod;
pub mod manifest;
pub mod netboot;
pub mod oci;
pub mod output;
pub mod overlay;
pub mod pipeline;
pub mod platform;
pub mod profile;
pub mod provision;
pub mod qemu;
pub mod raspberrypi;
pub mod registries;
pub mod reuse;
pub mod rollout;
pub mod secret_files;
pub mod serve;
pub mod setup;
pub mod site_steps;
pub mod size;
pub mod spill;
pub mod squashfs;
#[cfg(test)]
mod testhttp;
pub mod tree;
pub mod trust;
pub mod update;
