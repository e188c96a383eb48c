//! `kiln flash` against regular files: writes and verifies with the bmap beside the image, exits 2
//! without confirmation or on a refusal, leaving the target untouched.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

fn kiln(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(dir).stdin(Stdio::null()).output().expect("running kiln");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A 32 MiB sparse disk.img with 2 MiB of data and its disk.img.bmap.
fn image(dir: &Path) {
    let p = dir.join("disk.img");
    let mut f = std::fs::File::create(&p).unwrap();
    f.set_len(32 * MIB).unwrap();
    f.write_all(&[1u8; 4096]).unwrap();
    f.seek(SeekFrom::Start(8 * MIB)).unwrap();
    f.write_all(&vec![2u8; 2 * MIB as usize]).unwrap();
    kiln::bmap::write_bmap(&p, &[0..4096, 8 * MIB..10 * MIB], &dir.join("disk.img.bmap")).unwrap();
}

#[test]
fn flash_to_a_new_file_writes_the_mapped_bytes_and_verifies() {
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    let (code, text) = kiln(d.path(), &["flash", "disk.img", "card.img", "--yes"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("card.img: new file") && text.contains("wrote 2.0 MiB of 32.0 MiB") && text.contains("verified 2.0 MiB"),
        "{text}"
    );
    assert!(std::fs::read(d.path().join("card.img")).unwrap() == std::fs::read(d.path().join("disk.img")).unwrap());
}

#[test]
fn flash_without_yes_and_without_a_terminal_exits_2_writing_nothing() {
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    let (code, text) = kiln(d.path(), &["flash", "disk.img", "card.img"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--yes"), "{text}");
    assert!(!d.path().join("card.img").exists());
}

#[test]
fn flash_to_a_smaller_file_is_refused_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    std::fs::write(d.path().join("small.img"), vec![9u8; MIB as usize]).unwrap();
    let (code, text) = kiln(d.path(), &["flash", "disk.img", "small.img", "--yes"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("small.img") && text.contains("smaller than the image") && text.contains("--force"), "{text}");
    assert_eq!(std::fs::read(d.path().join("small.img")).unwrap(), vec![9u8; MIB as usize]);
    let (code, text) = kiln(d.path(), &["flash", "disk.img", "small.img", "--yes", "--force"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(std::fs::metadata(d.path().join("small.img")).unwrap().len(), 32 * MIB);
}

#[test]
fn flash_with_a_damaged_bmap_exits_2() {
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    let bmap = d.path().join("disk.img.bmap");
    let text = std::fs::read_to_string(&bmap).unwrap().replace("<MappedBlocksCount> 513 ", "<MappedBlocksCount> 514 ");
    std::fs::write(&bmap, text).unwrap();
    let (code, text) = kiln(d.path(), &["flash", "disk.img", "card.img", "--yes"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("disk.img.bmap") && text.contains("checksum"), "{text}");
}
