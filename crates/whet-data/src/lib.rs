//! Training data for whet: reading JSONL, CSV and Parquet, mapping columns and labels, seeded splits,
//! tokenization with truncation, dynamic padding and a per-epoch seeded order.

pub mod causal_lm;
pub mod classification;
pub mod error;
pub mod leakage;
pub mod preference;
pub mod question_answering;
pub mod table;
pub mod token_classification;

pub use causal_lm::{
    IGNORE, Limit, LmExample, Template, TooLong, chat, chat_completion, group_texts, pack,
    prompt_completion,
};
pub use classification::{
    Batch, Columns, Encoded, Example, LabelKind, Labels, Side, Size, Target, collate, epoch_order,
    examples, length_grouped, real_valued, seeded_split, tokenize, tokenize_cached,
};
pub use error::{DataError, Result};
pub use preference::{PreferencePair, read_pairs};
pub use question_answering::{Answer, QaColumns, QaExample, QaFeature, qa_examples, qa_features};
pub use table::{Encoding, Table};
pub use token_classification::{
    IGNORE_TAG, TokenBatch, TokenColumns, TokenEncoded, TokenExample, collate_tokens,
    token_examples, tokenize_words,
};
