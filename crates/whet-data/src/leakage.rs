//! The leakage check before training: rows of a held-out split that are in the training split
//! (exactly, or nearly), and the training split's own repeats.
//!
//! - **Exact**: equal after Unicode NFKC normalisation and whitespace collapsed to single
//!   spaces, trimmed (case kept).
//! - **Near**: not exact, but the Jaccard similarity of the two texts' sets of character
//!   5-grams (of the normalised text, lower-cased) is at least [`NEAR_THRESHOLD`]. Candidate
//!   pairs come from MinHash signatures (64 hashes) banded for locality-sensitive hashing (16
//!   bands of 4: a pair at Jaccard 0.8 becomes a candidate with probability 0.9998); each
//!   candidate's Jaccard is then computed exactly, so every pair reported is over the threshold.
//!
//! MinHash is written here rather than taken from a crate: the crates that offer it (gaoya,
//! probabilistic-collections) bring their own hashing and parallelism for far larger corpora,
//! and the 60 lines below are the whole algorithm.

use std::collections::{HashMap, HashSet};

use tokenizers::normalizers::unicode::NFKC;
use tokenizers::{NormalizedString, Normalizer};

/// The Jaccard similarity of character 5-gram sets above which two texts are near duplicates.
pub const NEAR_THRESHOLD: f64 = 0.8;
const SHINGLE: usize = 5;
const BANDS: usize = 16;
const ROWS: usize = 4;
const HASHES: usize = BANDS * ROWS;

/// What to do with the check (`data.leakage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Report duplicates and train anyway.
    #[default]
    Warn,
    /// Refuse to train when a held-out split repeats training rows.
    Error,
    /// Skip the check.
    Off,
}

/// One row's text and where it came from.
#[derive(Debug, Clone)]
pub struct Text {
    /// `file:line`.
    pub origin: String,
    pub text: String,
}

/// Duplicates found between two splits (or within one).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// The split whose rows are counted (`validation`, `test`, or `train` for repeats).
    pub split: String,
    /// The split they repeat (`train`, or `validation` for test rows).
    pub of: String,
    /// Rows of `split` equal to a row of `of` (within one split: to an earlier row).
    pub exact: usize,
    /// Rows of `split` with a near duplicate in `of` and no exact one.
    pub near: usize,
    /// A few of them: `(row, the row it repeats, similarity)`.
    pub examples: Vec<(String, String, f64)>,
}

/// What the check found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub near_threshold: f64,
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether a held-out split repeats training rows (or test repeats validation).
    pub fn leaks(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.split != f.of && f.exact + f.near > 0)
    }

    /// Lines to print: one per finding with duplicates, with up to three examples each.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "leakage check (exact: equal after NFKC and whitespace; near: Jaccard >= {} of \
             character {SHINGLE}-grams):",
            self.near_threshold
        )];
        let mut any = false;
        for f in &self.findings {
            if f.exact + f.near == 0 {
                continue;
            }
            any = true;
            let what = if f.split == f.of {
                format!("{} repeats its own rows", f.split)
            } else {
                format!("{} rows found in {}", f.split, f.of)
            };
            lines.push(format!(
                "  {what}: {} exact, {} near duplicates",
                f.exact, f.near
            ));
            for (row, of, sim) in f.examples.iter().take(3) {
                lines.push(format!("    {row} ~ {of} (similarity {sim:.2})"));
            }
        }
        if !any {
            lines.push("  no duplicates within train or between the splits".into());
        }
        lines
    }
}

/// NFKC, whitespace collapsed to single spaces, trimmed.
pub fn normalise(text: &str) -> String {
    let mut n = NormalizedString::from(text);
    let nfkc = NFKC.normalize(&mut n).is_ok();
    let s = if nfkc { n.get() } else { text };
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// FNV-1a: a fixed, fast hash of bytes (the MinHash needs one that is the same in every run).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser: one independent-looking hash per seed.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hashed character 5-grams of a normalised text, lower-cased (the whole text when it is
/// shorter).
fn shingles(normal: &str) -> HashSet<u64> {
    let chars: Vec<char> = normal.to_lowercase().chars().collect();
    if chars.len() <= SHINGLE {
        return HashSet::from([fnv(chars.iter().collect::<String>().as_bytes())]);
    }
    chars
        .windows(SHINGLE)
        .map(|w| fnv(w.iter().collect::<String>().as_bytes()))
        .collect()
}

fn signature(set: &HashSet<u64>) -> [u64; HASHES] {
    let mut sig = [u64::MAX; HASHES];
    for &h in set {
        for (i, s) in sig.iter_mut().enumerate() {
            *s = (*s).min(mix(h ^ mix(i as u64 + 1)));
        }
    }
    sig
}

fn band_key(sig: &[u64; HASHES], band: usize) -> u64 {
    sig[band * ROWS..(band + 1) * ROWS]
        .iter()
        .fold(band as u64, |h, &x| mix(h ^ x))
}

fn jaccard(a: &HashSet<u64>, b: &HashSet<u64>) -> f64 {
    let inter = a.intersection(b).count();
    inter as f64 / (a.len() + b.len() - inter) as f64
}

struct Indexed {
    normal: Vec<String>,
    sets: Vec<HashSet<u64>>,
    sigs: Vec<[u64; HASHES]>,
    /// Per band: band hash -> rows.
    bands: Vec<HashMap<u64, Vec<usize>>>,
    exact: HashMap<String, usize>,
}

fn index(texts: &[Text]) -> Indexed {
    let normal: Vec<String> = texts.iter().map(|t| normalise(&t.text)).collect();
    let sets: Vec<HashSet<u64>> = normal.iter().map(|n| shingles(n)).collect();
    let sigs: Vec<[u64; HASHES]> = sets.iter().map(signature).collect();
    let mut bands = vec![HashMap::<u64, Vec<usize>>::new(); BANDS];
    let mut exact = HashMap::new();
    for (i, sig) in sigs.iter().enumerate() {
        for (b, band) in bands.iter_mut().enumerate() {
            band.entry(band_key(sig, b)).or_default().push(i);
        }
        exact.entry(normal[i].clone()).or_insert(i);
    }
    Indexed {
        normal,
        sets,
        sigs,
        bands,
        exact,
    }
}

/// Rows of `rows` that repeat a row of `of` (`same`: the same split, a row repeating an
/// earlier one).
fn compare(split: &str, rows: &[Text], of_name: &str, of: &[Text], same: bool) -> Finding {
    let target = index(of);
    let mine = if same { None } else { Some(index(rows)) };
    let (normal, sets, sigs) = match &mine {
        Some(m) => (&m.normal, &m.sets, &m.sigs),
        None => (&target.normal, &target.sets, &target.sigs),
    };
    let mut finding = Finding {
        split: split.into(),
        of: of_name.into(),
        exact: 0,
        near: 0,
        examples: vec![],
    };
    for (i, row) in rows.iter().enumerate() {
        if let Some(&j) = target.exact.get(&normal[i])
            && (!same || j < i)
        {
            finding.exact += 1;
            if finding.examples.len() < 5 {
                finding
                    .examples
                    .push((row.origin.clone(), of[j].origin.clone(), 1.0));
            }
            continue;
        }
        let mut best: Option<(usize, f64)> = None;
        let mut seen = HashSet::new();
        for (b, band) in target.bands.iter().enumerate() {
            for &j in band.get(&band_key(&sigs[i], b)).into_iter().flatten() {
                if (same && j >= i) || !seen.insert(j) {
                    continue;
                }
                let sim = jaccard(&sets[i], &target.sets[j]);
                if sim >= NEAR_THRESHOLD && best.is_none_or(|(_, s)| sim > s) {
                    best = Some((j, sim));
                }
            }
        }
        if let Some((j, sim)) = best {
            finding.near += 1;
            if finding.examples.len() < 5 {
                finding
                    .examples
                    .push((row.origin.clone(), of[j].origin.clone(), sim));
            }
        }
    }
    finding
}

/// Checks the splits (`train` first, then `validation` and `test` when present): train's own
/// repeats, then each held-out split against train, and test against validation.
pub fn check(splits: &[(&str, Vec<Text>)]) -> Report {
    let get = |name: &str| splits.iter().find(|(n, _)| *n == name).map(|(_, t)| t);
    let mut findings = Vec::new();
    if let Some(train) = get("train") {
        findings.push(compare("train", train, "train", train, true));
        for held in ["validation", "test"] {
            if let Some(rows) = get(held) {
                findings.push(compare(held, rows, "train", train, false));
            }
        }
    }
    if let (Some(test), Some(validation)) = (get("test"), get("validation")) {
        findings.push(compare("test", test, "validation", validation, false));
    }
    Report {
        near_threshold: NEAR_THRESHOLD,
        findings,
    }
}
