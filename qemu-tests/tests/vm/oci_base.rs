//! Slow tier: a base OS from an OCI image (`os: {image: ...}`), against a real registry.
//!
//! The test makes an x86_64 OS image itself from Debian trixie packages (each package's
//! `data.tar` one layer: `busybox-static` plain, the kernel `linux-image-*-amd64` gzip), plus a
//! small zstd layer of test files and a layer that deletes some of them (a `.wh.` whiteout and an
//! opaque directory), and pushes it to Debian's `docker-registry` on 127.0.0.1 with skopeo. Then:
//!
//! - a profile with `os.image` builds, the root squashfs shows the whiteouts took effect
//!   (`unsquashfs -lls`), the manifest records the image, and the image boots in QEMU to
//!   `[kiln] ready`;
//! - an image with a path-traversal layer (`../../etc/evil`) fails the build with an error naming
//!   the image, the layer and the entry, and leaves no image;
//! - an image without a kernel fails with an error naming the image and the paths looked at.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::manifest::InputKind;
use kiln::qemu::{Disk, Vm, VmSpec};
use kiln_qemu_tests::layout::{deb_data_tar, raw_tar, Layer, TestLayout};
use kiln_qemu_tests::registry::{push, sha, Registry};
use kiln_qemu_tests::{cache_dir, extract_range, kiln_with_cache, manifest, tool, wait_ready, work_dir, BOOT_TIMEOUT};

fn s(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 work dir")
}

/// The Debian packages the OS image is made of, fetched (and verified) through kiln's own
/// Debian code into the tier's cache: `busybox-static` and the kernel `linux-image-amd64` names.
fn debian_packages() -> Result<(PathBuf, PathBuf)> {
    let fetcher =
        kiln::fetch::Fetcher { offline: false, cache: kiln::cache::Cache::new(cache_dir()?), progress: false, trust: Default::default() };
    let suite = kiln::debian::Suite {
        mirror: kiln::debian::host_debian_mirror(Path::new("/etc/apt"))?,
        suite: "trixie".into(),
        keyring: PathBuf::from("/usr/share/keyrings/debian-archive-keyring.gpg"),
    };
    let index = kiln::debian::load_index(&fetcher, &suite, "amd64")?;
    let kernel = kiln::pipeline::kernel_package(&index, kiln::arch::Arch::X86_64)?;
    let fetch = |name: &str| -> Result<PathBuf> {
        let p = index.packages.versions(name).first().with_context(|| format!("no {name} in trixie"))?.clone();
        kiln::debian::fetch_deb(&fetcher, &suite, &p)
    };
    Ok((fetch("busybox-static")?, kiln::debian::fetch_deb(&fetcher, &suite, &kernel)?))
}

fn compressed(tar: Vec<u8>, program: &str, media_type: &'static str, dir: &Path) -> Result<Layer> {
    let path = dir.join(format!("layer-{}.tar", sha(&tar)));
    std::fs::write(&path, &tar)?;
    let out = Command::new(program).args(["-q", "-c", "-1"]).arg(&path).output().with_context(|| format!("running {program}"))?;
    ensure!(out.status.success(), "{program} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(Layer { media_type, diff_id: sha(&tar), blob: out.stdout })
}

/// Writes a single-platform (linux/amd64) OCI layout, tag `1`, of `layers` bottom first.
fn write_layout(layout: &Path, layers: &[Layer]) -> Result<()> {
    let l = TestLayout::create(layout)?;
    let image = l.image("amd64", layers, serde_json::json!({}))?;
    l.tag(&image.descriptor)
}

fn profile(dir: &Path, name: &str, host: &str, reference: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!("name: {name}\narch: [x86_64]\nos:\n  image: {reference}\nimage_registries:\n  \"{host}\": {{insecure_http: true}}\n"),
    )?;
    Ok(path)
}

/// Builds a profile expected to fail; returns kiln's `error:` output after checking no image was left.
fn build_fails(dir: &Path, name: &str, host: &str, reference: &str) -> Result<String> {
    let p = profile(dir, name, host, reference)?;
    let out = dir.join(format!("out-{name}"));
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", s(&p)?, "--out", s(&out)?])?;
    ensure!(code != 0, "the {name} build succeeded:\n{log}");
    ensure!(!out.join("x86_64/disk.img").exists(), "the failed {name} build left an image");
    eprintln!("{name}: {}", log.lines().find(|l| l.starts_with("error:")).unwrap_or("(no error line)"));
    Ok(log)
}

#[test]
fn an_os_image_from_a_registry_builds_and_boots() -> Result<()> {
    let dir = work_dir("oci-base")?;
    let registry = Registry::start(&dir)?;
    let host = registry.host();
    let (busybox, kernel) = debian_packages()?;

    let files = compressed(
        raw_tar(&[
            ("etc/kiln-oci-test/", b""),
            ("etc/kiln-oci-test/kept", b"kept\n"),
            ("etc/kiln-oci-test/gone", b"deleted by a whiteout\n"),
            ("etc/kiln-oci-test/opaque/", b""),
            ("etc/kiln-oci-test/opaque/old", b"hidden by an opaque directory\n"),
        ]),
        "zstd",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        &dir,
    )?;
    let whiteouts = Layer::plain(raw_tar(&[
        ("etc/kiln-oci-test/.wh.gone", b""),
        ("etc/kiln-oci-test/opaque/", b""),
        ("etc/kiln-oci-test/opaque/.wh..wh..opq", b""),
        ("etc/kiln-oci-test/opaque/new", b"above the opaque marker\n"),
    ]));
    let kernel_layer = compressed(deb_data_tar(&kernel)?, "gzip", "application/vnd.oci.image.layer.v1.tar+gzip", &dir)?;
    eprintln!("kernel layer: {} MiB gzip", kernel_layer.blob.len() >> 20);
    write_layout(&dir.join("os"), &[Layer::plain(deb_data_tar(&busybox)?), kernel_layer, files, whiteouts])?;
    push(&dir.join("os"), &format!("{host}/kiln-test/os:1"))?;

    // The good image: builds, with the whiteouts applied, and boots.
    let reference = format!("{host}/kiln-test/os:1");
    let p = profile(&dir, "ocibase", &host, &reference)?;
    let out = dir.join("out");
    let started = Instant::now();
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", s(&p)?, "--out", s(&out)?])?;
    ensure!(code == 0, "kiln build failed (exit {code}):\n{log}");
    eprintln!("OS-image build: {:.1} s", started.elapsed().as_secs_f64());
    if let Some(l) = log.lines().find(|l| l.contains("layers flattened")) {
        eprintln!("{l}");
    }
    let m = manifest(&out, Arch::X86_64)?;
    ensure!(m.inputs.iter().any(|i| i.kind == InputKind::Oci && i.name == reference), "manifest inputs: {:?}", m.inputs);
    ensure!(
        !m.inputs.iter().any(|i| i.kind == InputKind::Deb && i.name.starts_with("linux-image")),
        "a Debian kernel was installed: {:?}",
        m.inputs
    );
    let root = m.partitions.iter().find(|p| p.name == "kiln-root-a").context("no kiln-root-a")?;
    let sqfs = dir.join("root.sqfs");
    extract_range(&out.join("x86_64/disk.img"), root.offset, root.content_size.context("empty root")?, &sqfs)?;
    let listing = tool(Command::new("unsquashfs").arg("-lls").arg(&sqfs), "squashfs-tools")?;
    let has = |p: &str| listing.lines().any(|l| l.ends_with(&format!("squashfs-root/{p}")));
    ensure!(has("etc/kiln-oci-test/kept") && has("etc/kiln-oci-test/opaque/new"), "the image's files are missing:\n{listing}");
    ensure!(!has("etc/kiln-oci-test/gone"), "the whiteout did not delete etc/kiln-oci-test/gone");
    ensure!(!has("etc/kiln-oci-test/opaque/old"), "the opaque directory kept the lower layer's file");
    ensure!(!listing.contains(".wh."), "whiteout markers reached the root");
    ensure!(!has("boot") && listing.contains("squashfs-root/usr/lib/modules/"), "kernel placement: /boot should be gone, modules kept");

    let mut spec = VmSpec::new(Arch::X86_64);
    spec.disks = vec![Disk { path: out.join("x86_64/disk.img"), snapshot: true }];
    let mut vm = Vm::start(&spec, &dir.join("console.log"))?;
    wait_ready(&mut vm, "OS-image appliance (x86_64)", BOOT_TIMEOUT)?;
    drop(vm);

    // A path-traversal layer: refused, naming image, layer and entry; no image.
    let evil = Layer::plain(raw_tar(&[("../../etc/evil", b"outside the root\n")]));
    let evil_digest = sha(&evil.blob);
    write_layout(&dir.join("evil"), &[evil])?;
    push(&dir.join("evil"), &format!("{host}/kiln-test/evil:1"))?;
    let log = build_fails(&dir, "evil", &host, &format!("{host}/kiln-test/evil:1"))?;
    ensure!(
        log.contains(&format!("image `{host}/kiln-test/evil:1`"))
            && log.contains(&format!("layer sha256:{evil_digest}"))
            && log.contains("entry `../../etc/evil`")
            && log.contains("`..`"),
        "{log}"
    );

    // No kernel: the image and the paths looked at are named.
    let bare = Layer::plain(raw_tar(&[("etc/", b""), ("etc/os-release", b"ID=bare\n")]));
    write_layout(&dir.join("bare"), &[bare])?;
    push(&dir.join("bare"), &format!("{host}/kiln-test/bare:1"))?;
    let log = build_fails(&dir, "bare", &host, &format!("{host}/kiln-test/bare:1"))?;
    ensure!(
        log.contains(&format!("image `{host}/kiln-test/bare:1` has no kernel"))
            && log.contains("/boot/vmlinuz-<version>")
            && log.contains("/usr/lib/modules/<version>/vmlinuz"),
        "{log}"
    );
    Ok(())
}
