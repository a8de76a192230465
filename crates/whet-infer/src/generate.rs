//! Autoregressive generation with a key/value cache: greedy decoding, or sampling with
//! temperature, top-k and top-p as `transformers`' `generate` does them.

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whet_models::{CausalLm, DecoderInput, Mode, ModelError, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (ties go to the lowest id, as `argmax` does).
    Greedy,
    /// Sample from the softmax of `logits / temperature`, restricted to the `top_k` most likely
    /// tokens and to the smallest set whose probability reaches `top_p`.
    Sample {
        temperature: f32,
        top_k: Option<usize>,
        top_p: f32,
        seed: u64,
    },
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// How many tokens to add at most.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Generation stops after any of these tokens (it is included in the output).
    pub eos_token_ids: Vec<u32>,
    /// `transformers`' `repetition_penalty` (CTRL paper): the logit of every token already in
    /// the sequence (prompt included) is divided by it when positive and multiplied by it when
    /// negative. 1.0 is off.
    pub repetition_penalty: f32,
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens`, stopping at `eos_token_ids`.
    pub fn greedy(max_new_tokens: usize, eos_token_ids: Vec<u32>) -> Self {
        Self {
            max_new_tokens,
            sampling: Sampling::Greedy,
            eos_token_ids,
            repetition_penalty: 1.0,
        }
    }
}

/// Applies the repetition penalty to `logits` for every token id in `seen`, as
/// `RepetitionPenaltyLogitsProcessor` does (each id once, however often it occurs).
pub fn penalize_repetition(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize)
            && done.insert(id)
        {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// Generates a continuation of `prompt`, calling `on_token` with each new token as soon as it
/// is chosen (for streaming); generation stops early when it returns `false` (a stop string
/// was seen). Returns the new tokens.
pub fn generate<M: CausalLm>(
    model: &M,
    prompt: &[u32],
    config: &GenerationConfig,
    device: &burn::tensor::Device,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt encodes to no tokens".into()));
    }
    let total = prompt.len() + config.max_new_tokens;
    if config.repetition_penalty <= 0.0 || !config.repetition_penalty.is_finite() {
        return Err(ModelError::Input(format!(
            "repetition_penalty must be a positive number, got {}",
            config.repetition_penalty
        )));
    }
    if total > model.max_positions() {
        return Err(ModelError::Input(format!(
            "prompt ({} tokens) + max_new_tokens ({}) = {total} exceeds the model's {} positions",
            prompt.len(),
            config.max_new_tokens,
            model.max_positions()
        )));
    }
    let mut rng = match config.sampling {
        Sampling::Sample { seed, .. } => Some(StdRng::seed_from_u64(seed)),
        Sampling::Greedy => None,
    };
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let mut next_input: Vec<u32> = prompt.to_vec();
    for _ in 0..config.max_new_tokens {
        if crosses_rope_switch(model, cache.len(), next_input.len()) {
            // transformers' Phi-3 drops the cache there and runs the whole sequence again
            // with the long factors.
            cache = model.new_cache();
            next_input = prompt.iter().chain(&out).copied().collect();
        }
        let t = next_input.len();
        let past = cache.len();
        let ids: Tensor<2, Int> = Tensor::from_data(
            TensorData::new(next_input.iter().map(|&i| i as i64).collect(), [1, t]),
            device,
        );
        let input = DecoderInput {
            input_ids: ids,
            attention_mask: Tensor::ones([1, past + t], device),
            position_ids: None,
            document_ids: None,
            unpadded: None,
        };
        let hidden = model.forward_hidden(input, Some(&mut cache), Mode::Eval);
        let [_, _, h] = hidden.dims();
        // Only the last position's logits are needed: (1, 1, H) -> (1, 1, V)
        // A soft prompt puts its positions in front of the first call's hidden states.
        let n = hidden.dims()[1];
        let last = hidden.slice([0..1, n - 1..n, 0..h]);
        let mut logits: Vec<f32> = model
            .lm_logits(last)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| ModelError::Input(format!("cannot read logits: {e:?}")))?;
        if config.repetition_penalty != 1.0 {
            // Each id once, whether it occurs in the prompt, the output or both.
            let seen: Vec<u32> = prompt.iter().chain(&out).copied().collect();
            penalize_repetition(&mut logits, &seen, config.repetition_penalty);
        }
        let token = match (&config.sampling, rng.as_mut()) {
            (
                Sampling::Sample {
                    temperature,
                    top_k,
                    top_p,
                    ..
                },
                Some(rng),
            ) => sample(&logits, *temperature, *top_k, *top_p, rng),
            _ => argmax(&logits),
        };
        out.push(token);
        let go_on = on_token(token);
        if !go_on || config.eos_token_ids.contains(&token) {
            break;
        }
        next_input = vec![token];
    }
    Ok(out)
}

/// Whether this step is the one where LongRoPE's long factors take over (the cached keys were
/// rotated with the short ones): the sequence reaches `switch + 1` tokens with at most
/// `switch` cached, as Phi-3's `prepare_inputs_for_generation` tests it.
fn crosses_rope_switch<M: CausalLm>(model: &M, past: usize, new: usize) -> bool {
    model
        .rope_switch()
        .is_some_and(|s| past > 0 && past <= s && past + new > s)
}

/// Continues several prompts at once, left-padded with `pad_id` as `transformers` pads a
/// decoder batch: the mask hides the padding, positions count real tokens only (the first real
/// token of each row has position 0), and every row goes through one forward pass per step
/// with the key/value cache. A finished row is fed padding until all rows are done. Returns
/// each row's new tokens (its EOS included); greedy rows equal what [`generate`] gives alone.
pub fn generate_batch<M: CausalLm>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    pad_id: u32,
    device: &burn::tensor::Device,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(ModelError::Input(format!(
            "prompt {i} encodes to no tokens"
        )));
    }
    let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if width + config.max_new_tokens > model.max_positions() {
        return Err(ModelError::Input(format!(
            "the longest prompt ({width} tokens) + max_new_tokens ({}) exceeds the model's {} positions",
            config.max_new_tokens,
            model.max_positions()
        )));
    }
    let mut rng = match config.sampling {
        Sampling::Sample { seed, .. } => Some(StdRng::seed_from_u64(seed)),
        Sampling::Greedy => None,
    };
    // (B, width) left-padded ids, mask and positions.
    let mut ids = Vec::with_capacity(b * width);
    let mut mask: Vec<Vec<i64>> = Vec::with_capacity(b);
    let mut positions = Vec::with_capacity(b * width);
    for p in prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(pad_id as i64, pad));
        ids.extend(p.iter().map(|&t| t as i64));
        mask.push([vec![0; pad], vec![1; p.len()]].concat());
        positions.extend(std::iter::repeat_n(0, pad));
        positions.extend(0..p.len() as i64);
    }
    let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    // Every row so far, for a LongRoPE model that runs the whole sequence again.
    let mut history: Vec<Vec<i64>> = ids.chunks(width).map(|r| r.to_vec()).collect();
    let mut history_pos: Vec<Vec<i64>> = positions.chunks(width).map(|r| r.to_vec()).collect();
    let mut cache = model.new_cache();
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    let mut t = width;
    let mut virtual_tokens = 0;
    for step in 0..config.max_new_tokens {
        let tensor = |v: Vec<i64>, cols: usize| {
            Tensor::<2, Int>::from_data(TensorData::new(v, [b, cols]), device)
        };
        if virtual_tokens == 0 && crosses_rope_switch(model, cache.len(), t) {
            cache = model.new_cache();
            t = history[0].len();
            ids = history.concat();
            positions = history_pos.concat();
        }
        // Virtual tokens (prefix or prompt tuning) sit in the cache in front of the real
        // ones: the mask covers them, and real positions count from after them.
        let cols = virtual_tokens + mask[0].len();
        let full_mask: Vec<i64> = mask
            .iter()
            .flat_map(|m| std::iter::repeat_n(1, virtual_tokens).chain(m.iter().copied()))
            .collect();
        let shifted: Vec<i64> = std::mem::take(&mut positions)
            .into_iter()
            .map(|p| p + virtual_tokens as i64)
            .collect();
        let input = DecoderInput {
            input_ids: tensor(std::mem::take(&mut ids), t),
            attention_mask: tensor(full_mask, cols),
            position_ids: Some(tensor(shifted, t)),
            document_ids: None,
            unpadded: None,
        };
        let hidden = model.forward_hidden(input, Some(&mut cache), Mode::Eval);
        let [_, n, h] = hidden.dims();
        if step == 0 {
            // The model placed its virtual tokens on this first call.
            virtual_tokens = cache.len() - width;
        }
        // (B, n, H) -> (B, 1, H) -> (B, 1, V); a soft prompt adds positions in front.
        let logits: Vec<f32> = model
            .lm_logits(hidden.slice([0..b, n - 1..n, 0..h]))
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| ModelError::Input(format!("cannot read logits: {e:?}")))?;
        let v = logits.len() / b;
        for r in 0..b {
            let token = if done[r] {
                pad_id
            } else {
                let mut row = logits[r * v..(r + 1) * v].to_vec();
                if config.repetition_penalty != 1.0 {
                    let seen: Vec<u32> = prompts[r].iter().chain(&out[r]).copied().collect();
                    penalize_repetition(&mut row, &seen, config.repetition_penalty);
                }
                let token = match (&config.sampling, rng.as_mut()) {
                    (
                        Sampling::Sample {
                            temperature,
                            top_k,
                            top_p,
                            ..
                        },
                        Some(rng),
                    ) => sample(&row, *temperature, *top_k, *top_p, rng),
                    _ => argmax(&row),
                };
                out[r].push(token);
                done[r] = config.eos_token_ids.contains(&token);
                token
            };
            ids.push(token as i64);
            positions.push(next_pos[r]);
            history[r].push(token as i64);
            history_pos[r].push(next_pos[r]);
            next_pos[r] += 1;
            mask[r].push(1);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        t = 1;
    }
    Ok(out)
}

/// Index of the largest value; the first one on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples one token: temperature, then top-k, then top-p (nucleus), then the softmax.
pub fn sample(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: f32,
    rng: &mut impl Rng,
) -> u32 {
    let t = temperature.max(1e-5);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let k = top_k.unwrap_or(order.len()).clamp(1, order.len());
    order.truncate(k);
    let max = logits[order[0]] / t;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] / t - max) as f64).exp())
        .collect();
    let sum: f64 = weights.iter().sum();
    // Keep the smallest prefix whose mass reaches top_p (always at least one token).
    let mut keep = order.len();
    if top_p < 1.0 {
        let mut acc = 0.0;
        for (n, w) in weights.iter().enumerate() {
            acc += w / sum;
            if acc >= top_p as f64 {
                keep = n + 1;
                break;
            }
        }
    }
    let kept_sum: f64 = weights[..keep].iter().sum();
    let mut r = rng.random::<f64>() * kept_sum;
    for (n, w) in weights[..keep].iter().enumerate() {
        r -= w;
        if r <= 0.0 {
            return order[n] as u32;
        }
    }
    order[keep - 1] as u32
}

/// Where generated text ends at a stop string, as transformers' `stop_strings` decide it: a
/// stop string may begin in the prompt (`context`, its decoded text) as long as it ends in the
/// generated text. Returns the byte offset in `generated` just past the earliest-ending stop
/// string, or None. Empty stop strings are ignored.
pub fn stop_end(context: &str, generated: &str, stops: &[String]) -> Option<usize> {
    let joined = format!("{context}{generated}");
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            // The first match ending past the context; matches may overlap ("\n\n" in
            // "\n\n\n"), so search again one character after each too-early one.
            let mut from = context.len().saturating_sub(s.len());
            while !joined.is_char_boundary(from) {
                from -= 1;
            }
            while let Some(i) = joined[from..].find(s.as_str()) {
                let end = from + i + s.len();
                if end > context.len() {
                    return Some(end);
                }
                from += i + joined[from + i..].chars().next().map_or(1, char::len_utf8);
            }
            None
        })
        .min()
        .map(|end| end - context.len())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_stop_string_may_begin_in_the_prompt() {
        let stops = vec!["\n\n".to_string(), "".to_string()];
        // The prompt ends in a newline and the first new token is one: stop after it.
        assert_eq!(stop_end("def f(n):\n", "\n    return", &stops), Some(1));
        // Entirely inside the prompt: not a stop.
        assert_eq!(stop_end("a\n\nb", "cd", &stops), None);
        assert_eq!(stop_end("", "ab\n\ncd", &stops), Some(4));
        // The earliest end wins across stop strings.
        let two = vec!["cd".to_string(), "b".to_string()];
        assert_eq!(stop_end("a", "bcd", &two), Some(1));
        // Overlapping: the prompt ends in "\n\n", one more newline ends a new "\n\n".
        assert_eq!(stop_end("x\n\n", "\ny", &stops), Some(1));
        assert_eq!(stop_end("é\n", "\né", &stops), Some(1));
    }

    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut l = [2.0, -2.0, 3.0, 1.0];
        penalize_repetition(&mut l, &[0, 1, 1, 3, 0, 9], 2.0);
        assert_eq!(l, [1.0, -4.0, 3.0, 0.5]);
        let mut same = [2.0, -2.0];
        penalize_repetition(&mut same, &[0, 1], 1.0);
        assert_eq!(same, [2.0, -2.0]);
    }

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..20 {
            assert_eq!(sample(&[0.1, 2.0, 1.9], 1.0, Some(1), 1.0, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // probabilities ~ 0.88, 0.12, ~0: top_p 0.5 keeps only the first
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            assert_eq!(sample(&[4.0, 2.0, -10.0], 1.0, None, 0.5, &mut rng), 0);
        }
    }

    #[test]
    fn sampling_is_seeded_and_spreads() {
        let logits = [0.0f32; 8];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..64)
                .map(|_| sample(&logits, 1.0, None, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let distinct: std::collections::BTreeSet<_> = draw(7).into_iter().collect();
        assert!(
            distinct.len() > 4,
            "uniform logits should reach most tokens"
        );
    }
}
