#!/usr/bin/env python3
"""Write tests/fixtures/qa-pipeline/: the answers of transformers' question-answering pipeline
for a MiniLM encoder with a seeded span head, for whet's `qa::answer` to reproduce.

    .venv-ref/bin/python scripts/make_qa_pipeline_fixture.py     # needs cache/minilm, ~20 s

transformers 5 removed `pipeline("question-answering")` (its task table now says "use the
text-generation pipeline with a chat model instead"). The script runs the pipeline of the last
release that had it, 4.57.6: it fetches that wheel with `pip download` (no install), takes
`transformers/pipelines/question_answering.py` and the `SquadExample` / `SquadFeatures`
classes of `data/processors/squad.py` as they are, and executes them on top of the installed
transformers 5.23 (its `Pipeline`, `ChunkPipeline`, fast tokenizer and model). Only imports are
adapted: names that 5.23 no longer has (`ModelCard`, `is_tf_available`, the slow-tokenizer
`squad_convert_examples_to_features`) are stubbed, and `framework = "pt"` is set because 5.23's
`Pipeline` no longer defines it. Preprocessing (windows with `stride=doc_stride`), the softmax
over context tokens and `[CLS]`, `decode_spans`, `align_to_words` and the merging of equal
answers run unmodified.

Model: `BertForQuestionAnswering.from_pretrained("cache/minilm")` (the encoder of
all-MiniLM-L6-v2) with `qa_outputs` drawn after `torch.manual_seed(0)`: weight 0.5·N(0,1),
bias 0.1·N(0,1), so the start/end logits spread over several units and the answers are not
trivial. Only the head is written (`head.safetensors`); the test puts it beside
cache/minilm's weights.

`expected.json`: per case the question, context, the pipeline settings passed explicitly
(`top_k`, `max_answer_len`, `max_seq_len`, `doc_stride`, `handle_impossible_answer=False`,
`align_to_words` left at its default True), the number of windows, and the answers as the
pipeline returns them (a list even for top_k = 1).
"""
import ast
import importlib
import json
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BatchEncoding, BertForQuestionAnswering

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "cache" / "minilm"
OUT = ROOT / "tests" / "fixtures" / "qa-pipeline"
VERSION = "4.57.6"


def pipeline_class():
    """QuestionAnsweringPipeline of transformers 4.57.6, executed against the installed 5.23."""
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", f"transformers=={VERSION}", "--no-deps",
                    "-q", "-d", str(tmp)], check=True)
    wheel = next(tmp.glob(f"transformers-{VERSION}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        qa_src = z.read("transformers/pipelines/question_answering.py").decode()
        squad_src = z.read("transformers/data/processors/squad.py").decode()

    # SquadExample / SquadFeatures (and the helper SquadExample uses), as written in 4.57.6.
    squad = ast.parse(squad_src)
    keep = [n for n in squad.body
            if isinstance(n, (ast.ClassDef, ast.FunctionDef))
            and n.name in ("_is_whitespace", "SquadExample", "SquadFeatures")]
    assert len(keep) == 3, [n.name for n in keep]
    squad_ns = {"np": np, "Optional": Optional, "BatchEncoding": BatchEncoding}
    exec(compile(ast.Module(keep, []), "squad.py", "exec"), squad_ns)

    # The pipeline module: imports whose names 5.23 lacks are dropped (stubs below stand in).
    tree = ast.parse(qa_src)
    package = "transformers.pipelines"
    for node in tree.body:
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        if node.module in ("data", "modelcard"):
            node.names = []
        else:
            base = importlib.import_module("." * node.level + (node.module or ""), package)
            node.names = [a for a in node.names if hasattr(base, a.name)]
    tree.body = [n for n in tree.body if not (isinstance(n, ast.ImportFrom) and not n.names)]
    module = types.ModuleType("transformers.pipelines.question_answering_4_57")
    module.__package__ = package
    module.__dict__.update(
        SquadExample=squad_ns["SquadExample"], SquadFeatures=squad_ns["SquadFeatures"],
        squad_convert_examples_to_features=None, ModelCard=None,
        is_tf_available=lambda: False)
    exec(compile(tree, "question_answering.py", "exec"), module.__dict__)
    cls = module.QuestionAnsweringPipeline
    cls.framework = "pt"
    return cls


CASES = [
    # (question, context, top_k, max_answer_len, max_seq_len, doc_stride)
    ("Where was Dmitri born?",
     "Dmitri Yevgenyevich was born in Quetzaltenango in 1987. He works as a cartographer "
     "for the Guatemalan Institute of Geography, drawing maps of volcanoes.",
     1, 15, 384, 128),
    ("What does Dmitri do?",
     "Dmitri Yevgenyevich was born in Quetzaltenango in 1987. He works as a cartographer "
     "for the Guatemalan Institute of Geography, drawing maps of volcanoes.",
     4, 15, 384, 128),
    ("Which city hosts the Zürich-Lisbon ferry's head office?",
     "The ferry company, founded by Ines O'Neill-Zürcher in 1923, keeps its head office in "
     "Porto; its smaller branch sits in Valletta, and its archives (about 4,500 boxes) are "
     "stored in São Tomé.",
     3, 8, 384, 128),
]

FILLER = ("The weather that year was mild and the harvest was good, so the markets of the "
          "valley were full of apples, pears and walnuts. ")
LONG = (FILLER * 9 + "Farid Okonkwo-Haldane, the chemist, moved to Nairobi in 2003 and opened "
        "a laboratory near the river. " + FILLER * 6 + "His sister Greta stayed in Tromsø, "
        "where she repairs clocks. " + FILLER * 5)
CASES += [
    # Many short windows: answers from different windows compete, and an answer in the
    # overlap of two windows is found twice.
    ("Where did Farid move?", LONG, 5, 10, 96, 32),
    # The pipeline's own defaults, passed explicitly: 384 tokens, stride 128, 15 tokens.
    ("Where does Greta live?", LONG, 3, 15, 384, 128),
]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tok = AutoTokenizer.from_pretrained(MINILM)
    assert tok.is_fast and tok.padding_side == "right"
    model = BertForQuestionAnswering.from_pretrained(MINILM, attn_implementation="eager").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.qa_outputs.weight.copy_(0.5 * torch.randn_like(model.qa_outputs.weight))
        model.qa_outputs.bias.copy_(0.1 * torch.randn_like(model.qa_outputs.bias))
    OUT.mkdir(parents=True, exist_ok=True)
    # Under the checkpoint's names, as BertForQuestionAnswering.save_pretrained writes them.
    save_file({"qa_outputs.weight": model.qa_outputs.weight.detach().contiguous(),
               "qa_outputs.bias": model.qa_outputs.bias.detach().contiguous()},
              OUT / "head.safetensors")

    qa = pipeline_class()(model=model, tokenizer=tok)
    cases = []
    for question, context, top_k, max_answer_len, max_seq_len, doc_stride in CASES:
        answers = qa(question=question, context=context, top_k=top_k, max_answer_len=max_answer_len,
                     max_seq_len=max_seq_len, doc_stride=doc_stride,
                     handle_impossible_answer=False)
        if isinstance(answers, dict):
            answers = [answers]
        windows = len(tok(question, context, truncation="only_second", max_length=max_seq_len,
                          stride=doc_stride, return_overflowing_tokens=True)["input_ids"])
        for a in answers:
            assert context[a["start"]:a["end"]] == a["answer"]
        cases.append({"question": question, "context": context, "top_k": top_k,
                      "max_answer_len": max_answer_len, "max_seq_len": max_seq_len,
                      "doc_stride": doc_stride, "handle_impossible_answer": False,
                      "windows": windows, "answers": answers})
        print(f"{question!r}: {windows} window(s)")
        for a in answers:
            print(f"    {a['score']:.6f} [{a['start']}, {a['end']}) {a['answer']!r}")
    meta = {"transformers_pipeline": VERSION, "transformers": __import__("transformers").__version__,
            "torch": torch.__version__, "model": "cache/minilm + head.safetensors",
            "head": "torch.manual_seed(0); weight 0.5*N(0,1) [2, 384], bias 0.1*N(0,1) [2]",
            "cases": cases}
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
