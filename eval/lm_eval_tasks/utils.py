"""Scoring for the tuneship_handbook lm-eval task: the reply must contain the key fact."""

from tuneship.quality.facts import contains_fact


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"fact_recall": float(contains_fact(results[0], doc["fact"]))}
