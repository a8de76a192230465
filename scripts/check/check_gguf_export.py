#!/usr/bin/env python3
"""Read GGUF files `whet export` wrote with the reference `gguf` package, and check them.

    target/debug/whet export MODEL f32.gguf --type f32
    target/debug/whet export MODEL q.gguf --type q8_0      (or q4_0, f16)
    .venv-ref/bin/python scripts/check/check_gguf_export.py f32.gguf q.gguf

Checks that gguf's reader parses both files, that the architecture, tokenizer and chat-template
metadata agree, and that every quantised tensor's bytes equal gguf.quants.quantize of the f32
file's values (the reference quantiser), printing the share of equal bytes per type.
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants


def field(r: GGUFReader, key: str):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def main() -> None:
    ref, q = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
    for key in ["general.architecture", "llama.block_count", "llama.embedding_length",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "tokenizer.ggml.model",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"]:
        a, b = field(ref, key), field(q, key)
        assert a == b, f"{key}: {a!r} vs {b!r}"
        print(f"{key}: {str(a)[:60]!r}")
    assert len(field(q, "tokenizer.ggml.tokens")) == len(field(ref, "tokenizer.ggml.tokens"))
    rt = {t.name: t for t in ref.tensors}
    stats: dict[str, list[float]] = {}
    for t in q.tensors:
        r = rt[t.name]
        assert r.tensor_type == T.F32 and list(r.shape) == list(t.shape), t.name
        if t.tensor_type == T.F32:
            continue
        values = np.asarray(r.data, dtype=np.float32).reshape(t.shape[::-1])
        want = quants.quantize(values, t.tensor_type).tobytes()
        got = np.asarray(t.data).tobytes()
        same = sum(x == y for x, y in zip(got, want)) / len(want)
        stats.setdefault(t.tensor_type.name, []).append(same)
    for ty, s in stats.items():
        print(f"{ty}: {len(s)} tensors, bytes equal to gguf.quants.quantize: min {min(s):.6f}, "
              f"mean {np.mean(s):.6f}")


if __name__ == "__main__":
    main()
