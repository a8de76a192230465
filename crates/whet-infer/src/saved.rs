//! What the loaders of trained folders share: the metadata file `whet train` writes beside the
//! model (`labels.json`, `qa.json`), and the base model of an adapter folder.

use std::path::{Path, PathBuf};

use crate::error::{InferError, Result};

/// The metadata file `name` of `dir`, if it exists and parses.
pub(crate) fn meta(dir: &Path, name: &str) -> Option<serde_json::Value> {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
}

/// The folder to load the model from, and whether `dir` is a `peft` adapter applied over it.
/// For an adapter: the base given, else the `base_model` of the metadata when it exists here,
/// else the adapter's `base_model_name_or_path`.
pub(crate) fn base_model(
    dir: &Path,
    given: Option<&Path>,
    meta: Option<&serde_json::Value>,
) -> Result<(PathBuf, bool)> {
    let path = dir.join("adapter_config.json");
    if !path.is_file() {
        return Ok((dir.to_path_buf(), false));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| InferError::io(dir, e))?;
    serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|source| InferError::JsonFile { path, source })?;
    let from_meta = meta
        .and_then(|m| m["base_model"].as_str())
        .map(PathBuf::from)
        .filter(|p| p.exists());
    let from_cfg = match (given, &from_meta) {
        (None, None) => whet_models::adapter_base(dir)?,
        _ => None,
    };
    let base = given
        .map(Path::to_path_buf)
        .or(from_meta)
        .or(from_cfg)
        .ok_or_else(|| InferError::NoBaseModel {
            path: dir.to_path_buf(),
        })?;
    Ok((base, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(config: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
        dir
    }

    #[test]
    fn a_model_folder_is_its_own_base() {
        let dir = tempfile::tempdir().unwrap();
        let (base, is_adapter) = base_model(dir.path(), None, None).unwrap();
        assert_eq!((base.as_path(), is_adapter), (dir.path(), false));
    }

    #[test]
    fn an_adapter_takes_the_given_base_then_an_existing_recorded_one_then_its_own() {
        // An absolute path, so no Hub id: resolving one is `whet_models::adapter_base`'s, tested
        // against the stand-in Hub in the CLI tests.
        let dir = adapter(serde_json::json!({"base_model_name_or_path": "/named/base"}));
        let given = Path::new("given/base");
        let (base, is_adapter) = base_model(dir.path(), Some(given), None).unwrap();
        assert_eq!((base.as_path(), is_adapter), (given, true));
        // A recorded base that exists wins over the adapter's name; one that is gone does not.
        let here = dir.path().to_str().unwrap();
        let meta = serde_json::json!({ "base_model": here });
        let (base, _) = base_model(dir.path(), None, Some(&meta)).unwrap();
        assert_eq!(base.as_path(), dir.path());
        let meta = serde_json::json!({"base_model": "/nonexistent/base"});
        let (base, _) = base_model(dir.path(), None, Some(&meta)).unwrap();
        assert_eq!(base, PathBuf::from("/named/base"));
    }

    #[test]
    fn an_adapter_without_a_base_is_refused_by_name() {
        let dir = adapter(serde_json::json!({"peft_type": "LORA"}));
        let e = base_model(dir.path(), None, None).unwrap_err();
        assert!(matches!(e, InferError::NoBaseModel { .. }), "{e:?}");
        assert!(
            e.to_string()
                .ends_with(": the adapter does not name its base model"),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_adapter_config_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), "{").unwrap();
        let e = base_model(dir.path(), None, None).unwrap_err();
        assert!(e.to_string().contains("adapter_config.json"), "{e}");
    }
}
