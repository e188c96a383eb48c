//! Slow tier, build only (no VM): `profiles/single-server.yaml` built for x86_64 with a stand-in
//! k3s asset directory (files named like the release assets, random contents, a matching
//! `sha256sum-amd64.txt`) places the verified files in the image, records them in the manifest,
//! and rebuilds offline without the directory. Nothing here runs k3s: the stand-ins are not k3s.
//!
//! The profile is copied with the made-up release name `v0.0.0+k3s0`, so the cache refs the
//! stand-ins leave in the tier's shared cache can never be taken for a real release's.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::manifest::InputKind;
use kiln_qemu_tests::registry::sha;
use kiln_qemu_tests::{cache_dir, extract_range, kiln_with_cache, manifest, stand_in, tool, work_dir};

/// Stand-in assets with a fresh seed, so each run's digests are new.
fn stand_in_assets(dir: &Path) -> Result<PathBuf> {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    stand_in::assets(dir, &seed.to_string())
}

/// Copies `profiles/<name>.yaml` into `dir` with the stand-in release name.
fn stand_in_profile(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, stand_in::profile_text(name)?)?;
    Ok(path)
}

#[test]
fn single_server_build_places_verified_k3s_assets() -> Result<()> {
    let dir = work_dir("k3s-assets-build")?;
    let assets = stand_in_assets(&dir)?;
    let profile_path = stand_in_profile(&dir, "single-server")?;

    let out = dir.join("out");
    build_with(&profile_path, &assets, &out, "single-server")?;

    let m = manifest(&out, Arch::X86_64)?;
    let k3s: Vec<_> = m.inputs.iter().filter(|i| i.kind == InputKind::K3s).collect();
    ensure!(k3s.len() == 2, "manifest k3s inputs: {k3s:?}");
    ensure!(k3s.iter().all(|i| i.version.as_deref() == Some(stand_in::VERSION)), "{k3s:?}");

    // The root partition's squashfs, listed by the reference tool.
    let sqfs = root_squashfs(&m, &out, &dir)?;
    let listing = tool(Command::new("unsquashfs").arg("-lls").arg(&sqfs), "squashfs-tools")?;
    let line = |suffix: &str| listing.lines().find(|l| l.ends_with(suffix)).map(str::to_string);
    let bin = line("squashfs-root/usr/local/bin/k3s").context("no /usr/local/bin/k3s in the root")?;
    ensure!(bin.starts_with("-rwxr-xr-x root/root"), "{bin}");
    let link = line("-> /usr/lib/kiln/k3s/k3s-airgap-images-amd64.tar.zst").context("no air-gap archive link")?;
    ensure!(link.contains("var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst"), "{link}");
    let got = Command::new("unsquashfs").arg("-cat").arg(&sqfs).arg("usr/local/bin/k3s").output()?;
    ensure!(got.status.success(), "unsquashfs -cat: {got:?}");
    ensure!(sha(&got.stdout) == sha(&std::fs::read(assets.join("k3s"))?), "the placed binary is not the verified one");

    // Offline, without the directory: from the cache refs.
    std::fs::remove_dir_all(&assets)?;
    let out2 = dir.join("out-offline");
    let o2 = out2.to_str().context("non-UTF-8 work dir")?;
    let (code, log) = kiln_with_cache(
        &cache_dir()?,
        &["build", profile_path.to_str().context("non-UTF-8 work dir")?, "--arch", "x86_64", "--offline", "--out", o2],
    )?;
    ensure!(code == 0, "offline kiln build failed (exit {code}):\n{log}");
    Ok(())
}

/// The other example cluster profiles build too (x86_64), and the external-etcd layout's image
/// carries etcd and its supervisor.
/// `kiln build PROFILE --arch x86_64 --k3s-assets ASSETS --out OUT`, which must succeed.
fn build_with(profile: &Path, assets: &Path, out: &Path, name: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let s = |p: &Path| p.to_str().context("non-UTF-8 work dir").map(str::to_string);
    let (code, log) =
        kiln_with_cache(&cache_dir()?, &["build", &s(profile)?, "--arch", "x86_64", "--k3s-assets", &s(assets)?, "--out", &s(out)?])?;
    ensure!(code == 0, "kiln build {name} failed (exit {code}):\n{log}");
    eprintln!("{name} x86_64 build with stand-in k3s assets: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The x86_64 image's root squashfs, extracted into `dir` for `unsquashfs`.
fn root_squashfs(m: &kiln::manifest::Manifest, out: &Path, dir: &Path) -> Result<PathBuf> {
    let root = m.partitions.iter().find(|p| p.name == "kiln-root-a").context("no kiln-root-a")?;
    let sqfs = dir.join("root.sqfs");
    extract_range(&out.join("x86_64/disk.img"), root.offset, root.content_size.context("empty root")?, &sqfs)?;
    Ok(sqfs)
}

#[test]
fn every_example_cluster_profile_builds_with_k3s_assets() -> Result<()> {
    let dir = work_dir("k3s-assets-examples")?;
    let assets = stand_in_assets(&dir)?;
    // agents-only joins an existing cluster: its token file is the operator's.
    std::fs::write(dir.join("edge.token"), "K10stand-in-token-of-an-existing-cluster\n")?;
    for name in ["ha-embedded-etcd", "ha-external-etcd", "agents-only"] {
        let profile = stand_in_profile(&dir, name)?;
        let out = dir.join(format!("out-{name}"));
        build_with(&profile, &assets, &out, name)?;
        let m = manifest(&out, Arch::X86_64)?;
        let etcd = m.inputs.iter().any(|i| i.kind == InputKind::Deb && i.name == "etcd-server");
        ensure!(etcd == (name == "ha-external-etcd"), "{name}: etcd-server in the inputs: {etcd}");
        if name == "ha-external-etcd" {
            let sqfs = root_squashfs(&m, &out, &dir)?;
            let inittab = Command::new("unsquashfs").arg("-cat").arg(&sqfs).arg("etc/inittab").output()?;
            let inittab = String::from_utf8_lossy(&inittab.stdout);
            for entry in ["::respawn:/usr/lib/kiln/etcd-run", "::respawn:/usr/lib/kiln/k3s-run", "::once:/usr/lib/kiln/await-roles"] {
                ensure!(inittab.contains(entry), "{name}: /etc/inittab lacks {entry}:\n{inittab}");
            }
            let _ = std::fs::remove_file(&sqfs);
        }
    }
    Ok(())
}

/// `profiles/k3s-apps.yaml` (manifests, a chart directory, registries) builds with stand-in k3s
/// assets, and its root holds the rendered manifests, the packed chart with its `HelmChart`, and
/// `registries.yaml` (0600). The copy drops the profile's `images` (Docker Hub cannot be reached
/// here; `oci_images.rs` tests bundling against a local registry) and keeps everything else,
/// with the profile's `k3s-apps/` directory beside it.
#[test]
fn k3s_apps_example_places_manifests_chart_and_registries() -> Result<()> {
    let dir = work_dir("k3s-assets-apps")?;
    let assets = stand_in_assets(&dir)?;
    let profile = stand_in_profile(&dir, "k3s-apps")?;
    let text = std::fs::read_to_string(&profile)?;
    ensure!(text.contains("images:\n  - docker.io/library/busybox:1.36\n"), "profiles/k3s-apps.yaml lists other images");
    std::fs::write(&profile, text.replace("images:\n  - docker.io/library/busybox:1.36\n", "images: []\n"))?;
    tool(Command::new("cp").arg("-r").arg(kiln_qemu_tests::repo_root().join("profiles/k3s-apps")).arg(&dir), "coreutils")?;

    let out = dir.join("out");
    build_with(&profile, &assets, &out, "k3s-apps")?;

    let m = manifest(&out, Arch::X86_64)?;
    let charts: Vec<_> = m.inputs.iter().filter(|i| i.kind == InputKind::Chart).collect();
    ensure!(charts.len() == 1 && charts[0].version.as_deref() == Some("0.1.0"), "manifest chart inputs: {charts:?}");
    let sqfs = root_squashfs(&m, &out, &dir)?;
    let listing = tool(Command::new("unsquashfs").arg("-lls").arg(&sqfs), "squashfs-tools")?;
    let cat = |path: &str| -> Result<Vec<u8>> {
        let got = Command::new("unsquashfs").arg("-cat").arg(&sqfs).arg(path).output()?;
        ensure!(got.status.success(), "unsquashfs -cat {path}: {got:?}");
        Ok(got.stdout)
    };
    let line = |suffix: &str| listing.lines().find(|l| l.ends_with(suffix)).map(str::to_string);

    let site = String::from_utf8(cat("var/lib/rancher/k3s/server/manifests/site-info.yaml")?)?;
    ensure!(site.contains("site: \"depot-7\"") && site.contains("arch: \"x86_64\""), "site-info.yaml not rendered:\n{site}");
    ensure!(line("var/lib/rancher/k3s/server/manifests/namespace.yaml").is_some(), "no namespace.yaml");
    ensure!(line("site-info.yaml.hbs").is_none(), "the template itself was installed");

    let tgz = cat("var/lib/rancher/k3s/server/static/charts/hello-0.1.0.tgz")?;
    ensure!(sha(&tgz) == charts[0].sha256, "the placed chart is not the one recorded in the manifest");
    let tgz_path = dir.join("hello.tgz");
    std::fs::write(&tgz_path, &tgz)?;
    let members = tool(Command::new("tar").arg("-tzf").arg(&tgz_path), "tar")?;
    ensure!(
        members.lines().any(|l| l == "hello/Chart.yaml") && members.lines().any(|l| l == "hello/templates/deployment.yaml"),
        "chart archive members:\n{members}"
    );
    let hc = String::from_utf8(cat("var/lib/rancher/k3s/server/manifests/chart-hello.yaml")?)?;
    for want in
        ["kind: HelmChart", "https://%{KUBERNETES_API}%/static/charts/hello-0.1.0.tgz", "targetNamespace: depot", "hello from the depot"]
    {
        ensure!(hc.contains(want), "HelmChart lacks {want}:\n{hc}");
    }

    let reg = line("etc/rancher/k3s/registries.yaml").context("no /etc/rancher/k3s/registries.yaml")?;
    ensure!(reg.starts_with("-rw------- root/root"), "{reg}");
    let reg = String::from_utf8(cat("etc/rancher/k3s/registries.yaml")?)?;
    ensure!(reg.contains("https://registry.lan:5000"), "{reg}");
    Ok(())
}

/// A copy of `profiles/<name>.yaml` (stand-in k3s release) in `dir`, with its `images` list
/// dropped (Docker Hub and registry.k8s.io cannot be reached here; `oci_images.rs` tests bundling
/// against a local registry) and its directory beside it.
fn course_profile(dir: &Path, name: &str) -> Result<PathBuf> {
    let profile = stand_in_profile(dir, name)?;
    let text = std::fs::read_to_string(&profile)?;
    let start = text.find("\nimages:\n").with_context(|| format!("profiles/{name}.yaml has no images list"))? + 1;
    let end = text[start..].find("\n\n").map(|e| start + e + 1).context("images list does not end")?;
    let images = &text[start..end];
    ensure!(images.lines().skip(1).all(|l| l.starts_with("  - ")), "{name}: unexpected images block:\n{images}");
    std::fs::write(&profile, format!("{}images: []\n{}", &text[..start], &text[end..]))?;
    tool(Command::new("cp").arg("-r").arg(kiln_qemu_tests::repo_root().join("profiles").join(name)).arg(dir), "coreutils")?;
    Ok(profile)
}

/// The course's layouts as ready profiles (issue 19): `ci-cd`, `edge-stack` and `rancher-import`
/// build with stand-in k3s assets, and their roots hold what each promises, rendered:
/// - ci-cd: the registry manifest with the profile's vars, the NFS provisioner chart from a
///   classic Helm repository (here a stand-in chart of the same name and version in a local
///   repository: the real one cannot be reached), verified against the index digest, its
///   `HelmChart` with the NFS values, the nodes' registry mirror, and `mount.nfs`;
/// - edge-stack: KubeEdge's vendored cloudcore chart packed with its CRDs and templates, and its
///   `HelmChart` with the advertise address;
/// - rancher-import: the import URL as a 0600 secret, the CA, the script and its supervised service.
#[test]
fn course_profiles_build_with_their_charts_and_services() -> Result<()> {
    let dir = work_dir("k3s-assets-course")?;
    let assets = stand_in_assets(&dir)?;

    // A classic Helm repository with a stand-in nfs-subdir-external-provisioner 4.0.18.
    let repo = dir.join("helm-repo");
    let chart_src = dir.join("chart-src/nfs-subdir-external-provisioner");
    std::fs::create_dir_all(chart_src.join("templates"))?;
    std::fs::write(chart_src.join("Chart.yaml"), "apiVersion: v2\nname: nfs-subdir-external-provisioner\nversion: 4.0.18\n")?;
    std::fs::write(chart_src.join("templates/cm.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stand-in}\n")?;
    std::fs::create_dir_all(&repo)?;
    let tgz = repo.join("nfs-subdir-external-provisioner-4.0.18.tgz");
    tool(Command::new("tar").arg("-czf").arg(&tgz).arg("-C").arg(dir.join("chart-src")).arg("nfs-subdir-external-provisioner"), "tar")?;
    let digest = sha(&std::fs::read(&tgz)?);
    std::fs::write(
        repo.join("index.yaml"),
        format!("apiVersion: v1\nentries:\n  nfs-subdir-external-provisioner:\n    - version: 4.0.18\n      digest: {digest}\n      urls: [nfs-subdir-external-provisioner-4.0.18.tgz]\n"),
    )?;
    let repo_url = kiln_qemu_tests::static_http::serve_dir(&repo)?;

    let mut roots = Vec::new();
    for name in ["ci-cd", "edge-stack", "rancher-import"] {
        let profile = course_profile(&dir, name)?;
        if name == "ci-cd" {
            let text = std::fs::read_to_string(&profile)?;
            let real = "https://kubernetes-sigs.github.io/nfs-subdir-external-provisioner";
            ensure!(text.contains(real), "profiles/ci-cd.yaml names another repository");
            std::fs::write(&profile, text.replace(real, &repo_url))?;
        }
        let out = dir.join(format!("out-{name}"));
        build_with(&profile, &assets, &out, name)?;
        let m = manifest(&out, Arch::X86_64)?;
        let sqfs = root_squashfs(&m, &out, &dir.join(name))?;
        roots.push((name, m, sqfs));
    }
    for (name, m, sqfs) in &roots {
        let listing = tool(Command::new("unsquashfs").arg("-lls").arg(sqfs), "squashfs-tools")?;
        let cat = |path: &str| -> Result<String> {
            let got = Command::new("unsquashfs").arg("-cat").arg(sqfs).arg(path).output()?;
            ensure!(got.status.success(), "{name}: unsquashfs -cat {path}: {got:?}");
            Ok(String::from_utf8_lossy(&got.stdout).into_owned())
        };
        let line = |suffix: &str| listing.lines().find(|l| l.ends_with(suffix)).map(str::to_string);
        let manifests = "var/lib/rancher/k3s/server/manifests";
        match *name {
            "ci-cd" => {
                let reg = cat(&format!("{manifests}/registry.yaml"))?;
                ensure!(reg.contains("nodePort: 30500") && reg.contains("storage: 20Gi") && !reg.contains("{{"), "registry.yaml:\n{reg}");
                let chart = m.inputs.iter().find(|i| i.kind == InputKind::Chart).context("ci-cd: no chart input")?;
                ensure!(chart.sha256 == digest, "ci-cd: the chart input is not the repository's archive: {chart:?}");
                let placed = line(".tgz").context("ci-cd: no chart archive in static/charts")?;
                ensure!(placed.contains("static/charts/nfs-"), "{placed}");
                let hc = cat(&format!("{manifests}/chart-nfs-provisioner.yaml"))?;
                for want in ["kind: HelmChart", "targetNamespace: ci", "10.0.0.5", "/srv/nfs/k3s", "defaultClass: true"] {
                    ensure!(hc.contains(want), "ci-cd HelmChart lacks {want}:\n{hc}");
                }
                let mirrors = cat("etc/rancher/k3s/registries.yaml")?;
                ensure!(mirrors.contains("http://10.0.0.51:30500"), "{mirrors}");
                ensure!(line("sbin/mount.nfs").is_some(), "ci-cd: no mount.nfs in the root (nfs-common)");
            }
            "edge-stack" => {
                let placed = line("static/charts/cloudcore-1.23.0.tgz").context("edge-stack: no cloudcore-1.23.0.tgz")?;
                ensure!(!placed.is_empty());
                let tgz_path = dir.join("cloudcore.tgz");
                std::fs::write(
                    &tgz_path,
                    Command::new("unsquashfs")
                        .arg("-cat")
                        .arg(sqfs)
                        .arg("var/lib/rancher/k3s/server/static/charts/cloudcore-1.23.0.tgz")
                        .output()?
                        .stdout,
                )?;
                let members = tool(Command::new("tar").arg("-tzf").arg(&tgz_path), "tar")?;
                for want in
                    ["cloudcore/Chart.yaml", "cloudcore/crds/devices_v1beta1_device.yaml", "cloudcore/templates/deployment_cloudcore.yaml"]
                {
                    ensure!(members.lines().any(|l| l == want), "edge-stack chart lacks {want}:\n{members}");
                }
                let hc = cat(&format!("{manifests}/chart-cloudcore.yaml"))?;
                for want in ["kind: HelmChart", "targetNamespace: kubeedge", "10.0.0.41"] {
                    ensure!(hc.contains(want), "edge-stack HelmChart lacks {want}:\n{hc}");
                }
            }
            _ => {
                let url = line("etc/kiln/rancher-import.url").context("no rancher-import.url")?;
                ensure!(url.starts_with("-rw------- root/root"), "the import URL (a secret) is not 0600: {url}");
                ensure!(
                    cat("etc/kiln/rancher-import.url")?.starts_with("https://rancher.example.com/v3/import/"),
                    "import URL not rendered"
                );
                ensure!(cat("etc/kiln/rancher-ca.pem")?.contains("BEGIN CERTIFICATE"), "CA not rendered");
                let script = line("usr/local/sbin/rancher-import").context("no rancher-import script")?;
                ensure!(script.starts_with("-rwxr-xr-x"), "{script}");
                let inittab = cat("etc/inittab")?;
                ensure!(inittab.contains("::respawn:/usr/lib/kiln/services/rancher-import"), "{inittab}");
                ensure!(cat("usr/lib/kiln/services/rancher-import")?.contains("KILN_RESTART=on-failure"), "service policy");
            }
        }
        let _ = std::fs::remove_file(sqfs);
    }
    Ok(())
}
