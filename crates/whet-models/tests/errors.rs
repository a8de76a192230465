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

/// What a family's config asks for and whet does not implement is refused by name, never run
/// as something else: each edit below is one such field on a family fixture.
#[test]
fn config_fields_whet_does_not_implement_are_refused_by_name() {
    let cases: &[(&str, &str, serde_json::Value, &str)] = &[
        (
            "families/phi3-cls",
            "partial_rotary_factor",
            serde_json::json!(0.75),
            "partial_rotary_factor = 0.75",
        ),
        (
            "families/phi3-cls",
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
            "rope scaling type \"yarn\"",
        ),
        (
            "families/gemma3_text-cls",
            "use_bidirectional_attention",
            serde_json::json!(true),
            "use_bidirectional_attention",
        ),
        (
            "families/gemma3_text-cls",
            "layer_types",
            serde_json::json!(["sliding_attention", "chunked_attention"]),
            "\"chunked_attention\" is not implemented",
        ),
        (
            "families/qwen3-cls",
            "layer_types",
            serde_json::json!(["full_attention"]),
            "layer_types has 1 entries for num_hidden_layers = 2",
        ),
        (
            "families/roberta-cls",
            "position_embedding_type",
            serde_json::json!("relative_key"),
            "position_embedding_type = \"relative_key\"",
        ),
        (
            "families/gemma-cls",
            "model_type",
            serde_json::json!("gemma3"),
            "vision tower",
        ),
        (
            "families/deberta-v2-cls",
            "conv_kernel_size",
            serde_json::json!(3),
            "conv_kernel_size = 3",
        ),
        (
            "families/deberta-v2-cls",
            "pos_att_type",
            serde_json::json!(["p2c", "p2p"]),
            "pos_att_type \"p2p\"",
        ),
        (
            "families/modernbert-cls",
            "classifier_pooling",
            serde_json::json!("max"),
            "classifier_pooling = \"max\"",
        ),
    ];
    for (fixture, key, value, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixtures().join(fixture)).unwrap() {
            let entry = entry.unwrap();
            if entry.path().is_file() {
                std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
        }
        edit_config(dir.path(), key, value.clone());
        let e = open_err(dir.path()).to_string();
        assert!(e.contains(want), "{fixture} with {key} = {value}: {e}");
        assert!(e.contains("config.json"), "{e}");
    }
    // An unknown architecture names itself and the model types whet has.
    let dir = copy_model("tiny-bert");
    edit_config(dir.path(), "model_type", serde_json::json!("mamba"));
    let e = open_err(dir.path()).to_string();
    for want in [
        "mamba",
        "roberta",
        "deberta-v2",
        "modernbert",
        "qwen3",
        "gemma3_text",
        "phi3",
    ] {
        assert!(e.contains(want), "{e}");
    }
}
