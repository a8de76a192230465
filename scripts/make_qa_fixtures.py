#!/usr/bin/env python3
"""Write tests/fixtures/qa/facts.jsonl: a small SQuAD-format question-answering set (no SQuAD
ships with the registries) to test whet's question-answering mechanics: short made-up facts,
questions about them, answers with character offsets; every tenth context padded with filler
sentences so that it needs several windows (doc_stride). Deterministic; plain Python.

    python3 scripts/make_qa_fixtures.py
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qa" / "facts.jsonl"
PEOPLE = ["Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jonas",
          "Kamala", "Lars", "Mei", "Nadia", "Omar", "Priya"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Dublin", "Tunis", "Lima", "Riga", "Perth"]
JOBS = ["baker", "pilot", "nurse", "carpenter", "chemist", "librarian", "painter", "surgeon"]
FILLER = "The weather that year was mild and the harvest was good. "


def main():
    rng = random.Random(7)
    rows = []
    for i in range(60):
        person, city, job = rng.choice(PEOPLE), rng.choice(CITIES), rng.choice(JOBS)
        year = str(rng.randint(1950, 2020))
        context = f"{person} was born in {city} in {year}. {person} works as a {job}."
        if i % 10 == 9:
            context = FILLER * 12 + context + " " + FILLER * 4
        kind = i % 3
        question, answer = [
            (f"Where was {person} born?", city),
            (f"In which year was {person} born?", year),
            (f"What does {person} work as?", f"a {job}"),
        ][kind]
        start = context.index(answer, context.index(person))
        assert context[start:start + len(answer)] == answer
        rows.append({"id": str(i), "question": question, "context": context,
                     "answers": {"text": [answer], "answer_start": [start]}})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {OUT}")


if __name__ == "__main__":
    main()
