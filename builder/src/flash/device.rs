//! What `kiln flash` knows about its target before writing: for a block device, its model, size,
//! removability, partitions and their mounts, and whether the running system booted from it (from
//! `/sys/block` and `/proc/self/mountinfo`, whose roots are injectable for tests); for a regular
//! file, its size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where sysfs and procfs are (`/sys`, `/proc`; a fixture directory in tests).
#[derive(Debug, Clone)]
pub struct HostRoots {
    pub sys: PathBuf,
    pub proc: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        HostRoots { sys: "/sys".into(), proc: "/proc".into() }
    }
}

/// The target of a flash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A regular file (or a path that does not exist yet); `size` is 0 for a new file.
    File { path: PathBuf, exists: bool, size: u64 },
    /// A block device: a whole disk, or a partition of `disk`.
    Block(BlockFacts),
}

/// What sysfs and mountinfo say about a block device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockFacts {
    /// The path the user named (`/dev/sdb`).
    pub path: PathBuf,
    /// The kernel's name (`sdb`, `mmcblk0`, `nvme0n1p2`).
    pub name: String,
    /// For a partition: the disk it is on.
    pub partition_of: Option<String>,
    pub size: u64,
    /// "vendor model" as the device reports it, trimmed.
    pub model: String,
    /// `removable` is 1, or an SD card (MMC block devices report `removable` 0 even in a slot).
    pub removable: bool,
    pub read_only: bool,
    pub partitions: Vec<PartitionFacts>,
    /// Mount points of the device, its partitions and anything stacked on them (dm, md).
    pub mounts: Vec<String>,
    /// The disk holding the running system's `/`.
    pub boot_disk: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFacts {
    pub name: String,
    pub size: u64,
    pub mounts: Vec<String>,
}

/// Inspects the target path: a block device through sysfs, else a regular file.
pub fn inspect(path: &Path, roots: &HostRoots) -> Result<Target> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Target::File { path: path.into(), exists: false, size: 0 });
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if meta.file_type().is_block_device() {
        use std::os::unix::fs::MetadataExt;
        let rdev = meta.rdev();
        let devnum = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
        let name = name_of_devnum(&devnum, roots)?
            .with_context(|| format!("{}: block device {devnum} is not in {}/block", path.display(), roots.sys.display()))?;
        let mut facts = inspect_block(&name, roots)?;
        facts.path = path.into();
        Ok(Target::Block(facts))
    } else if meta.is_file() {
        Ok(Target::File { path: path.into(), exists: true, size: meta.len() })
    } else {
        anyhow::bail!("{}: neither a block device nor a regular file", path.display())
    }
}

/// The sysfs facts of block device `name` (a disk or a partition).
pub fn inspect_block(name: &str, roots: &HostRoots) -> Result<BlockFacts> {
    let block = roots.sys.join("block");
    let devices = all_devices(roots)?;
    let dev = devices.iter().find(|d| d.name == name).with_context(|| format!("no block device {name} in {}", block.display()))?;
    let disk_dir = block.join(dev.disk.as_deref().unwrap_or(name));
    let dir = match &dev.disk {
        Some(_) => disk_dir.join(name),
        None => disk_dir.clone(),
    };
    let mountinfo = read_mountinfo(roots)?;
    let mounts_of = |n: &str| -> Vec<String> {
        let d = devices.iter().find(|d| d.name == n);
        let mut holders = vec![n.to_string()];
        holders.extend(holders_of(&roots.sys, n));
        let mut out: Vec<String> = mountinfo
            .iter()
            .filter(|m| d.is_some_and(|d| d.devnum == m.devnum) || holders.iter().any(|h| m.source == format!("/dev/{h}")))
            .map(|m| m.mountpoint.clone())
            .collect();
        // Mounts of devices stacked on this one (dm-crypt, LVM, md).
        for h in &holders[1..] {
            if let Some(hd) = devices.iter().find(|d| &d.name == h) {
                out.extend(mountinfo.iter().filter(|m| m.devnum == hd.devnum).map(|m| m.mountpoint.clone()));
            }
        }
        out.sort();
        out.dedup();
        out
    };
    let mut facts = BlockFacts {
        path: PathBuf::from("/dev").join(name),
        name: name.into(),
        partition_of: dev.disk.clone(),
        size: read_u64(&dir.join("size"))? * 512,
        read_only: read_u64(&dir.join("ro")).unwrap_or(0) == 1,
        ..Default::default()
    };
    let disk_name = dev.disk.clone().unwrap_or_else(|| name.into());
    let sd_card = read_trimmed(&disk_dir.join("device/type")).as_deref() == Some("SD");
    facts.removable = read_u64(&disk_dir.join("removable")).unwrap_or(0) == 1 || sd_card;
    let vendor = read_trimmed(&disk_dir.join("device/vendor")).unwrap_or_default();
    let model = read_trimmed(&disk_dir.join("device/model")).or_else(|| read_trimmed(&disk_dir.join("device/name"))).unwrap_or_default();
    facts.model = [vendor, model].iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>().join(" ");
    if dev.disk.is_none() {
        for p in devices.iter().filter(|d| d.disk.as_deref() == Some(name)) {
            facts.partitions.push(PartitionFacts {
                name: p.name.clone(),
                size: read_u64(&disk_dir.join(&p.name).join("size")).unwrap_or(0) * 512,
                mounts: mounts_of(&p.name),
            });
        }
    }
    facts.mounts = mounts_of(name);
    for p in &facts.partitions {
        facts.mounts.extend(p.mounts.iter().cloned());
    }
    facts.mounts.sort();
    facts.mounts.dedup();
    // The boot disk: the disk under the mount of `/` (through partitions and stacked devices).
    if let Some(root) = mountinfo.iter().rev().find(|m| m.mountpoint == "/") {
        let root_dev = devices
            .iter()
            .find(|d| d.devnum == root.devnum)
            .or_else(|| root.source.strip_prefix("/dev/").and_then(|s| devices.iter().find(|d| d.name == s)));
        if let Some(rd) = root_dev {
            facts.boot_disk = underlying_disks(&rd.name, &devices, &roots.sys).contains(&disk_name);
        }
    }
    Ok(facts)
}

/// One entry of /sys/block: a disk, or a partition of `disk`.
#[derive(Debug)]
struct Device {
    name: String,
    disk: Option<String>,
    devnum: String,
}

fn all_devices(roots: &HostRoots) -> Result<Vec<Device>> {
    let block = roots.sys.join("block");
    let mut out = Vec::new();
    let entries = std::fs::read_dir(&block).with_context(|| format!("listing {}", block.display()))?;
    for e in entries.flatten() {
        let disk = e.file_name().to_string_lossy().into_owned();
        let dir = block.join(&disk);
        out.push(Device { name: disk.clone(), disk: None, devnum: read_trimmed(&dir.join("dev")).unwrap_or_default() });
        // Partitions are the subdirectories with a `partition` file.
        for p in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let pdir = p.path();
            if pdir.join("partition").is_file() {
                out.push(Device {
                    name: p.file_name().to_string_lossy().into_owned(),
                    disk: Some(disk.clone()),
                    devnum: read_trimmed(&pdir.join("dev")).unwrap_or_default(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn name_of_devnum(devnum: &str, roots: &HostRoots) -> Result<Option<String>> {
    Ok(all_devices(roots)?.into_iter().find(|d| d.devnum == devnum).map(|d| d.name))
}

/// Devices stacked on `name` (its `holders/`, recursively: a partition's dm-crypt, LVM on that).
fn holders_of(sys: &Path, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        let dir = sys.join("class/block").join(&n).join("holders");
        for h in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let h = h.file_name().to_string_lossy().into_owned();
            if !out.contains(&h) {
                todo.push(h.clone());
                out.push(h);
            }
        }
    }
    out
}

/// The whole disks beneath a device: itself, a partition's disk, or a dm/md device's `slaves/`.
fn underlying_disks(name: &str, devices: &[Device], sys: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![name.to_string()];
    let mut seen = 0;
    while let Some(n) = todo.pop() {
        seen += 1;
        if seen > 64 {
            break;
        }
        let d = devices.iter().find(|d| d.name == n);
        if let Some(disk) = d.and_then(|d| d.disk.clone()) {
            todo.push(disk);
            continue;
        }
        let slaves: Vec<String> = std::fs::read_dir(sys.join("block").join(&n).join("slaves"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|s| s.file_name().to_string_lossy().into_owned())
            .collect();
        if slaves.is_empty() {
            out.push(n);
        } else {
            todo.extend(slaves);
        }
    }
    out
}

struct Mount {
    devnum: String,
    mountpoint: String,
    source: String,
}

/// `/proc/self/mountinfo`: field 3 is major:minor, field 5 the mount point, the source follows
/// the ` - fstype` separator. Mount points escape spaces as `\040`.
fn read_mountinfo(roots: &HostRoots) -> Result<Vec<Mount>> {
    let path = roots.proc.join("self/mountinfo");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let (head, tail) = match line.split_once(" - ") {
            Some(x) => x,
            None => continue,
        };
        let f: Vec<&str> = head.split(' ').collect();
        if f.len() < 5 {
            continue;
        }
        let source = tail.split(' ').nth(1).unwrap_or("").to_string();
        out.push(Mount { devnum: f[2].into(), mountpoint: unescape(f[4]), source });
    }
    Ok(out)
}

fn unescape(s: &str) -> String {
    let map: HashMap<&str, &str> = [("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")].into_iter().collect();
    let mut out = s.to_string();
    for (k, v) in map {
        out = out.replace(k, v);
    }
    out
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn read_u64(p: &Path) -> Result<u64> {
    let s = read_trimmed(p).with_context(|| format!("reading {}", p.display()))?;
    s.parse().with_context(|| format!("{}: {s:?} is not a number", p.display()))
}
