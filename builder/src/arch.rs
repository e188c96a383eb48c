//! The target architectures and every per-architecture fact kiln needs.
//!
//! Nothing else in kiln matches on architecture strings: code asks an [`Arch`] for its
//! Debian name, EFI file names, partition type GUID, console or QEMU machine.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::gpt::Guid;

/// A CPU architecture kiln builds images for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Arch {
    X86_64,
    Aarch64,
    Riscv64,
}

/// How QEMU emulates a generic UEFI (or U-Boot) machine of one architecture.
#[derive(Debug, Clone, Copy)]
pub struct QemuMachine {
    /// The `qemu-system-*` binary.
    pub binary: &'static str,
    /// The Debian package that ships `binary`, named in errors when it is missing.
    pub qemu_package: &'static str,
    /// `-M` value.
    pub machine: &'static str,
    /// `-cpu` value, if the default is not right.
    pub cpu: Option<&'static str>,
    /// The Debian package that holds the firmware, named in errors.
    pub firmware_package: &'static str,
    /// How firmware is loaded.
    pub firmware: FirmwareKind,
}

/// The firmware layout QEMU needs for an architecture (paths relative to a firmware root,
/// `/usr/share` or `/usr/lib` on Debian; see `qemu/firmware.rs` for how they are found).
#[derive(Debug, Clone, Copy)]
pub enum FirmwareKind {
    /// UEFI as two pflash units: read-only code and a writable copy of the variable store.
    Pflash { code: &'static str, vars: &'static str },
    /// OpenSBI as `-bios` plus U-Boot as `-kernel` (riscv64).
    OpenSbiUboot { opensbi: &'static str, uboot: &'static str },
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::X86_64, Arch::Aarch64, Arch::Riscv64];

    /// kiln's name, used in profiles, output directories and the `[kiln] ready arch=` line.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Riscv64 => "riscv64",
        }
    }

    /// Debian's architecture name (`Packages` indexes, `.deb` file names).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
            Arch::Riscv64 => "riscv64",
        }
    }

    /// The OCI platform `architecture` value.
    /// The k3s release's binary asset for this arch (`k3s`, `k3s-arm64`, `k3s-riscv64`); the
    /// air-gap archive and checksum list are named by the Debian arch (`...-amd64`).
    pub fn k3s_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "k3s",
            Arch::Aarch64 => "k3s-arm64",
            Arch::Riscv64 => "k3s-riscv64",
        }
    }

    pub fn oci(self) -> &'static str {
        self.debian()
    }

    /// The removable-media boot file UEFI firmware looks for: `\EFI\BOOT\<this>`.
    pub fn efi_boot_file(self) -> &'static str {
        match self {
            Arch::X86_64 => "BOOTX64.EFI",
            Arch::Aarch64 => "BOOTAA64.EFI",
            Arch::Riscv64 => "BOOTRISCV64.EFI",
        }
    }

    /// systemd-boot's file name in Debian's `systemd-boot-efi` (under `/usr/lib/systemd/boot/efi/`).
    pub fn systemd_boot_file(self) -> &'static str {
        match self {
            Arch::X86_64 => "systemd-bootx64.efi",
            Arch::Aarch64 => "systemd-bootaa64.efi",
            Arch::Riscv64 => "systemd-bootriscv64.efi",
        }
    }

    /// iPXE's EFI binary in Debian's `ipxe` package (under `/usr/lib/ipxe/`, trixie and later):
    /// what UEFI PXE/HTTP boot loads before iPXE fetches kiln's `boot.ipxe`.
    pub fn ipxe_efi_file(self) -> &'static str {
        match self {
            Arch::X86_64 => "ipxe-amd64.efi",
            Arch::Aarch64 => "ipxe-arm64.efi",
            Arch::Riscv64 => "ipxe-riscv64.efi",
        }
    }

    /// Root partition type GUID from the Discoverable Partitions Specification.
    pub fn root_partition_type(self) -> Guid {
        Guid::constant(match self {
            Arch::X86_64 => "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            Arch::Aarch64 => "b921b045-1df0-41c3-af44-4c6f280d3fae",
            Arch::Riscv64 => "72ec70a6-cf74-40e6-bd49-4bda08e8f224",
        })
    }

    /// The serial console QEMU's machine (and most boards of the arch) exposes.
    pub fn serial_console(self) -> &'static str {
        match self {
            Arch::X86_64 | Arch::Riscv64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// Debian's kernel metapackage for the arch; it depends on the versioned image package.
    pub fn kernel_metapackage(self) -> &'static str {
        match self {
            Arch::X86_64 => "linux-image-amd64",
            Arch::Aarch64 => "linux-image-arm64",
            Arch::Riscv64 => "linux-image-riscv64",
        }
    }

    /// Prefix of the bootable kernel file inside the kernel package (followed by the version).
    /// riscv64 ships an uncompressed `vmlinux-*` (a PE image with an EFI stub).
    pub fn kernel_file_prefix(self) -> &'static str {
        match self {
            Arch::X86_64 | Arch::Aarch64 => "boot/vmlinuz-",
            Arch::Riscv64 => "boot/vmlinux-",
        }
    }

    /// ELF `e_machine` of the arch (kernel modules, binaries).
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,   // EM_X86_64
            Arch::Aarch64 => 183, // EM_AARCH64
            Arch::Riscv64 => 243, // EM_RISCV
        }
    }

    /// The directory multiarch libraries live in (`/usr/lib/<triplet>`).
    pub fn multiarch_triplet(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux-gnu",
            Arch::Aarch64 => "aarch64-linux-gnu",
            Arch::Riscv64 => "riscv64-linux-gnu",
        }
    }

    /// The QEMU machine kiln boots this arch's images on.
    pub fn qemu(self) -> QemuMachine {
        match self {
            // q35 + OVMF: trixie/bookworm-backports ship only the 4 MiB variant.
            Arch::X86_64 => QemuMachine {
                binary: "qemu-system-x86_64",
                qemu_package: "qemu-system-x86",
                machine: "q35",
                cpu: None,
                firmware_package: "ovmf",
                firmware: FirmwareKind::Pflash { code: "OVMF/OVMF_CODE_4M.fd", vars: "OVMF/OVMF_VARS_4M.fd" },
            },
            // virt + AAVMF; cortex-a72 is a real core the Debian kernel supports.
            Arch::Aarch64 => QemuMachine {
                binary: "qemu-system-aarch64",
                qemu_package: "qemu-system-arm",
                machine: "virt",
                cpu: Some("cortex-a72"),
                firmware_package: "qemu-efi-aarch64",
                firmware: FirmwareKind::Pflash { code: "AAVMF/AAVMF_CODE.fd", vars: "AAVMF/AAVMF_VARS.fd" },
            },
            // virt + OpenSBI + U-Boot (S-mode): the fastest riscv64 chain measured, and what
            // real boards run. U-Boot boots the ESP's extlinux.conf or BOOTRISCV64.EFI.
            Arch::Riscv64 => QemuMachine {
                binary: "qemu-system-riscv64",
                qemu_package: "qemu-system-misc",
                machine: "virt",
                cpu: None,
                firmware_package: "opensbi u-boot-qemu",
                firmware: FirmwareKind::OpenSbiUboot {
                    // Debian installs OpenSBI under the multiarch directory (`dpkg -L opensbi`).
                    opensbi: "riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin",
                    uboot: "u-boot/qemu-riscv64_smode/u-boot.bin",
                },
            },
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An architecture name that is not one kiln builds for.
#[derive(Debug, thiserror::Error)]
#[error("unknown architecture `{0}` (expected one of: x86_64, aarch64, riscv64; aliases amd64, arm64)")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            "riscv64" => Ok(Arch::Riscv64),
            other => Err(UnknownArch(other.to_string())),
        }
    }
}

impl Serialize for Arch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Arch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Arch {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Arch".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "enum": ["x86_64", "aarch64", "riscv64", "amd64", "arm64"],
            "description": "Target architecture (amd64 and arm64 are accepted as aliases)."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_parse_to_canonical_names() {
        assert_eq!("amd64".parse::<Arch>().unwrap(), Arch::X86_64);
        assert_eq!("arm64".parse::<Arch>().unwrap(), Arch::Aarch64);
        assert_eq!("riscv64".parse::<Arch>().unwrap().name(), "riscv64");
        let err = "mips".parse::<Arch>().unwrap_err().to_string();
        assert!(err.contains("mips") && err.contains("x86_64"), "{err}");
    }

    #[test]
    fn root_types_are_distinct() {
        let mut t: Vec<_> = Arch::ALL.iter().map(|a| a.root_partition_type()).collect();
        t.dedup();
        assert_eq!(t.len(), 3);
    }
}
