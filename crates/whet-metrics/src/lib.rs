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
    let mean = |f: &dyn Fn(&ClassScores) -> f64| {
        per_class.iter().map(f).sum::<f64>() / n_classes.max(1) as f64
    };
    let macro_avg = Averaged {
        precision: mean(&|c| c.precision),
        recall: mean(&|c| c.recall),
        f1: mean(&|c| c.f1),
    };
    let weighted = |f: &dyn Fn(&ClassScores) -> f64| {
        ratio(
            per_class
                .iter()
                .map(|c| f(c) * c.support as f64)
                .sum::<f64>(),
            n as f64,
        )
    };
    let weighted_avg = Averaged {
        precision: weighted(&|c| c.precision),
        recall: weighted(&|c| c.recall),
        f1: weighted(&|c| c.f1),
    };
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

/// Perplexity of a mean token cross-entropy (natural log).
pub fn perplexity(mean_loss: f64) -> f64 {
    mean_loss.exp()
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

    #[test]
    fn perplexity_is_exp_of_loss() {
        close(perplexity(0.0), 1.0);
        close(perplexity(2.0f64.ln()), 2.0);
    }
}
