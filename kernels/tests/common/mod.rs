//! Reading the PyTorch fixtures (`kernels/fixtures/*.safetensors`) and comparing against them.
#![allow(dead_code)]

pub mod threads;

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::tensor::{Dtype, SafeTensors};

/// All tensors of one fixture file, as f32 (int64 entries converted).
pub struct Fixture {
    pub name: String,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        let path = fixture_path(&format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
        let mut tensors = HashMap::new();
        for (n, view) in st.tensors() {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => {
                    view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
                }
                Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
                d => panic!("{name}: tensor {n} has unexpected dtype {d:?}"),
            };
            tensors.insert(n, (view.shape().to_vec(), data));
        }
        Self { name: name.to_string(), tensors }
    }

    pub fn get(&self, key: &str) -> &[f32] {
        &self.tensors.get(key).unwrap_or_else(|| panic!("{}: no tensor {key}", self.name)).1
    }

    pub fn shape(&self, key: &str) -> &[usize] {
        &self.tensors.get(key).unwrap_or_else(|| panic!("{}: no tensor {key}", self.name)).0
    }

    pub fn scalar(&self, key: &str) -> f32 {
        self.get(key)[0]
    }

    /// The entries under `prefix.` as a safetensors `state_dict` file, with
    /// `num_batches_tracked` back to int64 as PyTorch stores it.
    pub fn state_dict_file(&self, prefix: &str) -> Vec<u8> {
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (k, (shape, data)) in &self.tensors {
            let Some(name) = k.strip_prefix(&format!("{prefix}.")) else { continue };
            if name.ends_with("num_batches_tracked") {
                owned.push((name.into(), Dtype::I64, vec![], (data[0] as i64).to_le_bytes().to_vec()));
            } else {
                owned.push((
                    name.into(),
                    Dtype::F32,
                    shape.clone(),
                    data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ));
            }
        }
        let views: Vec<_> = owned
            .iter()
            .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view")))
            .collect();
        safetensors::serialize(views, None).expect("serialize")
    }
}

/// max|got - want| / max|want|: the error relative to the tensor's scale, which is meaningful
/// for tensors with near-zero elements where an element-wise relative error is not.
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().map(|v| v.abs() as f64).fold(0.0, f64::max).max(1e-12);
    let err = got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max);
    err / scale
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = relative_error(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

/// NCHW <-> CNHW.
pub fn swap01(x: &[f32], a: usize, b: usize) -> Vec<f32> {
    let rest = x.len() / (a * b);
    let mut out = vec![0.0; x.len()];
    kernels::tensor::swap_leading_axes(x, a, b, rest, &mut out);
    out
}
