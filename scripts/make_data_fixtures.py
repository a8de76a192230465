#!/usr/bin/env python3
"""Write whet's Parquet data fixtures (tests/fixtures/data/) with pyarrow, as `datasets` and pandas
write them (snappy compression by default):

    .venv-ref/bin/python scripts/make_data_fixtures.py

    reviews.parquet     text (string), label (string), label_id (int64), tags (list<string>):
                        5 rows in row groups of 2, snappy
    reviews-gzip.parquet
                        the same table, one row group, gzip

`crates/whet-data/tests/data.rs` reads both and checks every cell; `crates/whet/tests/train_cli.rs`
trains on them (single-label on `label`, multi-label on `tags`).
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "data"

ROWS = [
    ("a wonderful film", "pos", 1, ["acting", "story"]),
    ("dull and slow", "neg", 0, ["pace"]),
    ("café scenes, great cast", "pos", 1, ["acting"]),
    ("the plot makes no sense", "neg", 0, ["story"]),
    ("nothing to say", "neg", 0, []),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "text": pa.array([r[0] for r in ROWS], pa.string()),
        "label": pa.array([r[1] for r in ROWS], pa.string()),
        "label_id": pa.array([r[2] for r in ROWS], pa.int64()),
        "tags": pa.array([r[3] for r in ROWS], pa.list_(pa.string())),
    })
    pq.write_table(table, OUT / "reviews.parquet", row_group_size=2, compression="snappy")
    pq.write_table(table, OUT / "reviews-gzip.parquet", compression="gzip")
    for p in sorted(OUT.glob("*.parquet")):
        back = pq.read_table(p)
        assert back.equals(table), p
        print(f"{p.relative_to(OUT.parent.parent.parent)}: {back.num_rows} rows, "
              f"{pq.ParquetFile(p).num_row_groups} row groups, {p.stat().st_size} B")
    print(f"pyarrow {pa.__version__}")


if __name__ == "__main__":
    main()
