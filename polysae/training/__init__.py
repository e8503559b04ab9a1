"""Training SAEs: configuration, data sources, the loop, logs and resume state (docs/training.md).

- :mod:`~polysae.training.config`: :class:`TrainConfig` (the ``polysae train`` flags);
- :mod:`~polysae.training.sources`: :class:`TensorSource`, :func:`as_source`;
- :mod:`~polysae.training.trainer`: :class:`Trainer` (one or several SAEs from one stream) and
  :func:`train`;
- :mod:`~polysae.training.logs`: ``run.json``, ``metrics.jsonl``, wandb / TensorBoard;
- :mod:`~polysae.training.state`: ``trainer_state.pt``, exact resume.

On-disk layout of a run (``out_dir``; a single SAE given as a bare ``SAE`` writes straight into
``out_dir``)::

    out_dir/run.json                      train config + SAE names (lets ``--resume`` rebuild)
    out_dir/<name>/sae.safetensors        latest checkpoint, loadable by polysae.load(); always
    out_dir/<name>/config.json            takes RAW activations (normalisation folded in)
    out_dir/<name>/trainer_state.pt       self-contained resume state, weights_only-loadable
    out_dir/<name>/trainer_state.prev.pt  the one before
    out_dir/<name>/metrics.jsonl          one JSON object per logged step
"""

from polysae.training.config import LOGGERS, TrainConfig
from polysae.training.logs import METRICS_FILE, RUN_FILE
from polysae.training.sources import IterableSource, TensorSource, as_source
from polysae.training.state import PREV_STATE_FILE, STATE_FILE, STATE_FORMAT
from polysae.training.trainer import StepMetrics, Trainer, TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "LOGGERS", "TensorSource", "IterableSource", "as_source", "Trainer",
           "TrainResult", "StepMetrics", "TrainingDiverged", "train", "RUN_FILE", "METRICS_FILE",
           "STATE_FILE", "PREV_STATE_FILE", "STATE_FORMAT"]
