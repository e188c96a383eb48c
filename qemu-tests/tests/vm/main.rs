//! The VM tier as one test binary (`cargo test -p kiln-qemu-tests`): each module is one area
//! (its own doc comment says what it boots and checks). One binary rather than one per file, so
//! libtest schedules every test from one pool of `--test-threads`: a file's long last test no
//! longer leaves the cores idle while the next file waits, and there is one link instead of ten.
//! Run one area with a filter: `cargo test -p kiln-qemu-tests -- pxe::`.

mod board_riscv;
mod containerd;
mod etcd;
mod firmware;
mod installer;
mod k3s_assets;
mod k3s_cluster;
mod oci_base;
mod oci_images;
mod provision;
mod pxe;
mod quickstart;
mod raspberrypi;
mod reuse;
mod rollout;
mod update;
