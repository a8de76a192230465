//! Training data for whet: reading JSONL and CSV, mapping columns and labels, seeded splits,
//! tokenization with truncation, dynamic padding and a per-epoch seeded order.

pub mod classification;
pub mod error;
pub mod table;

pub use classification::{
    Batch, Columns, Encoded, Example, Labels, Side, Size, collate, epoch_order, examples,
    seeded_split, tokenize,
};
pub use error::{DataError, Result};
pub use table::{Encoding, Table};
