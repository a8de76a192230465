//! Classification and language-modelling metrics, computed as scikit-learn and `evaluate`
//! compute them (`accuracy_score`, `precision_recall_fscore_support` with `zero_division=0`,
//! `matthews_corrcoef`, `confusion_matrix`), so numbers compare across the two stacks.

use serde::Serialize;

/// Per-class precision, recall, F1 and support.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Number of true instances of the class.
    pub support: usize,
}

/// Precision, recall and F1 under one averaging.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Averaged {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Every single-label classification metric whet reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationReport {
    pub accuracy: f64,
    /// Unweighted mean over classes.
    pub macro_avg: Averaged,
    /// From global true/false positive counts (equals accuracy for single-label).
    pub micro_avg: Averaged,
    /// Mean over classes weighted by support.
    pub weighted_avg: Averaged,
    pub per_class: Vec<ClassScores>,
    pub matthews_correlation: f64,
    /// `confusion[true][predicted]`
    pub confusion: Vec<Vec<usize>>,
    pub samples: usize,
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 { 0.0 } else { num / den }
}

fn f1(p: f64, r: f64) -> f64 {
    ratio(2.0 * p * r, p + r)
}

/// The unweighted mean over classes (macro) and the mean weighted by support, of precision,
/// recall and F1.
fn macro_and_weighted(per_class: &[ClassScores]) -> (Averaged, Averaged) {
    let support: usize = per_class.iter().map(|c| c.support).sum();
    let mean = |f: &dyn Fn(&ClassScores) -> f64| {
        per_class.iter().map(f).sum::<f64>() / per_class.len().max(1) as f64
    };
    let weighted = |f: &dyn Fn(&ClassScores) -> f64| {
        ratio(
            per_class.iter().map(|c| f(c) * c.support as f64).sum(),
            support as f64,
        )
    };
    (
        Averaged {
            precision: mean(&|c| c.precision),
            recall: mean(&|c| c.recall),
            f1: mean(&|c| c.f1),
        },
        Averaged {
            precision: weighted(&|c| c.precision),
            recall: weighted(&|c| c.recall),
            f1: weighted(&|c| c.f1),
        },
    )
}

/// The `n_classes` x `n_classes` confusion matrix, `[true][predicted]`.
///
/// # Panics
/// If a label is `>= n_classes` (callers validate labels at the data edge).
pub fn confusion_matrix(y_true: &[usize], y_pred: &[usize], n_classes: usize) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; n_classes]; n_classes];
    for (&t, &p) in y_true.iter().zip(y_pred) {
        m[t][p] += 1;
    }
    m
}

/// Scores predictions against labels over `n_classes` classes.
pub fn classification_report(
    y_true: &[usize],
    y_pred: &[usize],
    n_classes: usize,
) -> ClassificationReport {
    assert_eq!(y_true.len(), y_pred.len(), "as many predictions as labels");
    let cm = confusion_matrix(y_true, y_pred, n_classes);
    let n = y_true.len();
    let correct: usize = (0..n_classes).map(|k| cm[k][k]).sum();
    let per_class: Vec<ClassScores> = (0..n_classes)
        .map(|k| {
            let tp = cm[k][k] as f64;
            let predicted: usize = (0..n_classes).map(|t| cm[t][k]).sum();
            let support: usize = cm[k].iter().sum();
            let precision = ratio(tp, predicted as f64);
            let recall = ratio(tp, support as f64);
            ClassScores {
                precision,
                recall,
                f1: f1(precision, recall),
                support,
            }
        })
        .collect();
    let (macro_avg, weighted_avg) = macro_and_weighted(&per_class);
    let micro = ratio(correct as f64, n as f64);
    ClassificationReport {
        accuracy: micro,
        macro_avg,
        micro_avg: Averaged {
            precision: micro,
            recall: micro,
            f1: micro,
        },
        weighted_avg,
        per_class,
        matthews_correlation: matthews(&cm),
        confusion: cm,
        samples: n,
    }
}

/// Multiclass Matthews correlation coefficient (Gorodkin's R_K, as `sklearn.metrics.
/// matthews_corrcoef`), 0 when undefined.
pub fn matthews(cm: &[Vec<usize>]) -> f64 {
    let k = cm.len();
    let s: f64 = cm.iter().flatten().map(|&v| v as f64).sum();
    let c: f64 = (0..k).map(|i| cm[i][i] as f64).sum();
    let t: Vec<f64> = (0..k).map(|i| cm[i].iter().sum::<usize>() as f64).collect();
    let p: Vec<f64> = (0..k)
        .map(|j| (0..k).map(|i| cm[i][j]).sum::<usize>() as f64)
        .collect();
    let tp: f64 = t.iter().zip(&p).map(|(a, b)| a * b).sum();
    let num = c * s - tp;
    let den = ((s * s - p.iter().map(|x| x * x).sum::<f64>())
        * (s * s - t.iter().map(|x| x * x).sum::<f64>()))
    .sqrt();
    ratio(num, den)
}

/// Scores multi-label predictions (each a set of label ids, one decision per label) as
/// scikit-learn scores label-indicator matrices:
/// - `accuracy` is subset accuracy (every label of the text right), as `accuracy_score`;
/// - per-label, macro, micro (global counts) and weighted precision / recall / F1 as
///   `precision_recall_fscore_support`;
/// - `matthews_correlation` is the binary MCC of all `n × n_labels` label decisions pooled
///   together ("micro" MCC): scikit-learn's `matthews_corrcoef` refuses multi-label input,
///   and this is what it gives on the flattened indicator matrices,
///   `matthews_corrcoef(Y_true.ravel(), Y_pred.ravel())`; 0 when undefined, as there;
/// - `confusion` holds one row per label, `[tn, fp, fn, tp]`, as
///   `multilabel_confusion_matrix` flattened.
pub fn multilabel_report(
    y_true: &[Vec<usize>],
    y_pred: &[Vec<usize>],
    n_labels: usize,
) -> ClassificationReport {
    assert_eq!(y_true.len(), y_pred.len(), "as many predictions as labels");
    let n = y_true.len();
    // [tn, fp, fn, tp] per label
    let mut counts = vec![[0usize; 4]; n_labels];
    let mut exact = 0;
    for (t, p) in y_true.iter().zip(y_pred) {
        let mut all_right = true;
        for (k, c) in counts.iter_mut().enumerate() {
            let (truth, pred) = (t.contains(&k), p.contains(&k));
            c[usize::from(truth) * 2 + usize::from(pred)] += 1;
            all_right &= truth == pred;
        }
        exact += usize::from(all_right);
    }
    let per_class: Vec<ClassScores> = counts
        .iter()
        .map(|&[_, fp, fn_, tp]| {
            let precision = ratio(tp as f64, (tp + fp) as f64);
            let recall = ratio(tp as f64, (tp + fn_) as f64);
            ClassScores {
                precision,
                recall,
                f1: f1(precision, recall),
                support: tp + fn_,
            }
        })
        .collect();
    let (macro_avg, weighted_avg) = macro_and_weighted(&per_class);
    let total = counts.iter().fold([0usize; 4], |mut a, c| {
        for i in 0..4 {
            a[i] += c[i];
        }
        a
    });
    let [tn, fp, fn_, tp] = total.map(|v| v as f64);
    let micro_p = ratio(tp, tp + fp);
    let micro_r = ratio(tp, tp + fn_);
    ClassificationReport {
        accuracy: ratio(exact as f64, n as f64),
        macro_avg,
        micro_avg: Averaged {
            precision: micro_p,
            recall: micro_r,
            f1: f1(micro_p, micro_r),
        },
        weighted_avg,
        per_class,
        matthews_correlation: ratio(
            tp * tn - fp * fn_,
            ((tp + fp) * (tp + fn_) * (tn + fp) * (tn + fn_)).sqrt(),
        ),
        confusion: counts.iter().map(|c| c.to_vec()).collect(),
        samples: n,
    }
}

/// The metrics of a regression head (`problem_type = "regression"`), as `run_glue.py` reports
/// them for STS-B (`pearson`, `spearmanr`: scipy's `pearsonr` and `spearmanr`) and for other
/// regression data (`mse`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegressionReport {
    /// Mean squared error.
    pub mse: f64,
    /// Pearson's correlation of the predictions with the truth (NaN where either is constant,
    /// as scipy returns it).
    pub pearson: f64,
    /// Spearman's rank correlation (ties ranked by their average, as `scipy.stats.rankdata`).
    pub spearmanr: f64,
    pub samples: usize,
}

/// Mean squared error and the two correlations of `predicted` against `truth`.
///
/// # Panics
/// If the two differ in length.
pub fn regression_report(truth: &[f64], predicted: &[f64]) -> RegressionReport {
    assert_eq!(truth.len(), predicted.len(), "one prediction per example");
    let n = truth.len();
    let mse = truth
        .iter()
        .zip(predicted)
        .map(|(t, p)| (t - p) * (t - p))
        .sum::<f64>()
        / n.max(1) as f64;
    RegressionReport {
        mse,
        pearson: pearson(truth, predicted),
        spearmanr: pearson(&ranks(truth), &ranks(predicted)),
        samples: n,
    }
}

/// Pearson's r; NaN for fewer than two values or a constant series (scipy warns and gives NaN).
fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if x.len() < 2 {
        return f64::NAN;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// 1-based ranks, tied values sharing the mean of their ranks (`rankdata(method="average")`).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && v[order[j]] == v[order[i]] {
            j += 1;
        }
        // Places i..j (0-based) hold one value: ranks i+1..=j, averaged.
        let rank = (i + 1 + j) as f64 / 2.0;
        for &k in &order[i..j] {
            out[k] = rank;
        }
        i = j;
    }
    out
}

/// Entity-level scores of tagged sentences, as `seqeval` (`evaluate.load("seqeval")`, which
/// `run_ner.py` reports) computes its `overall_*` numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityReport {
    /// Predicted entities that are true (type and span), over the predicted ones.
    pub precision: f64,
    /// True entities found, over the true ones.
    pub recall: f64,
    pub f1: f64,
    /// Tags right, over all tags.
    pub accuracy: f64,
    /// True entities.
    pub entities: usize,
}

/// The entities of a tag sequence as `(type, first, last)` token spans, as seqeval's default
/// (lenient) `get_entities` reads IOB1, IOB2 and IOBES tags: `B-PER I-PER` is one entity, an
/// `I-` after `O` or after another type starts one, `E-` and `S-` end one.
pub fn entities(tags: &[&str]) -> Vec<(String, usize, usize)> {
    let split = |t: &str| -> (char, String) {
        let tag = t.chars().next().unwrap_or('O');
        let rest: String = t.chars().skip(1).collect();
        let kind = rest.split_once('-').map_or(rest.as_str(), |(_, k)| k);
        (
            tag,
            if kind.is_empty() {
                "_".into()
            } else {
                kind.to_string()
            },
        )
    };
    let end_of_chunk = |prev: char, tag: char, prev_type: &str, kind: &str| {
        matches!(prev, 'E' | 'S')
            || (matches!(prev, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
            || (prev != 'O' && prev != '.' && prev_type != kind)
    };
    let start_of_chunk = |prev: char, tag: char, prev_type: &str, kind: &str| {
        matches!(tag, 'B' | 'S')
            || (matches!(prev, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
            || (tag != 'O' && tag != '.' && prev_type != kind)
    };
    let (mut prev, mut prev_type, mut begin) = ('O', String::new(), 0);
    let mut chunks = vec![];
    for (i, t) in tags.iter().copied().chain(["O"]).enumerate() {
        let (tag, kind) = split(t);
        if end_of_chunk(prev, tag, &prev_type, &kind) {
            chunks.push((prev_type.clone(), begin, i - 1));
        }
        if start_of_chunk(prev, tag, &prev_type, &kind) {
            begin = i;
        }
        (prev, prev_type) = (tag, kind);
    }
    chunks
}

/// seqeval's overall precision, recall, F1 (micro over entities; 0 where a count is 0) and
/// token accuracy, of predicted against true tag sequences (one per sentence).
///
/// # Panics
/// If the sequences differ in number or length.
pub fn entity_report(truth: &[Vec<&str>], predicted: &[Vec<&str>]) -> EntityReport {
    assert_eq!(truth.len(), predicted.len(), "one prediction per sentence");
    let (mut n_true, mut n_pred, mut hit, mut right, mut tags) = (0, 0, 0, 0, 0);
    for (t, p) in truth.iter().zip(predicted) {
        assert_eq!(t.len(), p.len(), "one predicted tag per tag");
        let (te, pe) = (entities(t), entities(p));
        n_true += te.len();
        n_pred += pe.len();
        hit += pe.iter().filter(|e| te.contains(e)).count();
        right += t.iter().zip(p).filter(|(a, b)| a == b).count();
        tags += t.len();
    }
    let precision = ratio(hit as f64, n_pred as f64);
    let recall = ratio(hit as f64, n_true as f64);
    EntityReport {
        precision,
        recall,
        f1: f1(precision, recall),
        accuracy: ratio(right as f64, tags as f64),
        entities: n_true,
    }
}

/// Perplexity of a mean token cross-entropy (natural log).
pub fn perplexity(mean_loss: f64) -> f64 {
    mean_loss.exp()
}

/// SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single
/// spaces.
fn squad_normalize(s: &str) -> Vec<String> {
    let lower: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(String::from)
        .collect()
}

/// Exact match and token F1 of a predicted answer against gold answers (the best over them),
/// each 0 or 1 / in [0, 1], as the official SQuAD v1.1 script computes them. No gold answers
/// (an unanswerable question) count as a match only for an empty prediction.
pub fn squad_scores(prediction: &str, golds: &[String]) -> (f64, f64) {
    if golds.is_empty() {
        let empty = squad_normalize(prediction).is_empty();
        return (f64::from(u8::from(empty)), f64::from(u8::from(empty)));
    }
    let p = squad_normalize(prediction);
    let mut best = (0.0f64, 0.0f64);
    for g in golds {
        let g = squad_normalize(g);
        let em = f64::from(u8::from(p == g));
        let mut counts: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        for w in &g {
            *counts.entry(w).or_default() += 1;
        }
        let mut common = 0i64;
        for w in &p {
            if let Some(c) = counts.get_mut(w.as_str())
                && *c > 0
            {
                *c -= 1;
                common += 1;
            }
        }
        let f1 = if common == 0 {
            0.0
        } else {
            let precision = common as f64 / p.len() as f64;
            let recall = common as f64 / g.len() as f64;
            2.0 * precision * recall / (precision + recall)
        };
        best = (best.0.max(em), best.1.max(f1));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    // Expected values worked by hand from the definitions scikit-learn documents:
    // y_true = [0, 1, 2, 0, 1, 2, 0, 2], y_pred = [0, 2, 1, 0, 1, 2, 1, 2]
    #[test]
    fn three_class_report_matches_scikit_learn() {
        let t = [0, 1, 2, 0, 1, 2, 0, 2];
        let p = [0, 2, 1, 0, 1, 2, 1, 2];
        let r = classification_report(&t, &p, 3);
        close(r.accuracy, 5.0 / 8.0);
        // per class: P = [1, 1/3, 2/3], R = [2/3, 1/2, 2/3]
        close(r.per_class[0].precision, 1.0);
        close(r.per_class[1].precision, 1.0 / 3.0);
        close(r.per_class[2].recall, 2.0 / 3.0);
        close(r.macro_avg.f1, (0.8 + 0.4 + 2.0 / 3.0) / 3.0);
        close(
            r.weighted_avg.f1,
            (0.8 * 3.0 + 0.4 * 2.0 + 2.0 / 3.0 * 3.0) / 8.0,
        );
        close(r.micro_avg.f1, 5.0 / 8.0);
        // R_K = (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) with c = 5, s = 8,
        // t = [3, 2, 3], p = [2, 3, 3]: (40 - 21) / sqrt(42 * 42) = 19 / 42
        close(r.matthews_correlation, 19.0 / 42.0);
        assert_eq!(
            r.confusion,
            vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 1, 2]]
        );
    }

    #[test]
    fn binary_mcc_and_zero_division() {
        // sklearn: matthews_corrcoef([1,1,0,0],[1,0,1,0]) == 0.0
        let r = classification_report(&[1, 1, 0, 0], &[1, 0, 1, 0], 2);
        close(r.matthews_correlation, 0.0);
        // A class never predicted has precision 0 (zero_division=0), not NaN.
        let r = classification_report(&[0, 1], &[0, 0], 2);
        close(r.per_class[1].precision, 0.0);
        close(r.per_class[1].f1, 0.0);
        // Perfect predictions: MCC 1.
        let r = classification_report(&[0, 1, 2], &[0, 1, 2], 3);
        close(r.matthews_correlation, 1.0);
    }

    // y_true = [[0, 1], [2], [], [1]] and y_pred = [[0], [2], [1], [1]] over 3 labels, as
    // indicator rows: t = [110, 001, 000, 010], p = [100, 001, 010, 010].
    #[test]
    fn multilabel_report_matches_scikit_learn() {
        let t = vec![vec![0, 1], vec![2], vec![], vec![1]];
        let p = vec![vec![0], vec![2], vec![1], vec![1]];
        let r = multilabel_report(&t, &p, 3);
        // rows 2 and 4 exactly right
        close(r.accuracy, 2.0 / 4.0);
        // label 0: tp 1; label 1: tp 1, fp 1, fn 1; label 2: tp 1
        close(r.per_class[1].precision, 0.5);
        close(r.per_class[1].recall, 0.5);
        assert_eq!(r.per_class[1].support, 2);
        close(r.macro_avg.f1, (1.0 + 0.5 + 1.0) / 3.0);
        // micro: tp 3, fp 1, fn 1
        close(r.micro_avg.f1, 0.75);
        close(r.weighted_avg.f1, (1.0 + 0.5 * 2.0 + 1.0) / 4.0);
        // flattened: tp 3, tn 7, fp 1, fn 1: (21 - 1) / sqrt(4 * 4 * 8 * 8)
        close(r.matthews_correlation, 20.0 / 32.0);
        assert_eq!(r.confusion[1], vec![1, 1, 1, 1]);
    }

    /// One case of `tests/fixtures/metrics/sklearn.txt` (`scripts/fixtures/make_metrics_fixture.py`):
    /// `<case>.<key> <values>` lines.
    fn sklearn_case(case: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/metrics/sklearn.txt"
        );
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let found: std::collections::BTreeMap<String, Vec<String>> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, values) = l.split_once(' ')?;
                let key = key.strip_prefix(case)?.strip_prefix('.')?;
                Some((
                    key.to_string(),
                    values.split(' ').map(String::from).collect(),
                ))
            })
            .collect();
        assert!(!found.is_empty(), "no case {case} in {path}");
        found
    }

    fn floats(case: &std::collections::BTreeMap<String, Vec<String>>, key: &str) -> Vec<f64> {
        case[key].iter().map(|v| v.parse().unwrap()).collect()
    }

    fn ints(case: &std::collections::BTreeMap<String, Vec<String>>, key: &str) -> Vec<usize> {
        case[key].iter().map(|v| v.parse().unwrap()).collect()
    }

    /// Everything but the matrix agrees with scikit-learn's numbers (to 1e-12).
    fn assert_report_equals(
        r: &ClassificationReport,
        want: &std::collections::BTreeMap<String, Vec<String>>,
    ) {
        let closes = |got: &[f64], key: &str| {
            let w = floats(want, key);
            assert_eq!(got.len(), w.len(), "{key}");
            for (g, w) in got.iter().zip(&w) {
                assert!((g - w).abs() < 1e-12, "{key}: {got:?} vs {w:?}");
            }
        };
        closes(&[r.matthews_correlation], "mcc");
        closes(&[r.accuracy], "accuracy");
        let per = |f: fn(&ClassScores) -> f64| r.per_class.iter().map(f).collect::<Vec<_>>();
        closes(&per(|c| c.precision), "precision");
        closes(&per(|c| c.recall), "recall");
        closes(&per(|c| c.f1), "f1");
        let support: Vec<usize> = r.per_class.iter().map(|c| c.support).collect();
        assert_eq!(support, ints(want, "support"));
        for (avg, key) in [
            (r.macro_avg, "macro"),
            (r.micro_avg, "micro"),
            (r.weighted_avg, "weighted"),
        ] {
            closes(&[avg.precision, avg.recall, avg.f1], key);
        }
        let flat: Vec<usize> = r.confusion.iter().flatten().copied().collect();
        assert_eq!(flat, ints(want, "confusion"));
    }

    #[test]
    fn entity_report_equals_seqeval() {
        for name in ["entity_iob2", "entity_lenient", "entity_none"] {
            let case = sklearn_case(name);
            let sentences = |key: &str| -> Vec<Vec<&str>> {
                case[key]
                    .split(|v| v == "|")
                    .map(|s| s.iter().map(String::as_str).collect())
                    .collect()
            };
            let (truth, pred) = (sentences("true"), sentences("pred"));
            let r = entity_report(&truth, &pred);
            for (got, key) in [
                (r.precision, "precision"),
                (r.recall, "recall"),
                (r.f1, "f1"),
                (r.accuracy, "accuracy"),
            ] {
                let want = floats(&case, key)[0];
                assert!((got - want).abs() < 1e-12, "{name}.{key}: {got} vs {want}");
            }
            let chunks: Vec<String> = truth
                .iter()
                .flat_map(|s| entities(s))
                .map(|(t, a, b)| format!("{t}:{a}:{b}"))
                .collect();
            assert_eq!(chunks, case["entities"], "{name}");
        }
    }

    #[test]
    fn regression_report_equals_scikit_learn_and_scipy() {
        for name in ["regression", "regression_ties", "regression_constant"] {
            let case = sklearn_case(name);
            let r = regression_report(&floats(&case, "true"), &floats(&case, "pred"));
            assert_eq!(r.samples, case["true"].len());
            for (got, key) in [
                (r.mse, "mse"),
                (r.pearson, "pearson"),
                (r.spearmanr, "spearmanr"),
            ] {
                let want = floats(&case, key)[0];
                assert!(
                    (want.is_nan() && got.is_nan()) || (got - want).abs() < 1e-12,
                    "{name}.{key}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn multiclass_report_equals_scikit_learn_fixture() {
        for name in ["multiclass", "multiclass_constant"] {
            let case = sklearn_case(name);
            let n = ints(&case, "n")[0];
            let r = classification_report(&ints(&case, "true"), &ints(&case, "pred"), n);
            assert_report_equals(&r, &case);
        }
    }

    #[test]
    fn multilabel_report_equals_scikit_learn_on_flattened_decisions() {
        for name in ["multilabel", "multilabel_empty"] {
            let case = sklearn_case(name);
            let n = ints(&case, "n")[0];
            // "0110" -> labels {1, 2}
            let sets = |key: &str| -> Vec<Vec<usize>> {
                case[key]
                    .iter()
                    .map(|row| {
                        assert_eq!(row.len(), n);
                        row.char_indices()
                            .filter(|&(_, c)| c == '1')
                            .map(|(k, _)| k)
                            .collect()
                    })
                    .collect()
            };
            let r = multilabel_report(&sets("true"), &sets("pred"), n);
            assert_report_equals(&r, &case);
        }
        // The example tells the pooled MCC from the mean of per-label MCCs.
        let case = sklearn_case("multilabel");
        let (pooled, mean) = (floats(&case, "mcc")[0], floats(&case, "mcc_label_mean")[0]);
        assert!((pooled - mean).abs() > 0.05, "{pooled} vs {mean}");
    }

    #[test]
    fn perplexity_is_exp_of_loss() {
        close(perplexity(0.0), 1.0);
        close(perplexity(2.0f64.ln()), 2.0);
    }

    #[test]
    fn squad_scores_normalise_and_take_the_best_gold() {
        let golds = vec!["the Eiffel Tower".to_string(), "Tower".to_string()];
        // Articles, case and punctuation do not count.
        assert_eq!(squad_scores("Eiffel tower!", &golds), (1.0, 1.0));
        // "eiffel" vs gold 1 ["eiffel", "tower"]: precision 1, recall 1/2, F1 2/3.
        let (em, f1) = squad_scores("Eiffel", &golds);
        assert_eq!(em, 0.0);
        assert!((f1 - 2.0 / 3.0).abs() < 1e-12, "{f1}");
        assert_eq!(squad_scores("Paris", &golds), (0.0, 0.0));
        assert_eq!(squad_scores("", &[]), (1.0, 1.0));
    }
}
