//! `dcgan prepare` as a user runs it: a folder of images to a prepared directory that the
//! coordinator can train on, run twice (the second run finds it complete), and its refusals.

use std::path::Path;
use std::process::{Command, Output};

fn dcgan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dcgan")).args(args).output().expect("the dcgan binary runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn write_folder(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(24, 18, |x, y| image::Rgb([(x * 10) as u8, (y * 12) as u8, (i * 20) as u8]));
        img.save(dir.join(format!("{i:04}.png"))).unwrap();
    }
}

#[test]
fn prepares_a_folder_and_says_how_to_train_on_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("images");
    write_folder(&src, 9);
    std::fs::write(src.join("zz-broken.jpg"), b"not a jpeg").unwrap();
    let out = tmp.path().join("prepared");
    let (src_arg, out_arg) = (format!("folder:{}", src.display()), out.display().to_string());
    let args = ["prepare", "--source", &src_arg, "--out", &out_arg, "--image-size", "16", "--shard-images", "4"];
    let first = dcgan(&args);
    let t = text(&first);
    assert!(first.status.success(), "{t}");
    assert!(t.contains("prepared 9 images of 3x16x16") && t.contains("in 3 shards"), "{t}");
    assert!(t.contains("left out 1 image(s)") && t.contains("zz-broken.jpg"), "{t}");
    assert!(t.contains(&format!("coordinator --dataset prepared:{out_arg} --image-size 16")), "{t}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["count"], 9);
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 3);

    let again = dcgan(&args);
    assert!(again.status.success() && text(&again).contains("already holds"), "{}", text(&again));

    let strict_out = format!("{out_arg}-strict");
    let strict = dcgan(&["prepare", "--source", &src_arg, "--out", &strict_out, "--image-size", "16", "--strict"]);
    assert!(!strict.status.success());
    assert!(text(&strict).contains("zz-broken.jpg") && text(&strict).contains("cannot decode"), "{}", text(&strict));
}

#[test]
fn refuses_what_cannot_be_prepared_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p").display().to_string();
    for (args, needle) in [
        (vec!["prepare", "--source", "shapes", "--out", &out], "only a data source can be prepared"),
        (vec!["prepare", "--source", "imagenet:/x", "--out", &out], "unknown dataset kind 'imagenet'"),
        (vec!["prepare", "--source", "folder:/no/such/dir", "--out", &out], "/no/such/dir"),
        (vec!["prepare", "--out", &out], "--source"),
        (vec!["prepare", "--source", "folder:/x", "--out", &out, "--channels", "cmyk"], "expected rgb, gray or auto"),
    ] {
        let o = dcgan(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(text(&o).contains(needle), "{args:?}: {}", text(&o));
    }
}
