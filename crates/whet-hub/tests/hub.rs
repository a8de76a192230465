//! The hub client against the stand-in Hub (`common::hub_server`): huggingface_hub's cache
//! layout, revalidation without downloading again, offline and unreachable use of the cache,
//! resumed downloads, the Hub's errors, and `hf://datasets/...` paths.

use std::path::{Path, PathBuf};

use whet_hub::{Hub, HubError};

use crate::common::hub_server::{self, Options, Server};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

/// A Hub root: a tiny LLaMA (config, weights, and files whet leaves on the Hub), a repo with
/// PyTorch weights only, a GGUF-only repo, and a dataset of Parquet files.
fn hub_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let llama = root.path().join("models/whet-test/tiny-llama");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        copy(&fixtures().join("tiny-llama").join(f), &llama.join(f));
    }
    std::fs::write(llama.join("README.md"), "# tiny\n").unwrap();
    std::fs::write(llama.join("pytorch_model.bin"), b"not read").unwrap();
    std::fs::create_dir_all(llama.join("onnx")).unwrap();
    std::fs::write(llama.join("onnx/model.onnx"), b"not read").unwrap();
    std::fs::write(llama.join(".refs"), "v1.0\n").unwrap();

    let torch = root.path().join("models/whet-test/torch-only");
    copy(
        &fixtures().join("tiny-llama/config.json"),
        &torch.join("config.json"),
    );
    std::fs::write(torch.join("pytorch_model.bin"), b"weights").unwrap();

    let gguf = root.path().join("models/whet-test/tiny-gguf");
    std::fs::create_dir_all(&gguf).unwrap();
    std::fs::write(gguf.join("model-q8_0.gguf"), b"GGUF stand-in").unwrap();
    std::fs::write(gguf.join("model-q4_0.gguf"), b"GGUF stand-in 2").unwrap();

    let data = root.path().join("datasets/whet-test/reviews");
    let parquet = fixtures().join("data/reviews.parquet");
    for f in [
        "data/train-0.parquet",
        "data/train-1.parquet",
        "data/test-0.parquet",
    ] {
        copy(&parquet, &data.join(f));
    }
    std::fs::write(data.join("README.md"), "# reviews\n").unwrap();
    root
}

fn hub(server: &Server, cache: &Path) -> Hub {
    Hub::new(&server.endpoint, cache.to_path_buf()).with_progress(false)
}

fn requests_since(server: &Server, n: usize) -> Vec<String> {
    server.requests()[n..].to_vec()
}

#[test]
fn a_model_downloads_into_huggingface_hubs_cache_layout() {
    let root = hub_root();
    let server = hub_server::start(root.path(), Options::default());
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());
    let dir = hub
        .model_path(Path::new("whet-test/tiny-llama"), None, None)
        .unwrap();

    let repo = cache.path().join("models--whet-test--tiny-llama");
    let commit = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    assert_eq!(commit.len(), 40);
    assert_eq!(dir, repo.join("snapshots").join(&commit));
    let mut got: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(
        got,
        ["config.json", "generation_config.json", "model.safetensors"],
        "README, PyTorch weights and subfolders stay on the Hub"
    );
    // Relative symlinks into blobs/, named by etag: the sha256 of an LFS file.
    let original = std::fs::read(fixtures().join("tiny-llama/model.safetensors")).unwrap();
    let link = std::fs::read_link(dir.join("model.safetensors")).unwrap();
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(&original)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(link, Path::new("../../blobs").join(&sha));
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        original
    );
    let config_link = std::fs::read_link(dir.join("config.json")).unwrap();
    assert!(config_link.starts_with("../../blobs"), "{config_link:?}");
    assert_eq!(
        std::fs::read(dir.join("config.json")).unwrap(),
        std::fs::read(fixtures().join("tiny-llama/config.json")).unwrap()
    );
    assert!(
        cache
            .path()
            .join(".locks/models--whet-test--tiny-llama")
            .join(format!("{sha}.lock"))
            .is_file()
    );
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(blobs.len(), 3);
    assert!(!blobs.iter().any(|b| b.ends_with(".incomplete")));

    // Online again: one listing call, nothing downloaded.
    let n = server.requests().len();
    assert_eq!(
        hub.model_path(Path::new("whet-test/tiny-llama"), None, None)
            .unwrap(),
        dir
    );
    let again = requests_since(&server, n);
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0].starts_with("GET /api/models/whet-test/tiny-llama/revision/main"));

    // A tag and the commit itself resolve to the same snapshot; the tag gets its ref.
    assert_eq!(
        hub.model_path(Path::new("whet-test/tiny-llama"), Some("v1.0"), None)
            .unwrap(),
        dir
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/v1.0")).unwrap(),
        commit
    );
    assert_eq!(
        hub.model_path(Path::new("whet-test/tiny-llama"), Some(&commit), None)
            .unwrap(),
        dir
    );

    // Offline: the cache alone, not one request.
    let n = server.requests().len();
    let offline = hub.clone().with_offline(true);
    assert_eq!(
        offline
            .model_path(Path::new("whet-test/tiny-llama"), None, None)
            .unwrap(),
        dir
    );
    assert_eq!(
        offline
            .model_path(Path::new("whet-test/tiny-llama"), Some(&commit), None)
            .unwrap(),
        dir
    );
    assert_eq!(server.requests().len(), n);
    let e = offline
        .model_path(Path::new("whet-test/tiny-llama"), Some("v2"), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("whet-test/tiny-llama@v2"),
        "{e}"
    );

    // The endpoint unreachable: the cached revision is used; an uncached one is an error that
    // says what to do.
    let dead = Hub::new("http://127.0.0.1:9", cache.path().to_path_buf()).with_progress(false);
    assert_eq!(
        dead.model_path(Path::new("whet-test/tiny-llama"), None, None)
            .unwrap(),
        dir
    );
    let empty = tempfile::tempdir().unwrap();
    let dead = Hub::new("http://127.0.0.1:9", empty.path().to_path_buf()).with_progress(false);
    let e = dead
        .model_path(Path::new("whet-test/tiny-llama"), None, None)
        .unwrap_err();
    assert!(matches!(e, HubError::Unreachable { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("http://127.0.0.1:9")
            && e.contains("HF_HUB_OFFLINE")
            && e.contains("HF_ENDPOINT"),
        "{e}"
    );
}

#[test]
fn a_local_path_always_wins_over_an_id() {
    let root = hub_root();
    let server = hub_server::start(root.path(), Options::default());
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());
    let local = tempfile::tempdir().unwrap();
    let shadow = local.path().join("shadow-org/tiny-llama");
    std::fs::create_dir_all(&shadow).unwrap();
    let cwd = std::env::current_dir().unwrap();
    // A relative path that exists is a path, even though it is also a valid id.
    std::env::set_current_dir(local.path()).unwrap();
    let got = hub.model_path(Path::new("shadow-org/tiny-llama"), None, None);
    std::env::set_current_dir(cwd).unwrap();
    assert_eq!(got.unwrap(), Path::new("shadow-org/tiny-llama"));
    assert!(server.requests().is_empty());
    assert_eq!(
        hub.model_path(&shadow, None, Some("m.gguf")).unwrap(),
        shadow.join("m.gguf")
    );
    let e = hub
        .model_path(&shadow, Some("main"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("local path") && e.contains("revision"), "{e}");
}

#[test]
fn the_hubs_errors_name_the_repo_revision_or_file() {
    let root = hub_root();
    let server = hub_server::start(
        root.path(),
        Options {
            gated: vec!["whet-test/tiny-gguf".into()],
            token: Some("hf_right".into()),
            ..Options::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());
    let err = |h: &Hub, id: &str, rev: Option<&str>, gguf: Option<&str>| {
        h.model_path(Path::new(id), rev, gguf).unwrap_err()
    };

    let e = err(&hub, "whet-test/missing", None, None);
    assert!(matches!(e, HubError::RepoNotFound { .. }), "{e}");
    assert!(e.to_string().contains("whet-test/missing") && e.to_string().contains("HF_TOKEN"));
    let e = err(&hub, "whet-test/tiny-llama", Some("nope"), None);
    assert!(matches!(e, HubError::RevisionNotFound { .. }), "{e}");
    assert!(e.to_string().contains("\"nope\""), "{e}");
    let e = err(&hub, "not an id/x/y", None, None).to_string();
    assert!(
        e.contains("not a local file or folder") && e.contains("\"not an id/x/y\""),
        "{e}"
    );
    let e = err(&hub, "whet-test/torch-only", None, None).to_string();
    assert!(
        e.contains("no .safetensors") && e.contains("pytorch_model.bin"),
        "{e}"
    );

    // Gated: no token is 401, a token without access 403, the right one downloads.
    let e = err(&hub, "whet-test/tiny-gguf", None, Some("model-q8_0.gguf"));
    assert!(
        matches!(
            e,
            HubError::Unauthorized {
                had_token: false,
                ..
            }
        ),
        "{e}"
    );
    let wrong = hub.clone().with_token(Some("hf_wrong".into()));
    let e = err(&wrong, "whet-test/tiny-gguf", None, Some("model-q8_0.gguf"));
    assert!(matches!(e, HubError::Forbidden { .. }), "{e}");
    assert!(e.to_string().contains("/whet-test/tiny-gguf"), "{e}");
    let right = hub.clone().with_token(Some("hf_right".into()));
    let path = right
        .model_path(
            Path::new("whet-test/tiny-gguf"),
            None,
            Some("model-q8_0.gguf"),
        )
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"GGUF stand-in");
    // The token goes to the Hub, never to the CDN it redirects to.
    let log = server.requests();
    assert!(
        log.iter()
            .any(|r| r.starts_with("GET /api/") && r.contains(" auth")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|r| r.contains("/resolve/") && r.contains(" auth")),
        "{log:?}"
    );
    let cdn: Vec<&String> = log.iter().filter(|r| r.contains("/cdn/")).collect();
    assert!(
        !cdn.is_empty() && cdn.iter().all(|r| !r.contains(" auth")),
        "{log:?}"
    );
    // Only the file asked for.
    assert!(!path.with_file_name("model-q4_0.gguf").exists());
    let e = right
        .model_path(Path::new("whet-test/tiny-gguf"), None, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gguf_file") && e.contains("model-q4_0.gguf"),
        "{e}"
    );
    let e = right
        .model_path(
            Path::new("whet-test/tiny-gguf"),
            None,
            Some("model-f16.gguf"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model-f16.gguf") && e.contains("model-q8_0.gguf"),
        "{e}"
    );
}

#[test]
fn a_broken_download_resumes_and_never_becomes_a_cache_entry() {
    let root = hub_root();
    let original = std::fs::read(fixtures().join("tiny-llama/model.safetensors")).unwrap();
    // The connection breaks halfway through the weights, once: the client resumes from where
    // it stopped with a Range request.
    let server = hub_server::start(
        root.path(),
        Options {
            cut_once: vec![
                "whet-test/tiny-llama/model.safetensors".into(),
                "whet-test/tiny-llama/config.json".into(),
            ],
            ..Options::default()
        },
    );
    let cache = tempfile::tempdir().unwrap();
    let dir = hub(&server, cache.path())
        .model_path(Path::new("whet-test/tiny-llama"), None, None)
        .unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        original
    );
    let log = server.requests();
    let half = original.len() / 2;
    assert!(
        log.iter()
            .any(|r| r.starts_with("GET /cdn/") && r.ends_with(&format!("bytes={half}-"))),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|r| r.contains("/resolve/") && r.contains("config.json bytes=")),
        "{log:?}"
    );

    // A download a crash left behind is continued by the next run.
    let server = hub_server::start(root.path(), Options::default());
    let cache = tempfile::tempdir().unwrap();
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(&original)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let blobs = cache.path().join("models--whet-test--tiny-llama/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{sha}.incomplete")), &original[..1000]).unwrap();
    let dir = hub(&server, cache.path())
        .model_path(Path::new("whet-test/tiny-llama"), None, None)
        .unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        original
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /cdn/") && r.ends_with("bytes=1000-"))
    );

    // A leftover with wrong bytes: the checksum refuses it, nothing enters the cache, and the
    // next run downloads afresh.
    let server = hub_server::start(root.path(), Options::default());
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache.path().join("models--whet-test--tiny-llama/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{sha}.incomplete")), vec![7u8; 1000]).unwrap();
    let h = hub(&server, cache.path());
    let e = h
        .model_path(Path::new("whet-test/tiny-llama"), None, None)
        .unwrap_err();
    assert!(matches!(e, HubError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("sha256"), "{e}");
    assert!(!blobs.join(&sha).exists());
    assert!(!blobs.join(format!("{sha}.incomplete")).exists());
    let dir = h
        .model_path(Path::new("whet-test/tiny-llama"), None, None)
        .unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        original
    );
}

#[test]
fn data_paths_download_a_file_a_folder_or_a_glob() {
    let root = hub_root();
    let server = hub_server::start(root.path(), Options::default());
    let cache = tempfile::tempdir().unwrap();
    let hub = hub(&server, cache.path());
    let parquet = |f: &str| f.ends_with(".parquet");
    let snapshot = |p: &Path| {
        let mut p = p.to_path_buf();
        while !p.parent().unwrap().ends_with("snapshots") {
            p = p.parent().unwrap().to_path_buf();
        }
        p
    };
    let path = hub
        .data_path(
            "hf://datasets/whet-test/reviews/data/train-*.parquet",
            &parquet,
        )
        .unwrap();
    assert!(path.ends_with("data/train-*.parquet"), "{path:?}");
    let snap = snapshot(&path);
    assert!(snap.starts_with(cache.path().join("datasets--whet-test--reviews/snapshots")));
    assert!(
        snap.join("data/train-0.parquet").is_file() && snap.join("data/train-1.parquet").is_file()
    );
    assert!(
        !snap.join("data/test-0.parquet").exists(),
        "only the glob's files"
    );

    let path = hub
        .data_path("hf://datasets/whet-test/reviews/data", &parquet)
        .unwrap();
    assert_eq!(path, snap.join("data"));
    assert!(snap.join("data/test-0.parquet").is_file());
    assert!(!snap.join("README.md").exists(), "not a data file");

    let commit = snap.file_name().unwrap().to_string_lossy().into_owned();
    let path = hub
        .data_path(
            &format!("hf://datasets/whet-test/reviews@{commit}/data/test-0.parquet"),
            &parquet,
        )
        .unwrap();
    assert_eq!(path, snap.join("data/test-0.parquet"));

    let e = hub
        .data_path(
            "hf://datasets/whet-test/reviews/data/valid-*.parquet",
            &parquet,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("valid-*.parquet") && e.contains("data/train-0.parquet"),
        "{e}"
    );
    let e = hub
        .data_path("hf://datasets/whet-test/nothing/x.csv", &parquet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dataset whet-test/nothing"), "{e}");
    let e = hub
        .data_path("hf://whet-test/reviews/x.csv", &parquet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hf://datasets/ORG/NAME"), "{e}");
    // Offline: the same paths from the cache.
    let offline = hub.clone().with_offline(true);
    let n = server.requests().len();
    assert_eq!(
        offline
            .data_path(
                "hf://datasets/whet-test/reviews/data/train-*.parquet",
                &parquet
            )
            .unwrap(),
        snap.join("data/train-*.parquet")
    );
    assert_eq!(server.requests().len(), n);
}

/// A cache huggingface_hub 2.4 wrote (`scripts/fixtures/make_hub_cache_fixture.py`, downloading
/// from this stand-in Hub) is read offline: a model Python downloaded is found by whet.
#[test]
fn a_cache_huggingface_hub_wrote_is_read_offline() {
    let fixture = fixtures().join("hub/python-cache");
    let cache = tempfile::tempdir().unwrap();
    copy_tree(&fixture, cache.path());
    let hub = Hub::new("http://127.0.0.1:9", cache.path().to_path_buf())
        .with_offline(true)
        .with_progress(false);
    let dir = hub
        .model_path(Path::new("whet-test/tiny-llama"), None, None)
        .unwrap();
    for f in ["config.json", "model.safetensors"] {
        assert_eq!(
            std::fs::read(dir.join(f)).unwrap(),
            std::fs::read(fixtures().join("tiny-llama").join(f)).unwrap(),
            "{f}"
        );
    }
    let data = hub
        .data_path(
            "hf://datasets/whet-test/reviews/data/train-0.parquet",
            &|_| true,
        )
        .unwrap();
    assert_eq!(
        std::fs::read(data).unwrap(),
        std::fs::read(fixtures().join("data/reviews.parquet")).unwrap()
    );
}

/// Copies a folder, keeping symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ty = e.file_type().unwrap();
        if ty.is_symlink() {
            #[cfg(unix)]
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if ty.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}
