//! Fixture reading for the parity tests (fixtures come from `scripts/fixtures/make_fixtures.py`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use whet_models::NamedParam;

/// The repository's `tests/fixtures` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The asset cache (`WHET_CACHE` or `cache/` at the repository root).
pub fn cache() -> PathBuf {
    std::env::var_os("WHET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cache"))
}

/// An asset from the cache; panics with the command that fetches it when absent.
pub fn asset(rel: &str) -> PathBuf {
    let p = cache().join(rel);
    assert!(
        p.exists(),
        "asset {} is missing: run scripts/fetch_assets.sh first",
        p.display()
    );
    p
}

/// A fixture file's tensors.
pub struct Fixture {
    pub path: PathBuf,
    pub tensors: HashMap<String, (Vec<usize>, Values)>,
}

pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Fixture {
    pub fn open(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values = match view.dtype() {
                Dtype::F32 => Values::F32(
                    data.chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                ),
                Dtype::I64 => Values::I64(
                    data.chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                ),
                other => panic!("fixture {name}: unexpected dtype {other:?}"),
            };
            tensors.insert(name.to_string(), (view.shape().to_vec(), values));
        }
        Self {
            path: path.to_path_buf(),
            tensors,
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.get(name).0.clone()
    }

    fn get(&self, name: &str) -> &(Vec<usize>, Values) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{} has no tensor {name}", self.path.display()))
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        match &self.get(name).1 {
            Values::F32(v) => v.clone(),
            Values::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        match &self.get(name).1 {
            Values::I64(v) => v.clone(),
            Values::F32(_) => panic!("{name} is f32"),
        }
    }

    pub fn ids2(&self, name: &str, device: &Device) -> Tensor<2, Int> {
        let s = self.shape(name);
        Tensor::from_data(TensorData::new(self.i64(name), [s[0], s[1]]), device)
    }

    pub fn ids1(&self, name: &str, device: &Device) -> Tensor<1, Int> {
        let s = self.shape(name);
        Tensor::from_data(TensorData::new(self.i64(name), [s[0]]), device)
    }
}

/// Values of a float tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// max |a - b|
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().map(|x| x.abs()).fold(0.0, f32::max).max(1e-12);
    max_abs_diff(a, b) / scale
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_abs_diff(got, want);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
}

/// Relative error within `tol`, or an absolute difference within 1e-6: some gradients are
/// mathematically zero (the key bias of softmax attention) and hold only float noise.
#[track_caller]
pub fn assert_rel(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let r = rel_err(got, want);
    let d = max_abs_diff(got, want);
    assert!(
        r <= tol || d <= 1e-6,
        "{what}: relative error {r:e} > {tol:e} (max abs diff {d:e})"
    );
}

/// Logits at the positions where `mask` is 1 (`vocab` values per position).
pub fn masked_rows(logits: &[f32], mask: &[i64], vocab: usize) -> Vec<f32> {
    logits
        .chunks(vocab)
        .zip(mask)
        .filter(|(_, m)| **m == 1)
        .flat_map(|(row, _)| row.iter().copied())
        .collect()
}

/// Backpropagates `loss` and compares it and the gradient of every parameter the fixture has a
/// `grad.NAME` for, within `tol` relative error (or 1e-6 absolute); every fixture gradient must
/// be checked.
#[track_caller]
pub fn check_loss_and_grads(fx: &Fixture, loss: Tensor<1>, params: Vec<NamedParam>, tol: f32) {
    assert_rel("loss", &values(loss.clone()), &fx.f32("loss"), tol);
    let grads = loss.backward();
    let expected = fx.tensors.keys().filter(|k| k.starts_with("grad.")).count();
    assert!(expected > 0, "fixture has no gradients");
    let mut checked = 0;
    let mut failures = vec![];
    for p in &params {
        let key = format!("grad.{}", p.name);
        if !fx.has(&key) {
            continue;
        }
        let (shape, got) = p
            .checkpoint_grad(&grads)
            .unwrap_or_else(|| panic!("no gradient for {}", p.name));
        assert_eq!(shape, fx.shape(&key), "gradient shape of {}", p.name);
        let want = fx.f32(&key);
        let (r, d) = (rel_err(&got, &want), max_abs_diff(&got, &want));
        if r > tol && d > 1e-6 {
            failures.push(format!("{key}: relative error {r:e}, max abs diff {d:e}"));
        }
        checked += 1;
    }
    assert!(
        failures.is_empty(),
        "gradients differ:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        checked, expected,
        "every parameter gradient of the fixture must be checked"
    );
}
