//! QEMU: finding firmware, building the command line for an [`Arch`]'s machine, and running a VM
//! whose serial console is captured (automated tests) or attached to the terminal (`kiln run`).
//!
//! Every run is `-accel tcg`: KVM is not available where kiln is built and tested, and TCG behaves
//! the same on every host. The per-arch machine facts live in [`Arch::qemu`]; this module only
//! turns them into flags.
//!
//! - `firmware`: where the firmware files are (flag, then $KILN_FIRMWARE_DIR, then Debian's paths).
//! - `command`: the VM description ([`VmSpec`]) and its QEMU command line; `kiln run`.
//! - `vm`: the captured-console [`Vm`] the VM tests drive.
//!
//! [`Arch`]: crate::arch::Arch
//! [`Arch::qemu`]: crate::arch::Arch::qemu

mod command;
mod firmware;
mod vm;

pub use command::{command, extra_disk, run_interactive, Disk, Net, VmSpec};
pub use firmware::{find_firmware, Firmware, FirmwareNotFound, FIRMWARE_DIR_ENV};
pub use vm::{Vm, WaitError};
