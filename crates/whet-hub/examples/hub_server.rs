//! Serves a folder as a stand-in Hugging Face Hub on 127.0.0.1 (the tests' server), for the
//! scripts that check huggingface_hub against whet's cache and whet against huggingface_hub's:
//! `hub_server ROOT [--gated ORG/NAME --token TOKEN]` prints `http://127.0.0.1:PORT` and serves
//! until killed.

#[path = "../tests/common/hub_server.rs"]
mod hub_server;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(root) = args.first() else {
        eprintln!("usage: hub_server ROOT [--gated ORG/NAME --token TOKEN]");
        std::process::exit(2);
    };
    let mut options = hub_server::Options::default();
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--gated", Some(id)) => options.gated.push(id.clone()),
            ("--token", Some(t)) => options.token = Some(t.clone()),
            _ => {
                eprintln!("unknown argument {flag}");
                std::process::exit(2);
            }
        }
    }
    let server = hub_server::start(std::path::Path::new(root), options);
    println!("{}", server.endpoint);
    loop {
        std::thread::park();
    }
}
