//! The `--json` summaries of `build` and `fetch`, the output list of `build`, and the warnings
//! of the run they carry.

use std::path::PathBuf;

use anyhow::Result;

/// Every warning of this run (whatever `-q` or `KILN_LOG` show), for the `--json` summaries.
pub static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The most warnings a summary lists (the log on stderr has them all).
const MAX_WARNINGS: usize = 1000;

/// A tracing layer that keeps the text of each warning (and error) event in [`WARNINGS`].
pub struct WarningLog;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarningLog {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        // tracing orders levels by verbosity: WARN and ERROR are the ones at or below WARN.
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut m = Message(String::new());
            event.record(&mut m);
            // Bounded: `kiln serve` runs for days and may warn on every bad request.
            let mut w = WARNINGS.lock().unwrap_or_else(|e| e.into_inner());
            if w.len() < MAX_WARNINGS {
                w.push(m.0);
            }
        }
    }
}

pub fn warnings() -> Vec<String> {
    WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// With `--json`, a failure is also printed on stdout as `{"ok": false, "error": ...}` (the
/// error still goes to stderr and sets the exit status).
pub fn json_or_error<T>(json: bool, r: Result<T>) -> Result<T> {
    if let (true, Err(e)) = (json, &r) {
        println!(
            "{}",
            serde_json::json!({ "ok": false, "error": format!("{e:#}"), "usage_error": kiln::error::is_usage(e), "warnings": warnings() })
        );
    }
    r
}

/// Per architecture: disk.img, the files derived from it (compressed copies, block map), the
/// netboot script, the update bundle's manifest.
pub fn output_paths(image: &kiln::pipeline::ArchOutputs) -> Vec<PathBuf> {
    let script = image.netboot.as_ref().map(|d| d.join(kiln::netboot::SCRIPT));
    let update = image.update.as_ref().map(|d| d.join(kiln::update::MANIFEST));
    let derived = image
        .manifest
        .outputs
        .iter()
        .filter(|o| kiln::pipeline::disk::DISK_FILES[1..].contains(&o.file.as_str()))
        .map(|o| image.dir.join(&o.file));
    image.disk.iter().cloned().chain(derived).chain(script).chain(update).collect()
}

/// `kiln build --json`: the outputs of every architecture with their digests (from the
/// manifests kiln wrote), and where the manifests and checksums are.
pub fn build_summary(report: &kiln::pipeline::BuildReport) -> serde_json::Value {
    let archs: Vec<serde_json::Value> = report
        .images
        .iter()
        .map(|i| {
            let outputs: Vec<serde_json::Value> = i
                .manifest
                .outputs
                .iter()
                .map(|o| serde_json::json!({ "file": o.file, "path": i.dir.join(&o.file), "size": o.size, "sha256": o.sha256 }))
                .collect();
            serde_json::json!({
                "arch": i.arch,
                "dir": i.dir,
                "manifest": i.dir.join(kiln::pipeline::disk::MANIFEST),
                "kernel_version": i.manifest.kernel_version,
                "outputs": outputs,
            })
        })
        .collect();
    serde_json::json!({ "ok": true, "out_dir": report.out_dir, "checksums": report.checksums, "archs": archs, "warnings": warnings() })
}
