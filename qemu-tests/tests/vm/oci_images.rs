//! Slow tier, build only (no VM), against a real registry: Debian's `docker-registry` on
//! 127.0.0.1 serves multi-arch test images this test makes itself (one tiny layer per
//! architecture, unique per run, plus an OCI index), pushed with skopeo. A cluster profile
//! (`profiles/single-server.yaml` with stand-in k3s assets, as in `k3s_assets.rs`) pulls them:
//!
//! - a missing platform and a tampered blob each fail with an error naming the image, and
//!   leave no image (and no bad blob in the cache); so does an image whose layer has a `../`
//!   entry, checked as it streams in (naming image, layer and entry; the layer not cached);
//! - the build bundles `/usr/lib/kiln/images/kiln-images-amd64.tar.zst` (OCI layout: the amd64
//!   manifest, config and layer, verified here by digest; the reference as the image name), the
//!   k3s images-directory symlink, and `oci` manifest inputs with the resolved digests;
//! - a second build downloads no blob (counted in the registry's access log) and bundles the
//!   same archive bytes; an offline build works with the registry stopped;
//! - a second registry serves HTTPS (a CA made with openssl) and asks for htpasswd credentials:
//!   `ca_file`, `username` and `password_file` pull from it; a missing CA or a wrong password
//!   fail, and the password never appears in kiln's output.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::manifest::InputKind;
use kiln_qemu_tests::layout::{raw_tar, Layer, Made, TestLayout};
use kiln_qemu_tests::registry::{push, push_as, sha, Registry, Secured};
use kiln_qemu_tests::{cache_dir, extract_range, kiln_with_cache, manifest, stand_in, tool, work_dir};

/// Writes an OCI layout holding one index (tag `1`) over one image per platform, each a single
/// uncompressed layer with `/hello.txt` naming the platform and `seed`. Returns the index digest
/// and the images by architecture name.
fn make_layout(layout: &Path, platforms: &[(&str, Option<&str>)], seed: &str) -> Result<(String, Vec<(String, Made)>)> {
    let l = TestLayout::create(layout)?;
    let mut made = Vec::new();
    for (arch, _) in platforms {
        let src = layout.join(format!("src-{arch}"));
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("hello.txt"), format!("hello from linux/{arch} ({seed})\n"))?;
        let tar_path = layout.join(format!("layer-{arch}.tar"));
        tool(
            Command::new("tar")
                .arg("--numeric-owner")
                .arg("--owner=0")
                .arg("--group=0")
                .arg("--mtime=@0")
                .arg("-cf")
                .arg(&tar_path)
                .arg("-C")
                .arg(&src)
                .arg("hello.txt"),
            "tar",
        )?;
        let layer = Layer::plain(std::fs::read(&tar_path)?);
        made.push((arch.to_string(), l.image(arch, &[layer], serde_json::json!({"Cmd": ["/bin/sh"]}))?));
    }
    let entries: Vec<_> = made.iter().zip(platforms).map(|((_, m), (arch, variant))| (m, *arch, *variant)).collect();
    let (index_hex, index) = l.index(&entries)?;
    l.tag(&index)?;
    Ok((index_hex, made))
}

/// The single-server profile with the stand-in k3s release and `images`.
fn profile(dir: &Path, name: &str, host: &str, images: &[String]) -> Result<PathBuf> {
    let mut text = stand_in::profile_text("single-server")?;
    text.push_str("\nimages:\n");
    for i in images {
        text.push_str(&format!("  - {i}\n"));
    }
    text.push_str(&format!("image_registries:\n  \"{host}\": {{insecure_http: true}}\n"));
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn s(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 work dir")
}

/// The archive bundled in an x86_64 build's root, extracted into `to` (an OCI layout).
fn bundled_archive(out: &Path, dir: &Path, to: &Path) -> Result<Vec<u8>> {
    let m = manifest(out, Arch::X86_64)?;
    let root = m.partitions.iter().find(|p| p.name == "kiln-root-a").context("no kiln-root-a")?;
    let sqfs = dir.join("root.sqfs");
    extract_range(&out.join("x86_64/disk.img"), root.offset, root.content_size.context("empty root")?, &sqfs)?;
    let listing = tool(Command::new("unsquashfs").arg("-lls").arg(&sqfs), "squashfs-tools")?;
    let link = listing
        .lines()
        .find(|l| l.contains("var/lib/rancher/k3s/agent/images/kiln-images-amd64.tar.zst"))
        .context("no kiln-images symlink in k3s's images directory")?;
    ensure!(link.ends_with("-> /usr/lib/kiln/images/kiln-images-amd64.tar.zst"), "{link}");
    let got = Command::new("unsquashfs").arg("-cat").arg(&sqfs).arg("usr/lib/kiln/images/kiln-images-amd64.tar.zst").output()?;
    ensure!(got.status.success(), "unsquashfs -cat: {got:?}");
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to)?;
    let archive = dir.join("archive.tar.zst");
    std::fs::write(&archive, &got.stdout)?;
    tool(Command::new("tar").arg("--zstd").arg("-xf").arg(&archive).arg("-C").arg(to), "tar")?;
    Ok(got.stdout)
}

#[test]
fn registry_images_are_pulled_verified_bundled_and_cached() -> Result<()> {
    let dir = work_dir("oci-images")?;
    let seed = format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos());
    let registry = Registry::start(&dir)?;
    let host = registry.host();
    let assets = stand_in::assets(&dir, &seed)?;
    let cache = cache_dir()?;

    let (hello_index, hello) = make_layout(&dir.join("hello"), &[("amd64", None), ("arm64", Some("v8")), ("riscv64", None)], &seed)?;
    push(&dir.join("hello"), &format!("{host}/kiln-test/hello:1"))?;
    make_layout(&dir.join("armonly"), &[("arm64", Some("v8"))], &seed)?;
    push(&dir.join("armonly"), &format!("{host}/kiln-test/armonly:1"))?;
    let (_, tampered) = make_layout(&dir.join("tampered"), &[("amd64", None)], &format!("{seed}-tampered"))?;
    push(&dir.join("tampered"), &format!("{host}/kiln-test/tampered:1"))?;

    // A missing platform: named, with the platforms the index has; no image written.
    let p = profile(&dir, "armonly", &host, &[format!("{host}/kiln-test/armonly:1")])?;
    let out = dir.join("out-armonly");
    let (code, log) = kiln_with_cache(&cache, &["build", s(&p)?, "--arch", "x86_64", "--k3s-assets", s(&assets)?, "--out", s(&out)?])?;
    ensure!(code != 0, "a build needing a missing platform succeeded:\n{log}");
    eprintln!("missing platform: {}", log.lines().find(|l| l.starts_with("error:")).unwrap_or("(no error line)"));
    ensure!(
        log.contains(&format!("image `{host}/kiln-test/armonly:1`"))
            && log.contains("no linux/amd64 image")
            && log.contains("linux/arm64/v8"),
        "{log}"
    );
    ensure!(!out.join("x86_64/disk.img").exists(), "a failed build left an image");

    // A tampered blob (same size, other bytes) in the registry's storage: refused, nothing stored.
    let layer = &tampered[0].1.layers[0];
    let blob = registry.blob_file(layer);
    let mut bytes = std::fs::read(&blob).with_context(|| format!("reading the registry's copy {}", blob.display()))?;
    bytes[512] ^= 0x20; // the first byte of hello.txt's data, after its tar header

    std::fs::write(&blob, &bytes)?;
    let p = profile(&dir, "tampered", &host, &[format!("{host}/kiln-test/tampered:1")])?;
    let out = dir.join("out-tampered");
    let (code, log) = kiln_with_cache(&cache, &["build", s(&p)?, "--arch", "x86_64", "--k3s-assets", s(&assets)?, "--out", s(&out)?])?;
    ensure!(code != 0, "a build with a tampered layer succeeded:\n{log}");
    eprintln!("tampered blob: {}", log.lines().find(|l| l.starts_with("error:")).unwrap_or("(no error line)"));
    ensure!(
        log.contains(&format!("image `{host}/kiln-test/tampered:1`"))
            && log.contains(&format!("layer sha256:{layer}"))
            && log.contains("does not match"),
        "{log}"
    );
    ensure!(!out.join("x86_64/disk.img").exists(), "a failed build left an image");
    ensure!(!cache.join("blobs/sha256").join(layer).exists(), "the tampered blob is in the cache");

    // A layer with a traversal entry (unique per run, so no earlier run cached it): refused at
    // build time whatever the engine would do with it, naming image, layer and entry.
    let entry = format!("../../etc/cron.d/kiln-{seed}");
    let evil = Layer::plain(raw_tar(&[("etc/", b""), (entry.as_str(), b"* * * * * root id\n")]));
    let evil_digest = sha(&evil.blob);
    let l = TestLayout::create(&dir.join("evil"))?;
    let image = l.image("amd64", &[evil], serde_json::json!({"Cmd": ["/bin/sh"]}))?;
    l.tag(&image.descriptor)?;
    push(&dir.join("evil"), &format!("{host}/kiln-test/evil:1"))?;
    let p = profile(&dir, "evil", &host, &[format!("{host}/kiln-test/evil:1")])?;
    let out = dir.join("out-evil");
    let (code, log) = kiln_with_cache(&cache, &["build", s(&p)?, "--arch", "x86_64", "--k3s-assets", s(&assets)?, "--out", s(&out)?])?;
    ensure!(code != 0, "a build bundling a layer with a `../` entry succeeded:\n{log}");
    eprintln!("traversal entry: {}", log.lines().find(|l| l.starts_with("error:")).unwrap_or("(no error line)"));
    ensure!(
        log.contains(&format!("image `{host}/kiln-test/evil:1` (x86_64): layer sha256:{evil_digest}"))
            && log.contains(&format!("entry `{entry}`"))
            && log.contains("`..`"),
        "{log}"
    );
    ensure!(!out.join("x86_64/disk.img").exists(), "a failed build left an image");
    ensure!(!cache.join("blobs/sha256").join(&evil_digest).exists(), "the refused layer is in the cache");

    // The good image: pulled, verified, bundled.
    let reference = format!("{host}/kiln-test/hello:1");
    let p = profile(&dir, "hello", &host, std::slice::from_ref(&reference))?;
    let out = dir.join("out");
    let gets_before = registry.blob_gets()?;
    let started = Instant::now();
    let (code, log) = kiln_with_cache(&cache, &["build", s(&p)?, "--arch", "x86_64", "--k3s-assets", s(&assets)?, "--out", s(&out)?])?;
    ensure!(code == 0, "kiln build failed (exit {code}):\n{log}");
    eprintln!("build with one registry image: {:.1} s", started.elapsed().as_secs_f64());
    let first_gets = registry.blob_gets()? - gets_before;
    ensure!(first_gets >= 2, "the first build downloaded {first_gets} blobs (config and layer expected; manifests come from /manifests/); is the access log format known? {}", registry.log.display());
    let amd64 = &hello.iter().find(|(a, _)| a == "amd64").context("amd64")?.1;

    let m = manifest(&out, Arch::X86_64)?;
    let oci: Vec<_> = m.inputs.iter().filter(|i| i.kind == InputKind::Oci).collect();
    ensure!(oci.len() == 1, "manifest oci inputs: {oci:?}");
    ensure!(
        oci[0].name == reference && oci[0].version.as_deref() == Some(&format!("sha256:{hello_index}")) && oci[0].sha256 == amd64.manifest,
        "{:?}",
        oci[0]
    );

    let layout = dir.join("bundled");
    let archive = bundled_archive(&out, &dir, &layout)?;
    let mut names: Vec<String> = std::fs::read_dir(layout.join("blobs/sha256"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut want = vec![amd64.manifest.clone(), amd64.config.clone(), amd64.layers[0].clone()];
    want.sort();
    ensure!(names == want, "bundled blobs {names:?}, want the amd64 manifest, config and layer {want:?}");
    for n in &names {
        ensure!(sha(&std::fs::read(layout.join("blobs/sha256").join(n))?) == *n, "bundled blob {n} does not match its name");
    }
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let entry = &index["manifests"][0];
    ensure!(entry["digest"] == format!("sha256:{}", amd64.manifest), "{index}");
    ensure!(entry["annotations"]["io.containerd.image.name"] == reference.as_str(), "{index}");
    ensure!(entry["annotations"]["org.opencontainers.image.ref.name"] == reference.as_str(), "{index}");
    ensure!(layout.join("oci-layout").is_file(), "no oci-layout file");

    // Again, online: no blob downloaded, the same archive.
    let gets_before = registry.blob_gets()?;
    let out2 = dir.join("out-again");
    let (code, log) = kiln_with_cache(&cache, &["build", s(&p)?, "--arch", "x86_64", "--k3s-assets", s(&assets)?, "--out", s(&out2)?])?;
    ensure!(code == 0, "second kiln build failed (exit {code}):\n{log}");
    let again = registry.blob_gets()? - gets_before;
    ensure!(again == 0, "the second build downloaded {again} blobs");
    ensure!(bundled_archive(&out2, &dir, &dir.join("bundled-again"))? == archive, "the second build bundled different archive bytes");

    // Offline, with the registry gone.
    drop(registry);
    let out3 = dir.join("out-offline");
    let (code, log) = kiln_with_cache(&cache, &["build", s(&p)?, "--arch", "x86_64", "--offline", "--out", s(&out3)?])?;
    ensure!(code == 0, "offline kiln build failed (exit {code}):\n{log}");
    ensure!(bundled_archive(&out3, &dir, &dir.join("bundled-offline"))? == archive, "the offline build bundled different archive bytes");
    Ok(())
}

/// A CA and a server certificate for 127.0.0.1 signed by it (P-256 keys, made with openssl);
/// returns (CA certificate, server certificate, server key), all PEM.
fn make_tls(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr, ext) = (dir.join("server.pem"), dir.join("server.key"), dir.join("server.csr"), dir.join("server.ext"));
    let openssl = |args: &[&str]| tool(Command::new("openssl").args(args), "openssl");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kiln test CA",
        "-keyout",
        s(&ca_key)?,
        "-out",
        s(&ca)?,
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        s(&key)?,
        "-out",
        s(&csr)?,
    ])?;
    std::fs::write(&ext, "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        s(&csr)?,
        "-CA",
        s(&ca)?,
        "-CAkey",
        s(&ca_key)?,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        s(&ext)?,
        "-out",
        s(&cert)?,
    ])?;
    Ok((ca, cert, key))
}

/// A registry with TLS (a CA made here) and htpasswd credentials. `kiln fetch` of a
/// containerd profile pulls the image with `ca_file`, `username` and `password_file`; without
/// the CA file, or with a wrong password, it fails naming the registry; the password is in no
/// output.
#[test]
fn a_tls_registry_with_credentials_is_pulled_with_ca_file_and_password_file() -> Result<()> {
    let dir = work_dir("oci-images-tls-auth")?;
    let seed = format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos());
    let (ca, cert, key) = make_tls(&dir)?;
    let password = format!("pw-{seed}");
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, tool(Command::new("htpasswd").args(["-Bbn", "kiln", &password]), "apache2-utils")?)?;
    let registry = Registry::start_secured(&dir, &Secured { cert, key, htpasswd })?;
    let host = registry.host();
    let (_, made) = make_layout(&dir.join("hello"), &[("amd64", None)], &seed)?;
    let reference = format!("{host}/kiln-test/private:1");
    push_as(&dir.join("hello"), &reference, Some(&format!("kiln:{password}")))?;
    std::fs::write(dir.join("right.pw"), format!("{password}\n"))?;
    std::fs::write(dir.join("wrong.pw"), "not-the-password\n")?;

    // An appliance profile (no k3s needed): `kiln fetch` pulls just what a build would.
    let fetch = |name: &str, options: &str| -> Result<(i32, String)> {
        let p = dir.join(format!("{name}.yaml"));
        std::fs::write(&p, format!(
            "name: {name}\narch: [x86_64]\nengine: containerd\nimages: [{reference}]\ncontainers: [{{name: c, image: {reference}}}]\nimage_registries:\n  \"{host}\": {{{options}}}\n"
        ))?;
        let (code, log) = kiln_with_cache(&cache_dir()?, &["fetch", s(&p)?])?;
        ensure!(!log.contains(&password), "kiln printed the registry password:\n{log}");
        eprintln!("{name}: exit {code}; {}", log.lines().find(|l| l.starts_with("error:")).unwrap_or("(no error line)"));
        Ok((code, log))
    };
    let (code, log) = fetch("no-ca", "username: kiln, password_file: right.pw")?;
    ensure!(
        code != 0 && log.contains(&host) && log.contains("UnknownIssuer") && log.contains("ca_file"),
        "a registry with an unknown CA was accepted, or the error does not say why (exit {code}):\n{log}"
    );
    let ca_file = format!("ca_file: {}", s(&ca)?);
    let (code, log) = fetch("wrong-password", &format!("{ca_file}, username: kiln, password_file: wrong.pw"))?;
    ensure!(
        code != 0 && log.contains(&host) && log.contains("Not authorized") && log.contains("password_file"),
        "a wrong password was accepted, or the error does not say why (exit {code}):\n{log}"
    );
    let layer = &made[0].1.layers[0];
    ensure!(!cache_dir()?.join("blobs/sha256").join(layer).exists(), "a failed pull stored the layer");
    let (code, log) = fetch("right", &format!("{ca_file}, username: kiln, password_file: right.pw"))?;
    ensure!(code == 0, "kiln fetch with the CA file and the right password failed (exit {code}):\n{log}");
    ensure!(cache_dir()?.join("blobs/sha256").join(layer).is_file(), "the layer is not in the cache after the fetch");
    Ok(())
}

/// One HTTP/1.0 request to the registry: the status code and the `Location` header.
fn http(port: u16, method: &str, path: &str, content_type: &str, body: &[u8]) -> Result<(u16, Option<String>)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let location =
        resp.lines().find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: "))).map(|l| l.trim().to_string());
    Ok((status, location))
}

/// Pushes one blob with a monolithic upload (POST, then PUT with the digest).
fn push_blob(port: u16, repo: &str, data: &[u8]) -> Result<String> {
    let (status, location) = http(port, "POST", &format!("/v2/{repo}/blobs/uploads/"), "application/octet-stream", b"")?;
    ensure!(status == 202, "starting a blob upload to {repo}: HTTP {status}");
    let location = location.context("no Location for the upload")?;
    let path = location.trim_start_matches(&format!("http://127.0.0.1:{port}")).to_string();
    let digest = format!("sha256:{}", sha(data));
    let sep = if path.contains('?') { '&' } else { '?' };
    let (status, _) = http(port, "PUT", &format!("{path}{sep}digest={digest}"), "application/octet-stream", data)?;
    ensure!(status == 201, "finishing the blob upload to {repo}: HTTP {status}");
    Ok(digest)
}

/// A Helm chart artifact pushed the way `helm push` lays it out: the Helm config (Chart.yaml as
/// JSON) and the chart `.tgz` as the one layer. skopeo does not push Helm media types, so this
/// speaks the registry API itself. Returns the `.tgz`.
fn push_chart(dir: &Path, port: u16, repo: &str, tag: &str, seed: &str) -> Result<Vec<u8>> {
    let src = dir.join("chart-src/hello-oci");
    std::fs::create_dir_all(src.join("templates"))?;
    std::fs::write(src.join("Chart.yaml"), format!("apiVersion: v2\nname: hello-oci\nversion: {tag}\ndescription: test chart {seed}\n"))?;
    std::fs::write(src.join("templates/cm.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\n")?;
    let tgz_path = dir.join("hello-oci.tgz");
    tool(
        Command::new("tar")
            .arg("--owner=0")
            .arg("--group=0")
            .arg("-czf")
            .arg(&tgz_path)
            .arg("-C")
            .arg(dir.join("chart-src"))
            .arg("hello-oci"),
        "tar",
    )?;
    let tgz = std::fs::read(&tgz_path)?;
    let config = serde_json::to_vec(
        &serde_json::json!({"apiVersion": "v2", "name": "hello-oci", "version": tag, "description": format!("test chart {seed}")}),
    )?;
    let config_digest = push_blob(port, repo, &config)?;
    let chart_digest = push_blob(port, repo, &tgz)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip", "digest": chart_digest, "size": tgz.len()}],
    }))?;
    let (status, _) = http(port, "PUT", &format!("/v2/{repo}/manifests/{tag}"), "application/vnd.oci.image.manifest.v1+json", &manifest)?;
    ensure!(status == 201, "pushing the chart manifest {repo}:{tag}: HTTP {status}");
    Ok(tgz)
}

/// A Helm chart in a real registry: pulled by `charts: [{chart: oci://...}]`, verified, placed as
/// `/var/lib/rancher/k3s/server/static/charts/<name>-<version>.tgz` with its `HelmChart`, recorded
/// in `manifest.json` (kind `chart`), and found in the cache by an offline build.
#[test]
fn registry_charts_are_pulled_and_installed_with_a_helmchart() -> Result<()> {
    let dir = work_dir("oci-charts")?;
    let seed = format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos());
    let registry = Registry::start(&dir)?;
    let host = registry.host();
    let assets = stand_in::assets(&dir, &seed)?;
    let cache = cache_dir()?;
    let tgz = push_chart(&dir, registry.port, "kiln-test/charts/hello-oci", "0.3.0", &seed)?;

    let p = profile(&dir, "chart", &host, &[])?;
    let mut text = std::fs::read_to_string(&p)?.replace("\nimages:\n", "\nimages: []\n");
    text.push_str(&format!(
        "charts:\n  - chart: oci://{host}/kiln-test/charts/hello-oci:0.3.0\n    namespace: apps\n    values: {{greeting: \"hi {seed}\"}}\n"
    ));
    std::fs::write(&p, text)?;
    let out = dir.join("out");
    let started = Instant::now();
    let (code, log) = kiln_with_cache(&cache, &["build", s(&p)?, "--arch", "x86_64", "--k3s-assets", s(&assets)?, "--out", s(&out)?])?;
    ensure!(code == 0, "kiln build with a registry chart failed (exit {code}):\n{log}");
    eprintln!("build with one registry chart: {:.1} s", started.elapsed().as_secs_f64());

    let m = manifest(&out, Arch::X86_64)?;
    let charts: Vec<_> = m.inputs.iter().filter(|i| i.kind == InputKind::Chart).collect();
    let reference = format!("oci://{host}/kiln-test/charts/hello-oci:0.3.0");
    ensure!(
        charts.len() == 1 && charts[0].name == reference && charts[0].version.as_deref() == Some("0.3.0") && charts[0].sha256 == sha(&tgz),
        "manifest chart inputs: {charts:?}"
    );

    let check = |out: &Path| -> Result<()> {
        let m = manifest(out, Arch::X86_64)?;
        let root = m.partitions.iter().find(|p| p.name == "kiln-root-a").context("no kiln-root-a")?;
        let sqfs = dir.join("root.sqfs");
        extract_range(&out.join("x86_64/disk.img"), root.offset, root.content_size.context("empty root")?, &sqfs)?;
        let got = Command::new("unsquashfs")
            .arg("-cat")
            .arg(&sqfs)
            .arg("var/lib/rancher/k3s/server/static/charts/hello-oci-0.3.0.tgz")
            .output()?;
        ensure!(got.status.success() && got.stdout == tgz, "the chart in the image is not the pushed one: {:?}", got.status);
        let hc =
            Command::new("unsquashfs").arg("-cat").arg(&sqfs).arg("var/lib/rancher/k3s/server/manifests/chart-hello-oci.yaml").output()?;
        let hc = String::from_utf8_lossy(&hc.stdout);
        for want in ["kind: HelmChart", "https://%{KUBERNETES_API}%/static/charts/hello-oci-0.3.0.tgz", "targetNamespace: apps", &seed] {
            ensure!(hc.contains(want), "HelmChart lacks {want}:\n{hc}");
        }
        Ok(())
    };
    check(&out)?;

    // Offline, with the registry gone: the chart comes from the cache.
    drop(registry);
    let out2 = dir.join("out-offline");
    let (code, log) = kiln_with_cache(&cache, &["build", s(&p)?, "--arch", "x86_64", "--offline", "--out", s(&out2)?])?;
    ensure!(code == 0, "offline kiln build with a registry chart failed (exit {code}):\n{log}");
    check(&out2)
}
