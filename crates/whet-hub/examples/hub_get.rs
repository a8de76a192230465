//! Downloads a model or a data path with whet's hub client and prints its local path:
//! `hub_get model ORG/NAME [REVISION]` or `hub_get data hf://datasets/ORG/NAME/PATH`. The
//! environment configures it as it configures huggingface_hub (`HF_ENDPOINT`, `HF_HUB_CACHE`,
//! `HF_TOKEN`, `HF_HUB_OFFLINE`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["model", id] => whet_hub::model_path(std::path::Path::new(id), None, None),
        ["model", id, revision] => {
            whet_hub::model_path(std::path::Path::new(id), Some(revision), None)
        }
        ["data", uri] => whet_hub::data_path(uri, &|_| true),
        _ => {
            eprintln!("usage: hub_get model ORG/NAME [REVISION] | hub_get data hf://datasets/...");
            std::process::exit(2);
        }
    };
    match path {
        Ok(p) => println!("{}", p.display()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
