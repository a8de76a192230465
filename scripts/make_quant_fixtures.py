#!/usr/bin/env python3
"""Regenerate tests/fixtures/quant/nf4.safetensors: NF4 quantisation by bitsandbytes on CPU.

    .venv-ref/bin/python scripts/make_quant_fixtures.py

For three fixed weights (seed 0; a [48, 160] N(0, 0.02) matrix, 120 blocks of 64, so the second
quantisation has a partial block of 256; a [300, 64] matrix with heavy-tailed rows; a [4, 64]
matrix with an all-zero block) it stores, under the case name C:

    C.weight        f32   the input, [out, in] as nn.Linear holds it
    C.packed        u8    quantize_4bit(quant_type="nf4", blocksize=64) codes, two per byte
    C.absmax        f32   the per-block absolute maxima without double quantisation
    C.dq_absmax     u8    with compress_statistics=True: the 8-bit codes of (absmax - offset)
    C.dq_outer      f32   the second quantisation's per-256 absolute maxima
    C.dq_offset     f32   [1] the mean subtracted before the second quantisation
    C.dequant       f32   the weight the double-quantised state stands for:
                          NF4[code] * (dynamic_map[dq_absmax] * dq_outer + dq_offset)
    C.dequant_plain f32   NF4[code] * absmax
    dynamic_map     f32   [256] create_dynamic_map(signed=True)

The two dequantised tensors are computed here from bitsandbytes' codes and scales by the
QLoRA paper's formula, not by `dequantize_4bit`: on CPU (bitsandbytes 0.50.2 without the
`kernels` package) `dequantize_4bit` does not invert its own `quantize_4bit` (for a [2, 64]
N(0, 1) matrix it maps a weight of -1.1258 with block absmax 2.3744, code 2 = level -0.5251, to
-0.9701 = -0.4086 · absmax, which is no NF4 level). The 4-bit codes themselves are nearest-level
NF4, checked below against an independent argmin. Its 8-bit search for the double-quantised
scales is not exactly nearest (about 0.2% of SmolLM2's scales get a neighbouring level); whet
takes the nearest, and its test allows those codes to differ by one.

bitsandbytes' CPU path on one thread: reruns write identical bytes.

tests/fixtures/quant/adamw8bit.safetensors (alone: `make_quant_fixtures.py adamw8bit`): three
AdamW8bit steps on CPU with nearest-code requantisation (see `adamw8bit`):
parameters after each step, the gradients, the final 8-bit states and block maxima, and
create_dynamic_map(signed=False) (the second moment's map).

It also writes tests/fixtures/quant/smollm2_nf4.safetensors (needs cache/smollm2 from
scripts/fetch_assets.sh): SmolLM2-135M-Instruct loaded by transformers from its GGUF file (f32),
every linear layer but the tied head replaced by its NF4 dequantisation (bitsandbytes' codes and
scales, as above), with and without double quantisation; for one prompt (`input_ids`):
`logits_nf4`, `logits_nf4_dq` and `logits_f32` (the unquantised model) at every position for the
token ids `vocab_subset` (every 16th id), and `last_nf4_dq`, the last position's full row.
"""

from pathlib import Path

import torch
import bitsandbytes.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "quant" / "nf4.safetensors"

torch.set_num_threads(1)
torch.manual_seed(0)


def cases():
    a = 0.02 * torch.randn(48, 160)
    b = torch.randn(300, 64) * torch.linspace(0.1, 3.0, 300).unsqueeze(1)
    b[7, 3] = 25.0  # an outlier dominates its block
    c = torch.randn(4, 64)
    c[2].zero_()
    return {"a": a, "b": b, "c": c}


NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def codes_of(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], 1).flatten()[:n].long()


def main() -> None:
    out = {"dynamic_map": F.create_dynamic_map(signed=True).float()}
    for name, w in cases().items():
        q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        qd, sd = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(q, qd), "double quantisation changed the 4-bit codes"
        out[f"{name}.weight"] = w
        out[f"{name}.packed"] = q.flatten()
        out[f"{name}.absmax"] = st.absmax.float()
        out[f"{name}.dq_absmax"] = sd.absmax.flatten()
        out[f"{name}.dq_outer"] = sd.state2.absmax.float()
        out[f"{name}.dq_offset"] = torch.tensor([float(sd.offset)])
        codes = codes_of(q.flatten(), w.numel())
        nearest = (w.reshape(-1, 64) / st.absmax.reshape(-1, 1)).nan_to_num(0.0).reshape(-1, 1)
        assert torch.equal(codes, (nearest - NF4).abs().argmin(1)), "codes are not nearest-level"
        dmap = out["dynamic_map"]
        absmax_dq = dmap[sd.absmax.long()] * sd.state2.absmax.float().repeat_interleave(256)[: st.absmax.numel()] + sd.offset
        out[f"{name}.dequant"] = (NF4[codes] * absmax_dq.repeat_interleave(64)).reshape(w.shape)
        out[f"{name}.dequant_plain"] = (NF4[codes] * st.absmax.float().repeat_interleave(64)).reshape(w.shape)
        err = (out[f"{name}.dequant"] - w).abs().max().item()
        print(f"{name}: {list(w.shape)}, {st.absmax.numel()} blocks, max |dequant - w| = {err:.3g}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT)
    OUT.chmod(0o644)
    print(f"wrote {OUT.relative_to(ROOT)}")
    adamw8bit()
    smollm2(out["dynamic_map"])


def bucketize_quantize(A: torch.Tensor, code: torch.Tensor, absmax_out: torch.Tensor,
                       out_uint8: torch.Tensor, blocksize: int) -> None:
    """bitsandbytes' own blockwise 8-bit quantiser of its pure-torch backend
    (bitsandbytes 0.50.2, backends/default/ops.py, `quantize_blockwise`, registered for
    "default"): per block, scale by 1 / absmax, clamp to [-1, 1], then `torch.bucketize` on the
    midpoints of the sorted code, i.e. the nearest code with ties to the lower one. Stands in
    for the CPU backend's native search (`cquantize_blockwise_cpu_fp32`, BinSearch's Direct2),
    which is not nearest: on 5000 squared N(0, 0.01) values 166 unsigned codes differ from the
    nearest one, one of them by 7 levels."""
    A_flat = A.reshape(-1).float()
    n = A_flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    A_com = A_flat[:full].reshape(blocks, blocksize)
    absmax = A_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(A_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = A_flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A_flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    out_uint8.copy_(q.reshape(A.shape))
    absmax_out.copy_(absmax)


def adamw8bit() -> None:
    """bitsandbytes.optim.AdamW8bit on CPU: three steps on a [5000] parameter (8-bit states,
    blocks of 256) and a [100] one (below min_8bit_size 4096: 32-bit states), fixed gradients.
    The update is bitsandbytes' CPU kernel (backends/cpu/ops.py,
    `_optimizer_update_8bit_blockwise_cpu`: dequantise, f32 Adam, requantise) with its
    requantisation done by bitsandbytes' default-backend quantiser (see `bucketize_quantize`)."""
    import bitsandbytes as bnb
    import bitsandbytes.backends.cpu.ops as cpu_ops

    cpu_ops._quant_blockwise_fp32_direct = bucketize_quantize

    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(torch.randn(100))
    out = {"a.init": a.detach().clone(), "b.init": b.detach().clone(),
           "dynamic_map_unsigned": F.create_dynamic_map(signed=False).float()}
    opt = bnb.optim.AdamW8bit([a, b], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for step in range(1, 4):
        a.grad = torch.randn(5000) * 0.1
        b.grad = torch.randn(100) * 0.1
        out[f"a.grad{step}"], out[f"b.grad{step}"] = a.grad.clone(), b.grad.clone()
        opt.step()
        out[f"a.step{step}"], out[f"b.step{step}"] = a.detach().clone(), b.detach().clone()
    st = opt.state[a]
    for k in ["state1", "state2", "absmax1", "absmax2"]:
        out[f"a.{k}"] = st[k]
    for k in ["state1", "state2"]:  # also as f32, for readers of f32 tensors only
        out[f"a.{k}_as_f32"] = st[k].float()
    path = OUT.parent / "adamw8bit.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    path.chmod(0o644)
    print(f"wrote {path.relative_to(ROOT)}: state dtypes {st['state1'].dtype}, {st['absmax1'].numel()} blocks")


def nf4_dequantised(w: torch.Tensor, double_quant: bool, dmap: torch.Tensor) -> torch.Tensor:
    q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    codes = codes_of(q.flatten(), w.numel())
    if double_quant:
        n = (w.numel() + 63) // 64
        absmax = dmap[st.absmax.long()] * st.state2.absmax.float().repeat_interleave(256)[:n] + st.offset
    else:
        absmax = st.absmax.float()
    return (NF4[codes] * absmax.repeat_interleave(64)[: w.numel()]).reshape(w.shape)


def smollm2(dmap: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    gguf = ROOT / "cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28]])

    def load():
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                    attn_implementation="eager").eval()

    subset = torch.arange(0, 49152, 16)
    out = {"input_ids": ids, "vocab_subset": subset}
    full = {}
    with torch.no_grad():
        full["logits_f32"] = load()(ids).logits[0]
        for key, dq in [("logits_nf4", False), ("logits_nf4_dq", True)]:
            m = load()
            for name, mod in m.named_modules():
                if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                    mod.weight.data = nf4_dequantised(mod.weight.data, dq, dmap)
            full[key] = m(ids).logits[0]
    for k, v in full.items():
        out[k] = v[:, subset]
    out["last_nf4_dq"] = full["logits_nf4_dq"][-1]
    path = OUT.parent / "smollm2_nf4.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    path.chmod(0o644)
    d = (full["logits_nf4_dq"] - full["logits_f32"]).abs()
    print(f"wrote {path.relative_to(ROOT)}: NF4+DQ moves logits by max {d.max():.3g}, mean {d.mean():.3g}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["adamw8bit"]:  # only the optimizer fixture
        adamw8bit()
    else:
        main()
