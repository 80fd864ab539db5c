"""Evaluation: GenEval (in-process; `diffalign.evaluation.geneval`) and its detector back-ends
(`diffalign.evaluation.detectors`)."""
