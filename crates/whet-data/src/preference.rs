//! Preference pairs for reward modelling and DPO, in the shapes `trl` takes them: `prompt`,
//! `chosen`, `rejected` columns (explicit prompt), or `chosen` and `rejected` only (the prompt
//! inside both), and BIG-bench's `hhh_alignment` `task.json` files (`examples` of `input` and
//! `target_scores`, the better answer scored 1, each worse one 0).

use std::path::Path;

use serde_json::Value;

use whet_text::{ChatMessage, TextTokenizer};

use crate::error::{DataError, Result};
use crate::table::{Encoding, Table};

/// One ranked pair: the prompt, the preferred and the dispreferred continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    /// Empty when the prompt is inside `chosen` and `rejected` (trl's implicit prompt).
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// `file:line` (or `file: example N`) for error messages.
    pub origin: String,
    /// Conversational data (trl's format: lists of `{role, content}` messages): [`render_chats`]
    /// fills the texts above from them, and keeps them (the prompt extracted).
    pub messages: Option<PairMessages>,
}

/// The messages of a conversational preference pair: the prompt's turns (empty when the prompt
/// is inside both answers) and each answer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairMessages {
    pub prompt: Vec<ChatMessage>,
    pub chosen: Vec<ChatMessage>,
    pub rejected: Vec<ChatMessage>,
}

impl PreferencePair {
    /// Whether the pair is conversational: its texts are the chat template's, tokenized as
    /// they are (no special tokens added, no EOS appended), as trl tokenizes conversations.
    pub fn is_chat(&self) -> bool {
        self.messages.is_some()
    }

    /// The chosen and rejected texts as the model reads them: the prompt followed by each.
    pub fn texts(&self) -> (String, String) {
        (
            format!("{}{}", self.prompt, self.chosen),
            format!("{}{}", self.prompt, self.rejected),
        )
    }
}

fn value_error(path: &Path, line: usize, column: &str, message: String) -> DataError {
    DataError::Value {
        path: path.to_path_buf(),
        line,
        column: column.to_string(),
        message,
    }
}

/// Checks a pair: its two answers differ (a pair whose answers are equal teaches nothing and
/// usually means the columns were mapped wrongly).
fn checked(pair: PreferencePair, path: &Path, line: usize) -> Result<PreferencePair> {
    if pair.chosen == pair.rejected {
        return Err(value_error(
            path,
            line,
            "rejected",
            "chosen and rejected are identical; a preference pair needs two different answers"
                .into(),
        ));
    }
    Ok(pair)
}

/// The pairs of a table with `chosen` and `rejected` columns, and `prompt` when it has one.
pub fn preference_pairs(table: &Table) -> Result<Vec<PreferencePair>> {
    table.require(&["chosen", "rejected"])?;
    let explicit = table.columns.iter().any(|c| c == "prompt");
    let mut pairs = Vec::with_capacity(table.rows.len());
    for (at, row) in &table.rows {
        let (file, line) = table.locate(*at);
        let path = file.as_path();
        let missing = |column: &str| {
            value_error(
                path,
                line,
                column,
                "missing: every row needs chosen and rejected (and prompt, when the file has \
                 that column)"
                    .into(),
            )
        };
        let conversational = ["prompt", "chosen", "rejected"]
            .iter()
            .any(|c| matches!(row.get(*c), Some(Value::Array(_))));
        if conversational {
            let turns = |column: &str| -> Result<Vec<ChatMessage>> {
                match row.get(column) {
                    None | Some(Value::Null) => Err(missing(column)),
                    Some(v) => crate::causal_lm::chat_messages(v)
                        .map_err(|m| value_error(path, line, column, m)),
                }
            };
            let messages = PairMessages {
                prompt: if explicit { turns("prompt")? } else { vec![] },
                chosen: turns("chosen")?,
                rejected: turns("rejected")?,
            };
            if messages.chosen == messages.rejected {
                return Err(value_error(
                    path,
                    line,
                    "rejected",
                    "chosen and rejected are identical; a preference pair needs two different \
                     answers"
                        .into(),
                ));
            }
            pairs.push(PreferencePair {
                prompt: String::new(),
                chosen: String::new(),
                rejected: String::new(),
                origin: format!("{}:{line}", path.display()),
                messages: Some(messages),
            });
            continue;
        }
        let text = |column: &str| -> Result<String> {
            match row.get(column) {
                Some(Value::String(s)) => Ok(s.clone()),
                None | Some(Value::Null) => Err(missing(column)),
                Some(other) => Ok(other.to_string()),
            }
        };
        let pair = PreferencePair {
            prompt: if explicit {
                text("prompt")?
            } else {
                String::new()
            },
            chosen: text("chosen")?,
            rejected: text("rejected")?,
            origin: format!("{}:{line}", path.display()),
            messages: None,
        };
        pairs.push(checked(pair, path, line)?);
    }
    Ok(pairs)
}

/// trl's `extract_prompt` for conversations (DPOTrainer runs it on data without a `prompt`
/// column): the prompt is the turns before the first turn where `chosen` and `rejected` differ;
/// as trl's loop does, when neither differs within the shorter one, its last turn goes to the
/// answers.
pub fn extract_prompt_turns(m: &PairMessages) -> PairMessages {
    let n = m.chosen.len().min(m.rejected.len());
    let at = (0..n)
        .find(|&i| m.chosen[i] != m.rejected[i])
        .unwrap_or(n.saturating_sub(1));
    PairMessages {
        prompt: m.chosen[..at].to_vec(),
        chosen: m.chosen[at..].to_vec(),
        rejected: m.rejected[at..].to_vec(),
    }
}

/// Renders conversational pairs with the tokenizer's chat template, as trl 1.16 reads them:
/// - without a prompt, the prompt is first taken out of both conversations at the first turn
///   where they differ ([`extract_prompt_turns`], DPOTrainer's `extract_prompt`);
/// - the prompt is rendered with the generation prompt (when its last turn is the user's);
///   each answer is the rendering of prompt + answer after the prompt, the prompt first cut to
///   its common prefix with that rendering (for templates that render the generation prompt
///   differently inside a conversation).
///
/// The pair keeps its (extracted) messages, so the encoders tokenize it as trl tokenizes
/// conversations: the template's text without added special tokens or EOS, the DPO prompt
/// rendered with the generation prompt ([`PreferencePair::is_chat`]). Pairs of plain text
/// pass unchanged.
pub fn render_chats(
    pairs: Vec<PreferencePair>,
    tokenizer: &TextTokenizer,
) -> Result<Vec<PreferencePair>> {
    pairs
        .into_iter()
        .map(|pair| {
            let Some(given) = pair.messages.clone() else {
                return Ok(pair);
            };
            let err = |message: String| DataError::Template {
                origin: pair.origin.clone(),
                message,
            };
            let render = |msgs: &[ChatMessage], gen_prompt: bool| {
                tokenizer
                    .apply_chat_template(msgs, gen_prompt)
                    .map_err(|e| err(e.to_string()))
            };
            let m = if given.prompt.is_empty() {
                extract_prompt_turns(&given)
            } else {
                given
            };
            if m.prompt.last().is_some_and(|t| t.role == "assistant") {
                return Err(err(
                    "the prompt ends with an assistant turn (trl continues that message; whet \
                     does not): end the prompt with the user's turn"
                        .into(),
                ));
            }
            let mut prompt = if m.prompt.is_empty() {
                String::new()
            } else {
                render(&m.prompt, true)?
            };
            let mut answer = |turns: &[ChatMessage]| -> Result<String> {
                let whole: Vec<ChatMessage> = m.prompt.iter().chain(turns).cloned().collect();
                let text = render(&whole, false)?;
                let common = prompt
                    .char_indices()
                    .zip(text.chars())
                    .take_while(|((_, a), b)| a == b)
                    .last()
                    .map_or(0, |((i, a), _)| i + a.len_utf8());
                prompt.truncate(common);
                Ok(text[common..].to_string())
            };
            let chosen = answer(&m.chosen)?;
            let rejected = answer(&m.rejected)?;
            Ok(PreferencePair {
                prompt,
                chosen,
                rejected,
                origin: pair.origin,
                messages: Some(m),
            })
        })
        .collect()
}

/// Reads a preference file: a BIG-bench `task.json` (by its `examples` list), or any table
/// [`Table::read`] reads with `chosen` / `rejected` columns (a file, a folder or glob of them,
/// or an `hf://datasets/...` path); or a folder whose `*/task.json` files are read in name
/// order (BIG-bench's `hhh_alignment` folder: harmless, helpful, honest, other).
pub fn read_pairs(path: &Path, encoding: Encoding) -> Result<Vec<PreferencePair>> {
    let local = crate::table::resolve(path)?;
    let path = local.as_path();
    if path.is_dir() {
        let io = |e| DataError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let mut tasks: Vec<_> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path().join("task.json")))
            .filter(|p| p.is_file())
            .collect();
        tasks.sort();
        // Without BIG-bench tasks, a folder of data files, read as one table below.
        if !tasks.is_empty() {
            let mut all = Vec::new();
            for t in tasks {
                all.extend(bigbench_pairs(&t)?);
            }
            return Ok(all);
        }
    }
    let is_bigbench = path.extension().is_some_and(|e| e == "json")
        && std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v.get("examples").is_some());
    let pairs = if is_bigbench {
        bigbench_pairs(path)?
    } else {
        preference_pairs(&Table::read(path, encoding)?)?
    };
    if pairs.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(pairs)
}

/// The pairs of a BIG-bench task (`hhh_alignment`): per example, the answer scored 1 against
/// each answer scored 0, after the `input` prompt and a space.
pub fn bigbench_pairs(path: &Path) -> Result<Vec<PreferencePair>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        message: format!("not a BIG-bench task.json: {e}"),
    })?;
    let examples = json
        .get("examples")
        .and_then(|e| e.as_array())
        .ok_or_else(|| DataError::Format {
            path: path.to_path_buf(),
            message: "no \"examples\" list".into(),
        })?;
    let mut pairs = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        let n = i + 1;
        let bad = |message: String| DataError::Format {
            path: path.to_path_buf(),
            message: format!("example {n}: {message}"),
        };
        let input = ex
            .get("input")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no \"input\" text".into()))?;
        let scores = ex
            .get("target_scores")
            .and_then(|v| v.as_object())
            .ok_or_else(|| bad("no \"target_scores\" object".into()))?;
        let mut better = None;
        let mut worse = Vec::new();
        for (answer, score) in scores {
            match score.as_f64() {
                Some(s) if s > 0.5 => better = Some(answer.clone()),
                Some(_) => worse.push(answer.clone()),
                None => return Err(bad(format!("score of {answer:?} is not a number"))),
            }
        }
        let better = better.ok_or_else(|| bad("no answer scored 1".into()))?;
        if worse.is_empty() {
            return Err(bad("no answer scored 0".into()));
        }
        for w in worse {
            let pair = PreferencePair {
                prompt: format!("{input} "),
                chosen: better.clone(),
                rejected: w,
                origin: format!("{}: example {n}", path.display()),
                messages: None,
            };
            pairs.push(checked(pair, path, n)?);
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn explicit_and_implicit_prompts_read_as_trl_takes_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "a.jsonl",
            "{\"prompt\": \"Q: hi\\nA:\", \"chosen\": \" hello\", \"rejected\": \" go away\"}\n",
        );
        let pairs = read_pairs(&p, Encoding::Utf8).unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].texts().0, "Q: hi\nA: hello");
        assert_eq!(pairs[0].texts().1, "Q: hi\nA: go away");
        let p = write(
            dir.path(),
            "b.jsonl",
            "{\"chosen\": \"Q: hi A: hello\", \"rejected\": \"Q: hi A: no\"}\n",
        );
        let pairs = read_pairs(&p, Encoding::Utf8).unwrap();
        assert_eq!(pairs[0].prompt, "");
        assert_eq!(pairs[0].texts().0, "Q: hi A: hello");
    }

    #[test]
    fn bad_pairs_get_errors_that_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let same = write(
            dir.path(),
            "same.jsonl",
            "{\"chosen\": \"a\", \"rejected\": \"b\"}\n{\"chosen\": \"x\", \"rejected\": \"x\"}\n",
        );
        let e = read_pairs(&same, Encoding::Utf8).unwrap_err().to_string();
        assert!(e.contains("same.jsonl:2") && e.contains("identical"), "{e}");
        let missing = write(
            dir.path(),
            "missing.jsonl",
            "{\"chosen\": \"a\", \"rejected\": \"b\"}\n{\"chosen\": \"c\"}\n",
        );
        let e = read_pairs(&missing, Encoding::Utf8)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.jsonl:2") && e.contains("rejected"),
            "{e}"
        );
        let no_column = write(dir.path(), "nocol.jsonl", "{\"chosen\": \"a\"}\n");
        let e = read_pairs(&no_column, Encoding::Utf8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rejected"), "{e}");
        let empty = write(dir.path(), "empty.jsonl", "");
        let e = read_pairs(&empty, Encoding::Utf8).unwrap_err().to_string();
        assert!(e.contains("no rows"), "{e}");
        let bb = write(
            dir.path(),
            "task.json",
            "{\"examples\": [{\"input\": \"q\", \"target_scores\": {\"a\": 1, \"b\": 1}}]}",
        );
        let e = read_pairs(&bb, Encoding::Utf8).unwrap_err().to_string();
        assert!(e.contains("example 1") && e.contains("scored 0"), "{e}");
    }

    #[test]
    fn bigbench_examples_pair_the_better_answer_with_each_worse_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "task.json",
            r#"{"name": "hhh", "examples": [
                {"input": "How do I bake bread?", "target_scores": {"Mix flour and water.": 1, "No.": 0}},
                {"input": "Hi", "target_scores": {"Hello!": 1, "Go away.": 0, "...": 0}}
            ]}"#,
        );
        let pairs = read_pairs(&p, Encoding::Utf8).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(
            pairs[0].texts().0,
            "How do I bake bread? Mix flour and water."
        );
        assert_eq!(pairs[0].texts().1, "How do I bake bread? No.");
        assert!(pairs[1..].iter().all(|p| p.chosen == "Hello!"));
        assert!(pairs[2].origin.ends_with("example 2"));
        // A folder of tasks reads each */task.json in name order.
        let sub = dir.path().join("tasks/b");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::copy(&p, sub.join("task.json")).unwrap();
        std::fs::create_dir_all(dir.path().join("tasks/a")).unwrap();
        write(
            &dir.path().join("tasks/a"),
            "task.json",
            r#"{"examples": [{"input": "q", "target_scores": {"yes": 1, "no": 0}}]}"#,
        );
        let all = read_pairs(&dir.path().join("tasks"), Encoding::Utf8).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].chosen, "yes");
    }
}
