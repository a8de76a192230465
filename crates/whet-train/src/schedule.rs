//! Learning-rate schedules as pure functions of the step, as `transformers.get_scheduler`
//! defines them (`get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup`, ...).

use serde::{Deserialize, Serialize};

/// `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Warmup, then linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Warmup, then half a cosine down to 0.
    Cosine,
    /// The base rate throughout (no warmup).
    Constant,
    /// Warmup, then the base rate.
    ConstantWithWarmup,
}

/// The multiplier of the base learning rate at optimizer step `step` (0-based, the step about
/// to be taken), out of `total` steps with `warmup` warmup steps.
pub fn lr_factor(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    let (s, w, t) = (step as f64, warmup as f64, total as f64);
    if schedule != Schedule::Constant && step < warmup {
        return s / w.max(1.0);
    }
    match schedule {
        Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
        Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
        Schedule::Cosine => {
            let progress = (s - w) / (t - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warms_up_then_decays_to_zero() {
        // transformers: lr_lambda = step / warmup while warming, then (total - step) / (total - warmup)
        assert_eq!(lr_factor(Schedule::Linear, 0, 2, 10), 0.0);
        assert_eq!(lr_factor(Schedule::Linear, 1, 2, 10), 0.5);
        assert_eq!(lr_factor(Schedule::Linear, 2, 2, 10), 1.0);
        assert_eq!(lr_factor(Schedule::Linear, 6, 2, 10), 0.5);
        assert_eq!(lr_factor(Schedule::Linear, 10, 2, 10), 0.0);
        assert_eq!(lr_factor(Schedule::Linear, 0, 0, 4), 1.0);
    }

    #[test]
    fn cosine_is_half_at_the_middle() {
        assert!((lr_factor(Schedule::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_factor(Schedule::Cosine, 2, 2, 10) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn constant_ignores_warmup_and_constant_with_warmup_does_not() {
        assert_eq!(lr_factor(Schedule::Constant, 0, 5, 10), 1.0);
        assert_eq!(lr_factor(Schedule::ConstantWithWarmup, 1, 4, 10), 0.25);
    }
}
