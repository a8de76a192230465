//! Hub ids and `hf://datasets/...` paths through the CLI, against the stand-in Hub
//! (`hub_server`) serving the registry packages' MiniLM and SmolLM2 GGUF: train from an id and
//! a glob of Hub data files, with a revision the adapter records; predict offline from the
//! cache; a gated GGUF repo with and without HF_TOKEN; the errors a user meets.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{asset, cache};
use crate::hub_server::{self, Options, Server};

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";
const SMOLLM: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A Hub root whose model files are symlinks to the asset cache's.
fn hub_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let link = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(std::fs::canonicalize(from).unwrap(), to).unwrap();
    };
    let minilm = root.path().join("models").join(MINILM);
    for e in std::fs::read_dir(asset("minilm")).unwrap() {
        let e = e.unwrap();
        link(&e.path(), &minilm.join(e.file_name()));
    }
    std::fs::write(minilm.join(".refs"), "v1.0\n").unwrap();
    let smollm = root.path().join("models").join(SMOLLM);
    link(&asset("smollm2").join(GGUF), &smollm.join(GGUF));
    std::fs::write(smollm.join("README.md"), "gated\n").unwrap();

    let data = root.path().join("datasets/whet-test/reviews/data");
    std::fs::create_dir_all(&data).unwrap();
    let line = |t: &str, l: &str| format!("{{\"text\": \"{t}\", \"label\": \"{l}\"}}\n");
    for (i, name) in ["train-0.jsonl", "train-1.jsonl"].iter().enumerate() {
        let mut rows = String::new();
        for k in 0..12 {
            rows += &line(&format!("a fine film {i} {k}"), "pos");
            rows += &line(&format!("a dull film {i} {k}"), "neg");
        }
        std::fs::write(data.join(name), rows).unwrap();
    }
    std::fs::write(data.join("test-0.jsonl"), line("fine", "pos")).unwrap();
    root
}

/// `whet` with the Hub environment: the endpoint, a cache and a home of the test's own (no
/// token file of the machine's).
fn whet(env: &[(&str, &str)], home: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_whet"));
    c.env("WHET_CACHE", cache())
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_ENDPOINT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().expect("whet runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Setup {
    _root: tempfile::TempDir,
    server: Server,
    home: tempfile::TempDir,
}

impl Setup {
    fn new(options: Options) -> Self {
        let root = hub_root();
        let server = hub_server::start(root.path(), options);
        Self {
            _root: root,
            server,
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn cache(&self) -> PathBuf {
        self.home.path().join("hub")
    }

    fn run(&self, extra: &[(&str, &str)], args: &[&str]) -> Output {
        let mut env = vec![("HF_ENDPOINT", self.server.endpoint.as_str())];
        env.extend_from_slice(extra);
        whet(&env, self.home.path(), args)
    }
}

#[test]
fn train_from_a_hub_id_and_hub_data_then_predict_offline() {
    let hub = Setup::new(Options::default());
    let out = hub.home.path().join("run");
    let set_out = format!("training.output_dir=\"{}\"", out.display());
    let o = hub.run(
        &[],
        &[
            "train",
            "--model",
            MINILM,
            "--revision",
            "v1.0",
            "--data",
            "hf://datasets/whet-test/reviews/data/train-*.jsonl",
            "--set",
            "training.max_steps=2",
            "--set",
            &set_out,
        ],
    );
    let said = text(&o);
    assert!(o.status.success(), "{said}");
    // Downloaded into HF_HOME/hub in huggingface_hub's layout, one line per file (no terminal).
    let repo = hub
        .cache()
        .join("models--sentence-transformers--all-MiniLM-L6-v2");
    let commit = std::fs::read_to_string(repo.join("refs/v1.0")).unwrap();
    let snapshot = repo.join("snapshots").join(&commit);
    assert!(snapshot.join("model.safetensors").is_file(), "{said}");
    assert!(said.contains("downloading sentence-transformers/all-MiniLM-L6-v2/model.safetensors"));
    let data = hub.cache().join("datasets--whet-test--reviews/snapshots");
    let data_commit = std::fs::read_dir(&data)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(data_commit.join("data/train-1.jsonl").is_file());
    assert!(
        !data_commit.join("data/test-0.jsonl").exists(),
        "only the glob's files"
    );
    // 48 rows from the two files: a tenth for validation.
    assert!(said.contains("validation: 4 of the 48 rows"), "{said}");

    // The recipe written for the next run keeps the id, the revision and the hf:// path; the
    // adapter names its base as peft does.
    let recipe = std::fs::read_to_string(out.join("recipe.toml")).unwrap();
    for want in [
        format!("model = \"{MINILM}\""),
        "revision = \"v1.0\"".into(),
        "hf://datasets/whet-test/reviews/data/train-*.jsonl".into(),
    ] {
        assert!(recipe.contains(&want), "{want} in {recipe}");
    }
    let resolved = std::fs::read_to_string(out.join("recipe.resolved.toml")).unwrap();
    assert!(
        resolved.contains(&format!("model = \"{MINILM}\"")),
        "{resolved}"
    );
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["base_model_name_or_path"], MINILM);
    assert_eq!(adapter["revision"], "v1.0");

    // Offline, the endpoint gone: the adapter's base comes from the cache at its revision.
    let o = whet(
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
        hub.home.path(),
        &[
            "predict",
            "--model",
            out.to_str().unwrap(),
            "--text",
            "a fine film",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"label\""),
        "{}",
        text(&o)
    );
    // The adapter's base named by id and revision, found in the cache offline.
    let merged = hub.home.path().join("merged");
    let o = whet(
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
        hub.home.path(),
        &[
            "merge",
            "--adapter",
            out.to_str().unwrap(),
            merged.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(merged.join("model.safetensors").is_file());
    // Inferring again: nothing downloaded a second time.
    let n = hub.server.requests().len();
    let o = hub.run(
        &[],
        &[
            "init",
            "--model",
            MINILM,
            "--data",
            "hf://datasets/whet-test/reviews/data",
            "-o",
            hub.home.path().join("again.toml").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let new: Vec<String> = hub.server.requests()[n..].to_vec();
    assert!(
        new.iter()
            .all(|r| r.starts_with("GET /api/") || r.contains("test-0.jsonl")),
        "only listings, and the one file the folder adds: {new:?}"
    );
    assert!(data_commit.join("data/test-0.jsonl").is_file());
}

#[test]
fn a_gated_gguf_repo_needs_hf_token_and_errors_say_what_to_do() {
    let hub = Setup::new(Options {
        gated: vec![SMOLLM.into()],
        token: Some("hf_secret".into()),
        ..Options::default()
    });
    let data = hub.home.path().join("lines.txt");
    std::fs::write(&data, "one line of text\nanother line of text\n").unwrap();
    let recipe = hub.home.path().join("r.toml");
    let init = |env: &[(&str, &str)]| {
        hub.run(
            env,
            &[
                "init",
                "--model",
                SMOLLM,
                "--gguf-file",
                GGUF,
                "--data",
                data.to_str().unwrap(),
                "-o",
                recipe.to_str().unwrap(),
            ],
        )
    };
    let o = init(&[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("401") && text(&o).contains("HF_TOKEN"),
        "{}",
        text(&o)
    );
    let o = init(&[("HF_TOKEN", "hf_other")]);
    assert!(
        text(&o).contains("403") && text(&o).contains("conditions"),
        "{}",
        text(&o)
    );
    // The token file `hf auth login` writes, as huggingface_hub reads it.
    std::fs::write(hub.home.path().join("token"), "hf_secret\n").unwrap();
    let o = init(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let written = std::fs::read_to_string(&recipe).unwrap();
    assert!(
        written.contains(&format!("gguf_file = \"{GGUF}\"")),
        "{written}"
    );
    assert!(written.contains("task = \"causal-lm\""), "{written}");
    // The GGUF file alone was fetched, and only with the token (the CDN never sees it).
    let snapshots = hub
        .cache()
        .join("models--HuggingFaceTB--SmolLM2-135M-Instruct-GGUF/snapshots");
    let snap = std::fs::read_dir(&snapshots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(snap.join(GGUF).is_file() && !snap.join("README.md").exists());

    // What a user gets wrong.
    let o = hub.run(&[], &["info", "whet-test/missing"]);
    assert!(
        text(&o).contains("model whet-test/missing was not found on http://127.0.0.1")
            && text(&o).contains("no local file or folder \"whet-test/missing\""),
        "{}",
        text(&o)
    );
    let o = hub.run(&[], &["info", SMOLLM]);
    assert!(
        text(&o).contains("gguf_file") && text(&o).contains(GGUF),
        "{}",
        text(&o)
    );
    let o = hub.run(&[("HF_HUB_OFFLINE", "1")], &["info", MINILM]);
    assert!(
        text(&o).contains("HF_HUB_OFFLINE") && text(&o).contains(MINILM),
        "{}",
        text(&o)
    );
    let o = hub.run(&[], &["info", "not/an/id"]);
    assert!(
        text(&o).contains("not/an/id") && text(&o).contains("Hub repo id"),
        "{}",
        text(&o)
    );
    let o = hub.run(&[("HF_ENDPOINT", "http://127.0.0.1:9")], &["info", MINILM]);
    assert!(
        text(&o).contains("cannot reach http://127.0.0.1:9"),
        "{}",
        text(&o)
    );
    let o = hub.run(
        &[],
        &[
            "init",
            "--model",
            asset("minilm").to_str().unwrap(),
            "--data",
            "hf://spaces/whet-test/app/rows.csv",
            "-o",
            recipe.to_str().unwrap(),
        ],
    );
    assert!(text(&o).contains("hf://datasets/ORG/NAME"), "{}", text(&o));
}
