//! `.pth` files written by PyTorch (`tests/fixtures/make_pth.py`; committed, so no torch is
//! needed here) read as PyTorch holds them, and files outside the supported subset are refused
//! with errors that name the file and what was found.

use std::io::Write;
use std::path::{Path, PathBuf};

use pyformats::pickle_writer::Writer;
use pyformats::pth::{self, DType, StateDict};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn read(name: &str) -> StateDict {
    let path = fixture(name);
    pth::read(&std::fs::read(&path).unwrap(), &path.display().to_string()).unwrap()
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("expected.json")).unwrap()).unwrap()
}

/// What make_pth.py records of a tensor: its values as contiguous little-endian f32 (i64 for
/// integer tensors).
fn contiguous_bytes(t: &pth::Tensor) -> Vec<u8> {
    match t.to_f32() {
        Some(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        None => t.data.clone(),
    }
}

fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::I64 => "int64",
    }
}

#[test]
fn fixtures_read_as_torch_holds_them() {
    let doc = expected();
    for file in ["netG.pth", "netD.pth", "views.pth"] {
        let sd = read(file);
        let want = doc["files"][file].as_array().unwrap();
        let names: Vec<&str> = sd.tensors.iter().map(|t| t.name.as_str()).collect();
        let want_names: Vec<&str> = want.iter().map(|w| w["name"].as_str().unwrap()).collect();
        assert_eq!(names, want_names, "{file}");
        for (t, w) in sd.tensors.iter().zip(want) {
            let what = format!("{file} {}", t.name);
            assert_eq!(torch_dtype(t.dtype), w["dtype"], "{what}");
            let shape: Vec<usize> =
                w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            assert_eq!(t.shape, shape, "{what}");
            let count: usize = shape.iter().product();
            assert_eq!(t.data.len(), count * t.dtype.size(), "{what}");
            let bytes = contiguous_bytes(t);
            assert_eq!(hex(&Sha256::digest(&bytes)), w["sha256"], "{what}");
            // serde_json may be off by an ulp of f64 on the way in; the values are f32 (or ints).
            let first: Vec<f64> = w["first"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            match t.to_f32() {
                Some(v) => {
                    assert_eq!(&v[..first.len()], &first.iter().map(|&x| x as f32).collect::<Vec<_>>()[..], "{what}")
                }
                None => {
                    let ints: Vec<f64> =
                        t.data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect();
                    assert_eq!(&ints[..first.len()], &first[..], "{what}");
                }
            }
        }
    }
    // The views by hand: base = arange(24).reshape(4, 6) / 8 - 1.
    let views = read("views.pth");
    let base = |r: usize, c: usize| (r * 6 + c) as f32 / 8.0 - 1.0;
    let f32s = |name: &str| views.get(name).unwrap().to_f32().unwrap();
    let transposed: Vec<f32> = (0..6).flat_map(|c| (0..4).map(move |r| base(r, c))).collect();
    assert_eq!(f32s("transposed"), transposed);
    let offset: Vec<f32> = (1..4).flat_map(|r| (2..5).map(move |c| base(r, c))).collect();
    assert_eq!(f32s("offset"), offset);
    assert_eq!(f32s("row"), (0..6).map(|c| base(2, c)).collect::<Vec<_>>());
    let scalar = views.get("scalar").unwrap();
    assert_eq!((scalar.shape.as_slice(), scalar.data.as_slice()), (&[][..], &7i64.to_le_bytes()[..]));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn data_parallel_prefix_and_state_dict_wrapper_read_as_the_plain_dict() {
    let plain = read("netG.pth");
    assert_eq!(plain.tensors.len(), 4 + 3 * 5, "4 conv weights and 3 BatchNorms of 5 tensors");
    assert_eq!(read("netG_module.pth"), plain);
    assert_eq!(read("netG_wrapped.pth"), plain);
}

#[test]
fn safetensors_output_keeps_names_shapes_and_values() {
    let views = read("views.pth");
    let bytes = views.to_safetensors("views").unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for t in &views.tensors {
        let v = st.tensor(&t.name).unwrap();
        assert_eq!((v.shape(), v.data()), (t.shape.as_slice(), t.data.as_slice()), "{}", t.name);
    }
    assert_eq!(st.tensor("f64").unwrap().dtype(), safetensors::Dtype::F64);
    // For this project's networks: floats become f32, integers stay i64.
    let f32s = views.clone().with_floats_as_f32().to_safetensors("views").unwrap();
    let st = SafeTensors::deserialize(&f32s).unwrap();
    for name in ["f64", "f16", "bf16", "transposed"] {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
        let want: Vec<u8> = views.get(name).unwrap().to_f32().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(v.data(), want.as_slice(), "{name}");
    }
    assert_eq!(st.tensor("i64").unwrap().dtype(), safetensors::Dtype::I64);
    // A file path: .pth converted, safetensors passed through unchanged.
    let from_path = pth::weights_as_safetensors(&fixture("views.pth")).unwrap();
    assert_eq!(from_path, f32s);
    let dir = tempfile::tempdir().unwrap();
    let st_path = dir.path().join("w.safetensors");
    std::fs::write(&st_path, &f32s).unwrap();
    assert_eq!(pth::weights_as_safetensors(&st_path).unwrap(), f32s);
}

#[test]
fn legacy_format_is_refused_with_the_way_to_resave() {
    let path = fixture("legacy.pth");
    let e = pth::read(&std::fs::read(&path).unwrap(), "legacy.pth").unwrap_err().to_string();
    assert!(
        e.starts_with("legacy.pth: ") && e.contains("torch < 1.6") && e.contains("_use_new_zipfile_serialization=True"),
        "{e}"
    );
    let e = pth::weights_as_safetensors(&path).unwrap_err().to_string();
    assert!(e.contains("legacy.pth") && e.contains("torch < 1.6"), "{e}");
}

/// A zip archive as torch writes one, with `entries` as `archive/<name>`.
fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        zip.start_file(format!("archive/{name}"), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// A pickled `OrderedDict` with one tensor `w` of `shape` (contiguous, at storage offset
/// `offset`) on a storage of `class` with `numel` elements under key "0".
fn tensor_at_pickle(class: &str, numel: i32, offset: i32, shape: &[i32]) -> Vec<u8> {
    let mut w = Writer::default();
    w.proto(2).global("collections", "OrderedDict").op(b')').op(b'R').op(b'(');
    w.unicode("w").global("torch._utils", "_rebuild_tensor_v2").op(b'(');
    w.op(b'(').unicode("storage").global("torch", class).unicode("0").unicode("cpu").int(numel).op(b't').op(b'Q');
    w.int(offset).op(b'(');
    for &d in shape {
        w.int(d);
    }
    w.op(b't').op(b'(');
    let mut stride = 1;
    let mut strides = Vec::new();
    for &d in shape.iter().rev() {
        strides.push(stride);
        stride *= d;
    }
    for s in strides.iter().rev() {
        w.int(*s);
    }
    w.op(b't').op(0x89).global("collections", "OrderedDict").op(b')').op(b'R').op(b't').op(b'R');
    w.op(b'u').stop()
}

fn one_tensor_pickle(class: &str, numel: i32, shape: &[i32]) -> Vec<u8> {
    tensor_at_pickle(class, numel, 0, shape)
}

#[test]
fn what_is_not_a_state_dict_is_refused_naming_the_file_and_what_was_found() {
    let good = archive(&[("data.pkl", &one_tensor_pickle("FloatStorage", 6, &[2, 3])), ("data/0", &[0u8; 24])]);
    let sd = pth::read(&good, "good.pth").unwrap();
    assert_eq!((sd.tensors[0].name.as_str(), sd.tensors[0].shape.as_slice()), ("w", &[2, 3][..]));

    let cases: Vec<(Vec<u8>, &[&str])> = vec![
        (b"not a checkpoint at all".to_vec(), &["not a PyTorch .pth file"]),
        (good[..good.len() / 2].to_vec(), &["not a readable zip"]),
        (archive(&[("version", b"3")]), &["without <name>/data.pkl"]),
        (
            archive(&[("data.pkl", &one_tensor_pickle("IntStorage", 6, &[2, 3])), ("data/0", &[0u8; 24])]),
            &["w: ", "torch.IntStorage is not read here"],
        ),
        (
            archive(&[("data.pkl", &one_tensor_pickle("FloatStorage", 6, &[2, 3])), ("data/0", &[0u8; 20])]),
            &["archive/data/0 holds 20 bytes", "needs 24"],
        ),
        (
            archive(&[("data.pkl", &one_tensor_pickle("FloatStorage", 8, &[2, 4])), ("data/0", &[0u8; 24])]),
            &["archive/data/0 holds 24 bytes", "needs 32"],
        ),
        (
            archive(&[("data.pkl", &one_tensor_pickle("FloatStorage", 6, &[3, 3])), ("data/0", &[0u8; 24])]),
            &["w: ", "holds 9 elements, more than its storage's 6"],
        ),
        (
            archive(&[("data.pkl", &tensor_at_pickle("FloatStorage", 6, 1, &[2, 3])), ("data/0", &[0u8; 24])]),
            &["w: ", "at offset 1 reach past its storage of 6 elements"],
        ),
        (archive(&[("data.pkl", &one_tensor_pickle("FloatStorage", 6, &[2, 3]))]), &["archive/data/0"]),
        (
            archive(&[("data.pkl", &[0x80, 2, b'c', b'x']), ("data/0", &[0u8; 24])]),
            &["archive/data.pkl: pickle byte offset 2", "GLOBAL"],
        ),
        (
            archive(&[("data.pkl", &{
                let mut w = Writer::default();
                w.proto(2).global("__main__", "Generator").op(b')').op(0x81).stop()
            })]),
            &["an object made by __main__.Generator, not a state dict"],
        ),
        (
            archive(&[("data.pkl", &{
                let mut w = Writer::default();
                w.proto(2).op(b'}').op(b'(').unicode("epoch").int(3).unicode("netG").op(b'}').op(b'u').stop()
            })]),
            &["'epoch' is a int, not a tensor", "no 'state_dict' entry", "keys: epoch, netG"],
        ),
    ];
    for (bytes, wants) in cases {
        let e = pth::read(&bytes, "bad.pth").unwrap_err().to_string();
        assert!(e.starts_with("bad.pth: "), "{e}");
        for want in wants {
            assert!(e.contains(want), "{want:?} not in: {e}");
        }
    }
}
