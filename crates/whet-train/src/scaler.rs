//! Dynamic loss scaling for `fp16 = true`, as PyTorch's `torch.amp.GradScaler` with its
//! defaults, which `Trainer` uses for fp16.
//!
//! float16 keeps 5 exponent bits: small gradients flush to zero. The loss is multiplied by the
//! scale before the backward pass, so the 16-bit gradients are large, and the f32 parameter
//! gradients are divided by it again before clipping. A step whose gradients overflowed (a
//! non-finite norm) is skipped, and the scale halves; after [`GROWTH_INTERVAL`] good steps in a
//! row it doubles. A skipped step does not advance the learning-rate schedule (`Trainer` steps
//! the scheduler only when the optimizer stepped) nor AdamW's step count.

use serde::{Deserialize, Serialize};

/// `GradScaler(init_scale=2.**16)`.
pub const INIT_SCALE: f64 = 65536.0;
/// `growth_factor=2.0`.
pub const GROWTH_FACTOR: f64 = 2.0;
/// `backoff_factor=0.5`.
pub const BACKOFF_FACTOR: f64 = 0.5;
/// `growth_interval=2000`.
pub const GROWTH_INTERVAL: usize = 2000;

/// The scaler's state; checkpoints keep it (`trainer_state.json`), as `Trainer` keeps
/// `scaler.pt`, so a resumed fp16 run scales as the uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// What the loss is multiplied by before the backward pass.
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub growth_tracker: usize,
    /// Optimizer steps skipped for overflowing gradients, over the whole run.
    pub skipped: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: INIT_SCALE,
            growth_tracker: 0,
            skipped: 0,
        }
    }
}

impl LossScaler {
    /// Takes a step's outcome (`finite`: its unscaled gradients have a finite norm) and
    /// returns whether the optimizer may step, adjusting the scale as `GradScaler.update`.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.growth_tracker += 1;
            if self.growth_tracker == GROWTH_INTERVAL {
                self.scale *= GROWTH_FACTOR;
                self.growth_tracker = 0;
            }
        } else {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            self.skipped += 1;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_the_interval() {
        let mut s = LossScaler::default();
        assert!(!s.update(false));
        assert_eq!((s.scale, s.growth_tracker, s.skipped), (32768.0, 0, 1));
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.growth_tracker, s.skipped), (65536.0, 0, 1));
        // An overflow resets the run of good steps.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.growth_tracker, s.skipped), (32768.0, 0, 2));
    }
}
