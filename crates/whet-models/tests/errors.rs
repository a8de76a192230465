//! Bad input gets a typed error that names the file, tensor or shape.

use crate::common;

use std::path::Path;

use burn::tensor::Device;
use common::fixtures;
use whet_models::{Checkpoint, ModelError};

/// Copies a fixture model folder into a temporary one.
fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let p = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    json[key] = value;
    std::fs::write(&p, serde_json::to_string(&json).unwrap()).unwrap();
}

fn open_err(path: &Path) -> ModelError {
    match Checkpoint::open(path) {
        Err(e) => e,
        Ok(c) => match c.load_classifier(&Device::flex()) {
            Err(e) => e,
            Ok(_) => panic!("{} should not load", path.display()),
        },
    }
}

#[test]
fn a_missing_model_path_is_named() {
    let e = open_err(Path::new("/nonexistent/model"));
    assert!(
        matches!(&e, ModelError::MissingFile { path, .. } if path.ends_with("model")),
        "{e}"
    );
}

#[test]
fn a_folder_without_config_names_config_json() {
    let dir = copy_model("tiny-bert");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(&e, ModelError::MissingFile { path, .. } if path.ends_with("config.json")),
        "{e}"
    );
}

#[test]
fn a_folder_without_weights_names_model_safetensors() {
    let dir = copy_model("tiny-bert");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(&e, ModelError::MissingFile { path, .. } if path.ends_with("model.safetensors")),
        "{e}"
    );
}

#[test]
fn a_wrong_tensor_shape_names_the_tensor_and_both_shapes() {
    let dir = copy_model("tiny-bert");
    edit_config(dir.path(), "intermediate_size", serde_json::json!(38));
    let e = open_err(dir.path());
    match &e {
        ModelError::ShapeMismatch {
            name,
            expected,
            actual,
            ..
        } => {
            assert_eq!(name, "bert.encoder.layer.0.intermediate.dense.weight");
            assert_eq!(expected, &vec![38, 32]);
            assert_eq!(actual, &vec![37, 32]);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("[38, 32]") && msg.contains("[37, 32]"),
        "{msg}"
    );
}

#[test]
fn an_unknown_architecture_is_named() {
    let dir = copy_model("tiny-bert");
    edit_config(dir.path(), "model_type", serde_json::json!("t5"));
    let e = open_err(dir.path());
    assert!(
        matches!(&e, ModelError::UnknownArchitecture { name, .. } if name == "t5"),
        "{e}"
    );
}

#[test]
fn a_truncated_safetensors_file_is_named() {
    let dir = copy_model("tiny-bert");
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    for cut in [5, bytes.len() / 2] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = open_err(dir.path());
        assert!(
            matches!(&e, ModelError::Safetensors { path, .. } if path == &p),
            "cut at {cut}: {e}"
        );
    }
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = copy_model("tiny-bert");
    edit_config(dir.path(), "num_hidden_layers", serde_json::json!(3));
    let e = open_err(dir.path());
    assert!(
        matches!(&e, ModelError::MissingTensor { name, .. } if name.starts_with("bert.encoder.layer.2.")),
        "{e}"
    );
}

#[test]
fn a_truncated_gguf_model_is_named() {
    let bytes = std::fs::read(fixtures().join("gguf/quants.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = open_err(&p);
    let msg = e.to_string();
    assert!(
        msg.contains("truncated") && msg.contains("model.gguf"),
        "{msg}"
    );
}

#[test]
fn a_gguf_of_another_architecture_is_refused() {
    // The quant fixture declares general.architecture = "test".
    let e = open_err(&fixtures().join("gguf/quants.gguf"));
    assert!(
        matches!(&e, ModelError::UnknownArchitecture { name, .. } if name == "test"),
        "{e}"
    );
}
