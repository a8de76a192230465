//! Where a run's logs go besides the terminal (`training.report_to`): `jsonl`, one JSON object
//! a line, and `tensorboard`, event files that TensorBoard reads.
//!
//! The TensorBoard writer is written here, not taken from a crate: `tensorboard-rs` (last
//! released 2022) pulls `protobuf` 2 and `image` for what is, for scalars, two small protobuf
//! messages in TFRecord framing. An event file is a sequence of records
//! `len: u64 LE | masked crc32c(len): u32 LE | bytes | masked crc32c(bytes): u32 LE`, each
//! holding one `tensorflow.Event`: `wall_time` (field 1, double), `step` (2, int64), and either
//! `file_version` (3, the first record, "brain.Event:2") or a `Summary` (5) of `Value`s
//! (`tag` = 1, `simple_value` = 2, a float). proto3 leaves out fields at their default (a step
//! of 0), as Python's protobuf does, so the bytes equal those of TensorBoard's own writer (the
//! test compares them with a file it wrote).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A TensorBoard event file being written.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.SECONDS.HOST.PID.0` (the name TensorBoard's writer
    /// gives) and writes its first record.
    pub fn create(dir: &Path, wall_time: f64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.0",
            wall_time as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = Self {
            file: BufWriter::new(file),
            path,
        };
        w.write_record(&file_version_event(wall_time))?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event with the scalars `(tag, value)` at `step`, flushed so that a TensorBoard
    /// watching the folder sees it at once.
    pub fn scalars(&mut self, wall_time: f64, step: i64, values: &[(String, f32)]) -> Result<()> {
        self.write_record(&scalars_event(wall_time, step, values))
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let w = &mut self.file;
        w.write_all(&len)?;
        w.write_all(&masked_crc(&len).to_le_bytes())?;
        w.write_all(data)?;
        w.write_all(&masked_crc(data).to_le_bytes())?;
        w.flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An `Event`'s `wall_time` and `step` (left out at 0).
fn event_head(wall_time: f64, step: i64) -> Vec<u8> {
    let mut out = vec![1 << 3 | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        varint(2 << 3, &mut out);
        varint(step as u64, &mut out);
    }
    out
}

fn file_version_event(wall_time: f64) -> Vec<u8> {
    let mut out = event_head(wall_time, 0);
    bytes_field(3, b"brain.Event:2", &mut out);
    out
}

fn scalars_event(wall_time: f64, step: i64, values: &[(String, f32)]) -> Vec<u8> {
    let mut summary = vec![];
    for (tag, v) in values {
        let mut value = vec![];
        bytes_field(1, tag.as_bytes(), &mut value);
        value.push(2 << 3 | 5);
        value.extend_from_slice(&v.to_le_bytes());
        bytes_field(1, &value, &mut summary);
    }
    let mut out = event_head(wall_time, step);
    bytes_field(5, &summary, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture was written by TensorBoard's own `EventFileWriter`
    /// (`scripts/fixtures/make_tensorboard_fixture.py`) with fixed wall times: a file_version
    /// record, then two scalar events (steps 0 and 7, negative and fractional values). whet's
    /// records must be the same bytes.
    #[test]
    fn event_records_equal_tensorboards_own() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tensorboard");
        let want = std::fs::read(root.join("events.bin")).expect("fixture missing");
        let dir = std::env::temp_dir().join(format!("whet-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir, 1_700_000_000.25).unwrap();
        w.scalars(
            1_700_000_001.5,
            0,
            &[
                ("train/loss".into(), 0.6832),
                ("train/learning_rate".into(), 2e-5),
            ],
        )
        .unwrap();
        w.scalars(1_700_000_002.75, 7, &[("eval/accuracy".into(), -1.25)])
            .unwrap();
        let got = std::fs::read(w.path()).unwrap();
        assert_eq!(got, want);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
