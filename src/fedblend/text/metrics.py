"""Text metrics: ROUGE-1/2/L (Google's rouge-score, stemmed) and exact match."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache

METRICS = ("rouge1", "rouge2", "rougeL", "exact_match")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def score_one(prediction: str, reference: str) -> dict[str, float]:
    s = _scorer().score(reference, prediction)
    return {
        "rouge1": s["rouge1"].fmeasure,
        "rouge2": s["rouge2"].fmeasure,
        "rougeL": s["rougeL"].fmeasure,
        "exact_match": float(normalize(prediction) == normalize(reference)),
    }


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean of each metric over the pairs (0..1)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return {m: 0.0 for m in METRICS}
    rows = [score_one(p, r) for p, r in zip(predictions, references, strict=True)]
    return {m: sum(r[m] for r in rows) / len(rows) for m in METRICS}
