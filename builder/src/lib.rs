//! kiln: builds offline, self-installing edge Kubernetes disk images.
//!
//! The library holds all the logic; `main.rs` is a thin CLI over it.

pub mod arch;
pub mod qemu;
pub mod tree;
