//! Benchmark: kiln's FAT32 and GPT writers against the reference tools on the same input.
//!
//! `cargo run --release -p kiln --example bench_formats [MiB [MANIFEST]]` prints wall times and
//! ratios for
//! - an ESP of MiB (default 64) of file data: kiln `fat::write_fat32` vs `mkfs.vfat` + `mcopy`;
//! - a 3-partition GPT on a 4 GiB sparse disk: kiln `gpt::write_gpt` vs `sgdisk` (-n/-t/-c/-u);
//! - with a build's MANIFEST (`out/<name>/<arch>/manifest.json`): unpacking every package it
//!   records, read from the cache (`KILN_CACHE_DIR`, else the default), kiln `deb::unpack_deb`
//!   into a tree with a spill file (as a build does, without reuse) vs `dpkg-deb -x` into a
//!   directory.
//!
//! Each figure is the median of 5 runs. The squashfs comparison is `examples/bench_squashfs.rs`.

use std::process::Command;
use std::time::{Duration, Instant};

use kiln::gpt::{Guid, PartitionSpec};
use kiln::tree::Tree;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<F: FnMut()>(mut f: F) -> Duration {
    let runs = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    median(runs)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (install dosfstools, mtools, gdisk)"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn main() {
    let mib: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    if let Some(manifest) = std::env::args().nth(2) {
        unpack_vs_dpkg_deb(std::path::Path::new(&manifest));
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");

    // Input: a kernel-sized file, an initrd-sized file and some small config files.
    let mut tree = Tree::new();
    let mut seed = 1u64;
    let mut data = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 33) as u8
            })
            .collect()
    };
    let big = (mib as usize * 3 / 4) << 20;
    let files: Vec<(String, Vec<u8>)> = vec![
        ("EFI/BOOT/BOOTX64.EFI".into(), data(120 << 10)),
        ("kiln/vmlinuz".into(), data(big)),
        ("kiln/initrd".into(), data(((mib as usize) << 20) / 8)),
        ("loader/loader.conf".into(), b"timeout 0\n".to_vec()),
        ("loader/entries/kiln.conf".into(), b"title kiln\n".to_vec()),
    ];
    for (p, d) in &files {
        tree.add_file(p, 0o644, d.clone()).unwrap();
        let host = src.join(p);
        std::fs::create_dir_all(host.parent().unwrap()).unwrap();
        std::fs::write(host, d).unwrap();
    }
    let size = kiln::fat::fat32_size_for(&tree, 8 << 20).unwrap();

    let kiln_img = dir.path().join("kiln-esp.img");
    let kiln_fat = time(|| {
        let mut f = std::fs::File::create(&kiln_img).unwrap();
        f.set_len(size).unwrap();
        kiln::fat::write_fat32(&mut f, size, &tree, &kiln::fat::FatOptions { volume_id: 1, label: "KILN-ESP".into(), mtime: 0 }).unwrap();
        f.sync_all().unwrap();
    });
    let ref_img = dir.path().join("ref-esp.img");
    let ref_fat = time(|| {
        let _ = std::fs::remove_file(&ref_img);
        run(Command::new("mkfs.vfat").args(["-F", "32", "-C"]).arg(&ref_img).arg((size / 1024).to_string()));
        for top in ["EFI", "kiln", "loader"] {
            run(Command::new("mcopy").args(["-s", "-i"]).arg(&ref_img).arg(src.join(top)).arg("::/"));
        }
        std::fs::File::open(&ref_img).unwrap().sync_all().unwrap();
    });
    println!(
        "FAT32 ESP {} MiB: kiln {:.3} s, mkfs.vfat+mcopy {:.3} s, ratio kiln/reference {:.2}",
        size >> 20,
        kiln_fat.as_secs_f64(),
        ref_fat.as_secs_f64(),
        kiln_fat.as_secs_f64() / ref_fat.as_secs_f64()
    );

    let disk = 4u64 << 30;
    let parts: Vec<PartitionSpec> = ["esp", "kiln-root-a", "kiln-root-b"]
        .iter()
        .map(|n| PartitionSpec {
            name: n.to_string(),
            type_guid: kiln::gpt::LINUX_DATA_TYPE.parse().unwrap(),
            guid: Guid::derive("bench", &[n.as_bytes()]),
            size: 512 << 20,
            attributes: 0,
        })
        .collect();
    let layout = kiln::gpt::plan(&parts, Some(disk), 0).unwrap();
    let gpt_img = dir.path().join("gpt.img");
    let kiln_gpt = time(|| {
        let mut f = std::fs::File::create(&gpt_img).unwrap();
        f.set_len(disk).unwrap();
        kiln::gpt::write_gpt(&mut f, &layout, Guid::derive("bench", &[b"disk"])).unwrap();
        f.sync_all().unwrap();
    });
    let ref_gpt = time(|| {
        let f = std::fs::File::create(&gpt_img).unwrap();
        f.set_len(disk).unwrap();
        let mut cmd = Command::new("sgdisk");
        for (i, p) in layout.partitions.iter().enumerate() {
            let n = i + 1;
            cmd.arg(format!("-n{n}:{}:{}", p.first_lba, p.last_lba))
                .arg(format!("-t{n}:{}", p.type_guid))
                .arg(format!("-c{n}:{}", p.name))
                .arg(format!("-u{n}:{}", p.guid));
        }
        run(cmd.arg(&gpt_img));
    });
    println!(
        "GPT 3 partitions on 4 GiB: kiln {:.4} s, sgdisk {:.4} s, ratio kiln/reference {:.2}",
        kiln_gpt.as_secs_f64(),
        ref_gpt.as_secs_f64(),
        kiln_gpt.as_secs_f64() / ref_gpt.as_secs_f64()
    );
}

/// Every package a build's manifest records: kiln's unpack vs `dpkg-deb -x`.
fn unpack_vs_dpkg_deb(manifest: &std::path::Path) {
    let text = std::fs::read_to_string(manifest).unwrap_or_else(|e| panic!("{}: {e}", manifest.display()));
    let m: kiln::manifest::Manifest = serde_json::from_str(&text).unwrap();
    let cache = kiln::cache::Cache::new(kiln::cache::Cache::default_root().unwrap());
    let debs: Vec<std::path::PathBuf> = m
        .inputs
        .iter()
        .filter(|i| i.kind == kiln::manifest::InputKind::Deb)
        .map(|i| cache.blob_path(&i.sha256).unwrap())
        .filter(|p| p.exists())
        .collect();
    let bytes: u64 = debs.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    let dir = tempfile::tempdir().unwrap();
    let kiln_unpack = time(|| {
        let spill = kiln::spill::Spill::create_in(dir.path()).unwrap();
        let mut tree = Tree::merged_usr(m.arch).spill_to(spill);
        for deb in &debs {
            kiln::deb::unpack_deb(deb, &mut tree).unwrap();
        }
    });
    let target = dir.path().join("dpkg");
    let ref_unpack = time(|| {
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(&target).unwrap();
        for deb in &debs {
            run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&target));
        }
    });
    println!(
        "{} packages ({} MiB) of {}: kiln unpack {:.2} s, dpkg-deb -x {:.2} s, ratio kiln/reference {:.2}",
        debs.len(),
        bytes >> 20,
        manifest.display(),
        kiln_unpack.as_secs_f64(),
        ref_unpack.as_secs_f64(),
        kiln_unpack.as_secs_f64() / ref_unpack.as_secs_f64()
    );
}
