"""Reads a whet run's TensorBoard event files with TensorBoard's own reader (EventAccumulator)
and prints every scalar series: a check that TensorBoard reads what `report_to =
["tensorboard"]` writes. Usage: .venv-ref/bin/python scripts/check_tensorboard.py OUT/runs
(needs `pip install tensorboard==2.21.0`)."""
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1])
acc.Reload()
tags = acc.Tags()["scalars"]
if not tags:
    sys.exit(f"no scalars in {sys.argv[1]}")
for tag in tags:
    events = acc.Scalars(tag)
    print(f"{tag}: {len(events)} points, " + ", ".join(f"{e.step}:{e.value:.4g}" for e in events[:6]))
