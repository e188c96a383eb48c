//! Finding the firmware an [`Arch`]'s machine boots from: the `--firmware-dir` flag, else
//! $KILN_FIRMWARE_DIR, else the Debian package paths; a miss is a [`FirmwareNotFound`] naming the
//! files looked for and the package to install.

use std::path::{Path, PathBuf};

use crate::arch::{Arch, FirmwareKind};

/// Environment variable naming a firmware directory (used when no `--firmware-dir` is given).
pub const FIRMWARE_DIR_ENV: &str = "KILN_FIRMWARE_DIR";

/// The firmware files one arch's machine boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// UEFI in two pflash units: `code` read-only, and a writable copy of `vars_template`.
    Pflash { code: PathBuf, vars_template: PathBuf },
    /// OpenSBI (`-bios`) loading U-Boot (`-kernel`).
    OpenSbiUboot { opensbi: PathBuf, uboot: PathBuf },
}

/// Firmware files that are not where they were looked for.
#[derive(Debug, thiserror::Error)]
#[error(
    "firmware for {arch} not found: looked for {}; install the Debian package(s) `{package}`, \
     or pass --firmware-dir / set {FIRMWARE_DIR_ENV} to a directory holding them",
    .looked_for.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
)]
pub struct FirmwareNotFound {
    pub arch: Arch,
    /// Every path tried, in order.
    pub looked_for: Vec<PathBuf>,
    /// The Debian package(s) that ship the files.
    pub package: &'static str,
}

/// Firmware files for an arch: found from `dir` (a `--firmware-dir` flag), else $KILN_FIRMWARE_DIR, else the
/// Debian package paths (/usr/share for OVMF/AAVMF, /usr/lib for opensbi/u-boot). A miss is an error naming the
/// files looked for and the Debian package to install (`Arch::qemu().firmware_package`).
///
/// A given directory is searched alone (no silent fallback to the system files, so the user gets what
/// they asked for): each file is looked for at its Debian-relative path (`OVMF/OVMF_CODE_4M.fd`) and
/// then by bare name (`OVMF_CODE_4M.fd`), so both a copied Debian tree and a flat directory work.
pub fn find_firmware(arch: Arch, dir: Option<&Path>) -> anyhow::Result<Firmware> {
    let env_dir = std::env::var_os(FIRMWARE_DIR_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    let root = dir.map(Path::to_path_buf).or(env_dir);
    Ok(find_firmware_under(arch, root.as_deref())?)
}

/// [`find_firmware`] without the environment: `root` is the user's directory, `None` the Debian paths.
fn find_firmware_under(arch: Arch, root: Option<&Path>) -> Result<Firmware, FirmwareNotFound> {
    let machine = arch.qemu();
    let mut looked_for = Vec::new();
    let mut find = |debian_root: &str, rel: &str| -> Option<PathBuf> {
        let candidates = match root {
            Some(dir) => {
                let mut c = vec![dir.join(rel)];
                if let Some(name) = Path::new(rel).file_name() {
                    c.push(dir.join(name));
                }
                c
            }
            None => vec![Path::new(debian_root).join(rel)],
        };
        let found = candidates.iter().find(|p| p.is_file()).cloned();
        if found.is_none() {
            looked_for.extend(candidates);
        }
        found
    };
    let firmware = match machine.firmware {
        FirmwareKind::Pflash { code, vars } => match (find("/usr/share", code), find("/usr/share", vars)) {
            (Some(code), Some(vars_template)) => Some(Firmware::Pflash { code, vars_template }),
            _ => None,
        },
        FirmwareKind::OpenSbiUboot { opensbi, uboot } => match (find("/usr/lib", opensbi), find("/usr/lib", uboot)) {
            (Some(opensbi), Some(uboot)) => Some(Firmware::OpenSbiUboot { opensbi, uboot }),
            _ => None,
        },
    };
    firmware.ok_or(FirmwareNotFound { arch, looked_for, package: machine.firmware_package })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::qemu::{command, VmSpec};

    #[test]
    fn firmware_in_a_debian_shaped_dir_is_found() {
        let dir = tempfile::tempdir().unwrap();
        for rel in ["riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin", "u-boot/qemu-riscv64_smode/u-boot.bin"] {
            let p = dir.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"x").unwrap();
        }
        let fw = find_firmware(Arch::Riscv64, Some(dir.path())).unwrap();
        assert_eq!(
            fw,
            Firmware::OpenSbiUboot {
                opensbi: dir.path().join("riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin"),
                uboot: dir.path().join("u-boot/qemu-riscv64_smode/u-boot.bin"),
            }
        );
    }

    #[test]
    fn missing_firmware_names_the_files_and_the_package() {
        let empty = tempfile::tempdir().unwrap();
        for (arch, file, package) in [
            (Arch::X86_64, "OVMF_CODE_4M.fd", "ovmf"),
            (Arch::Aarch64, "AAVMF_VARS.fd", "qemu-efi-aarch64"),
            (Arch::Riscv64, "u-boot.bin", "opensbi u-boot-qemu"),
        ] {
            let err = find_firmware(arch, Some(empty.path())).unwrap_err();
            let typed = err.downcast_ref::<FirmwareNotFound>().expect("typed error");
            assert_eq!(typed.package, package);
            let msg = err.to_string();
            assert!(msg.contains(file) && msg.contains(&format!("`{package}`")), "{msg}");
            assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
            // The command line is not built without firmware either.
            let work = tempfile::tempdir().unwrap();
            let spec = VmSpec { firmware_dir: Some(empty.path().to_path_buf()), ..VmSpec::new(arch) };
            assert!(command(&spec, work.path()).is_err());
        }
    }

    #[test]
    fn debian_paths_are_the_fallback() {
        // Only the path list is checked; whether the files exist depends on the host.
        match find_firmware_under(Arch::Riscv64, None) {
            Ok(Firmware::OpenSbiUboot { opensbi, .. }) => {
                assert_eq!(opensbi, Path::new("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin"))
            }
            Ok(other) => panic!("wrong firmware kind {other:?}"),
            Err(e) => assert!(e.looked_for.iter().all(|p| p.starts_with("/usr/lib")), "{e}"),
        }
        match find_firmware_under(Arch::X86_64, None) {
            Ok(Firmware::Pflash { code, .. }) => {
                assert_eq!(code, Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"))
            }
            Ok(other) => panic!("wrong firmware kind {other:?}"),
            Err(e) => assert!(e.looked_for.iter().all(|p| p.starts_with("/usr/share")), "{e}"),
        }
    }
}
