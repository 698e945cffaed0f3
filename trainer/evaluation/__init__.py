"""Evaluation, plain Python (no Prefect): benchmark files, reply parsing, metrics, probes.

    trainer.evaluation.matching    option-letter and yes/no extraction from a raw reply
    trainer.evaluation.benchmarks  the VLMEvalKit TSV reader and the question prompts
    trainer.evaluation.scoring     score(kind, rows): the metrics of one benchmark kind

Scores are computed from saved predictions by pure functions (predictions first, scores after), so
any predictions file can be re-scored: `unimrg score --benchmark F.tsv --predictions P.jsonl`.
See docs/eval.md.
"""
