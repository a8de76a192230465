//! Unknown keys in a recipe: every table of a recipe is checked against the fields its struct
//! declares, so a typo (`lora_alfa`) is an error naming the key, the table and the closest
//! valid key instead of a run with the default.
//!
//! The adapter tables reuse whet-peft's configuration structs, which also read peft's
//! `adapter_config.json` (full of keys whet does not use), so they cannot carry
//! `deny_unknown_fields`. The check therefore runs on the TOML before deserialising, with the
//! field lists read from each struct's own derived `Deserialize` (see [`fields_of`]).

use crate::error::{Result, TrainError};
use serde::Deserialize;
use serde::de::{self, Visitor};

/// The field names a derived `Deserialize` struct accepts (aliases included where serde lists
/// them), read from what its impl passes to `Deserializer::deserialize_struct`. serde has no
/// public way to ask; serde-aux's `serde_introspect` does the same thing with more
/// dependencies than these thirty lines.
pub fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Levenshtein distance over characters (keys are short; no crate needed for this).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The valid key closest to `key` (ties: the first listed).
pub fn closest<'a>(key: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid.iter().copied().min_by_key(|v| distance(key, v))
}

/// Checks the keys of one table: the first unknown key is an error naming it, the table and
/// the closest valid key.
pub fn check_table(table: &toml::Table, name: &str, valid: &[&str]) -> Result<()> {
    for key in table.keys() {
        if !valid.contains(&key.as_str()) {
            return Err(TrainError::UnknownKey {
                key: key.clone(),
                table: name.to_string(),
                closest: closest(key, valid).map(String::from),
                valid: valid.iter().map(|v| v.to_string()).collect(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_counts_edits() {
        assert_eq!(distance("lora_alfa", "lora_alpha"), 2);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
        assert_eq!(
            closest("lora_alfa", &["r", "lora_alpha", "lora_dropout"]),
            Some("lora_alpha")
        );
    }

    #[test]
    fn fields_come_from_the_derived_impl() {
        let f = fields_of::<whet_peft::LoraConfig>();
        assert!(
            f.contains(&"lora_alpha") && f.contains(&"target_modules"),
            "{f:?}"
        );
    }
}
