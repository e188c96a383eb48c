//! `kiln flash`: the target described, the refusal rules, the confirmation, the write with a
//! progress bar, the verification.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result};
use kiln::error::{ResultExt, UsageError};

/// The command's switches: `--yes`, `--force`, not `--no-verify`, `--quiet`.
pub struct FlashFlags {
    pub yes: bool,
    pub force: bool,
    pub verify: bool,
    pub quiet: bool,
}

/// `kiln flash`: describe the target, apply the refusal rules, confirm, write with a progress
/// bar on a TTY, verify. Refusals and an unconfirmed write are usage errors (exit 2).
pub fn flash(image: &Path, device: &Path, bmap: Option<&Path>, f: FlashFlags) -> Result<()> {
    use kiln::flash;
    let img = flash::Image::open(image, bmap).usage("cannot use the image")?;
    let target = flash::inspect(device, &flash::HostRoots::default())?;
    println!("{}", flash::describe(&target).trim_end());
    match &img.bmap {
        Some(b) => {
            println!("image: {}, {} ({} mapped)", image.display(), kiln::size::human(b.image_size), kiln::size::human(b.mapped_bytes()))
        }
        None => println!(
            "image: {}, {} (no bmap: every byte is written{})",
            image.display(),
            img.size.map_or("size unknown".into(), kiln::size::human),
            img.expected.as_ref().map_or(String::new(), |e| format!(", checked against {}", e.manifest.display()))
        ),
    }
    let reasons = flash::refusals(&target, img.size);
    if !reasons.is_empty() {
        if !f.force {
            return Err(UsageError(flash::Refused { target: device.display().to_string(), reasons }.to_string()).into());
        }
        for r in &reasons {
            eprintln!("warning: --force: {r}");
        }
    }
    if !f.yes {
        if !std::io::stdin().is_terminal() {
            return Err(
                UsageError(format!("not writing to {}: stdin is not a terminal to confirm on; pass --yes", device.display())).into()
            );
        }
        eprint!("write {} to {}? [y/N] ", image.display(), device.display());
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer).context("reading the answer")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(UsageError(format!("not writing to {}: not confirmed", device.display())).into());
        }
    }
    let mut medium = flash::write::open_target(device, img.size)?;
    let total = img.bmap.as_ref().map(|b| b.mapped_bytes()).or(img.size);
    let bar = (!f.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = total.map_or_else(indicatif::ProgressBar::no_length, indicatif::ProgressBar::new);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message("writing");
        bar
    });
    let start = std::time::Instant::now();
    let report = flash::flash(&img, &mut medium, flash::FlashOptions { verify: f.verify }, &mut |n| {
        if let Some(b) = &bar {
            b.set_position(n)
        }
    })
    .with_context(|| format!("writing {} to {}", image.display(), device.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!(
        "wrote {} of {} to {} in {:.1} s{}",
        kiln::size::human(report.written),
        kiln::size::human(report.image_size),
        device.display(),
        start.elapsed().as_secs_f64(),
        if f.verify { format!(", verified {}", kiln::size::human(report.verified)) } else { ", not verified (--no-verify)".into() }
    );
    Ok(())
}
