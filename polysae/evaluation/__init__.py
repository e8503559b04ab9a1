"""Evaluation: the orchestrator and one module per metric.

- :mod:`~polysae.evaluation.orchestrator`: ``evaluate`` and ``EvalConfig`` (re-exported here):
  every SAE on the same held-out tokens, probing texts and steering prompts;
- :mod:`~polysae.evaluation.reconstruction`: MSE, explained variance, CE/KL loss recovered, density;
- :mod:`~polysae.evaluation.probing`: sparse probing F1 (the paper's protocol);
- :mod:`~polysae.evaluation.wasserstein`: exact W1 separation of positive and negative features;
- :mod:`~polysae.evaluation.interactions`: co-occurrence, pair strengths and pair candidates;
- :mod:`~polysae.evaluation.steering`: the steering protocol;
- :mod:`~polysae.evaluation.probing_stage`: the probing stage (keeps the texts for TPP);
- :mod:`~polysae.evaluation.absorption`, :mod:`~polysae.evaluation.tpp`: SAEBench feature
  absorption and TPP in the variants ``linear`` and ``full``
  (:mod:`~polysae.evaluation.saebench_metrics` runs them;
  :mod:`~polysae.evaluation.contributions` splits the decoder per latent;
  :mod:`~polysae.evaluation.saebench_probes` trains SAEBench's probes;
  :mod:`~polysae.evaluation.saebench_report` writes their report part);
- :mod:`~polysae.evaluation.report`: ``metrics.json``, ``report.md`` and plots;
- :mod:`~polysae.evaluation.saebench`: checkpoints wrapped for SAEBench.

The metric modules import nothing from the orchestrator (it imports them, lazily).
"""

from polysae.evaluation.orchestrator import EvalConfig, evaluate, jsonable

__all__ = ["EvalConfig", "evaluate", "jsonable"]
