//! Text in, token ids out, for whet, without a tensor library.
//!
//! [`TextTokenizer`] loads a Hugging Face tokenizer from a model folder
//! ([`TextTokenizer::from_folder`]) or from a GGUF file's metadata ([`gguf::tokenizer`]),
//! encodes and decodes as `transformers` does, and renders chat templates as
//! `apply_chat_template` does. [`fsutil::write_atomic`] writes a file so that a crash leaves
//! either the old one or the new one.

pub mod error;
pub mod fsutil;
pub mod gguf;
pub mod tokenizer;

pub use error::{Result, TextError};
pub use fsutil::write_atomic;
pub use tokenizer::{ChatMessage, Special, TextTokenizer};
