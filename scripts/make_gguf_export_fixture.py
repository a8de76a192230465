#!/usr/bin/env python3
"""Write tests/fixtures/gguf/export.safetensors: what the reference quantiser of the `gguf`
package writes for the types `whet export --format gguf` offers, so a cargo test can demand the
same bytes from whet's writer:

    .venv-ref/bin/python scripts/make_gguf_export_fixture.py

Keys: `input` f32 [8, 256] (rows: N(0, 1); N(0, 1e-3); zeros with one spike; values on
half-steps of a Q8_0 scale, where rounding direction matters; values of 1e4; ties of the
largest magnitude with both signs; a linear ramp; N(0, 1) with exact zeros mixed in), and per
type (`f16`, `q8_0`, `q4_0`) the bytes `gguf.quants.quantize(input, type)` returns, as u8
[8, row bytes].
"""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gguf" / "export.safetensors"


def main() -> None:
    rng = np.random.default_rng(7)
    cols = 256
    rows = [
        rng.standard_normal(cols),
        rng.standard_normal(cols) * 1e-3,
        np.where(np.arange(cols) % 32 == 5, 3.0, 0.0),
        (np.arange(cols) % 32 - 16 + 0.5) * (2.0 / 127.0),
        np.full(cols, 1e4) * np.sign(rng.standard_normal(cols)),
        np.tile(np.r_[[-2.0, 2.0], rng.uniform(-1, 1, 30)], cols // 32),
        np.linspace(-1.0, 1.0, cols),
        np.where(rng.random(cols) < 0.3, 0.0, rng.standard_normal(cols)),
    ]
    x = np.stack(rows).astype(np.float32)
    out = {"input": x}
    for name, ty in [("f16", T.F16), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0)]:
        q = quants.quantize(x, ty)
        out[name] = np.ascontiguousarray(q.view(np.uint8).reshape(x.shape[0], -1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(OUT))
    print(f"wrote {OUT.relative_to(ROOT)}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


if __name__ == "__main__":
    main()
