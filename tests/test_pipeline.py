"""`polysae run` end to end on the bundled SmolLM2 at toy sizes (slow: loads the real model; shares
the `smollm2` xdist group so the model is converted once per worker/machine). CPU only.

Checks: every stage writes its artefacts; both SAEs are trained on the same activations with
identical settings except the decoder, and their loss falls; a re-run of the same command skips
every stage and returns the same metrics."""

from __future__ import annotations

import json

import pytest

import polysae
from polysae.data.harvesting import HarvestConfig
from polysae.evaluation import EvalConfig
from polysae.pipeline import RunConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]


def test_run_end_to_end_and_rerun_skips(tmp_path):
    cfg = RunConfig(out=str(tmp_path / "run"), sae={"d_sae": 256, "k": 8}, batch_size=256,
                    epochs=1, progress=False,
                    harvest=HarvestConfig(hooks=["blocks.9.hook_resid_post"], tokens=6000,
                                          shard_size=1024),
                    eval=EvalConfig(recon_tokens=1024, probe_train_per_class=6,
                                    probe_test_per_class=3, ce_contexts=2,
                                    absorption_train_words=64, absorption_test_words=32,
                                    absorption_icl=3))
    res = run(cfg)
    out = res.out
    for rel in ("acts/manifest.json", "train/vanilla/sae.safetensors", "train/poly/config.json",
                "report/metrics.json", "report/report.md", "browser/index.html"):
        assert (out / rel).exists(), rel
    vanilla, poly = polysae.load(out / "train/vanilla"), polysae.load(out / "train/poly")
    assert (vanilla.cfg.decoder, poly.cfg.decoder) == ("linear", "poly")
    assert vanilla.cfg.replace(decoder="poly") == poly.cfg  # identical settings otherwise
    steps = [[json.loads(line)["step"] for line in open(out / f"train/{n}/metrics.jsonl")]
             for n in ("vanilla", "poly")]
    assert steps[0] == steps[1] and steps[0][-1] > 0  # same batches, same number of steps
    metrics = json.loads((out / "report/metrics.json").read_text())
    assert json.dumps(metrics).count('"poly"') and json.dumps(metrics).count('"vanilla"')
    stages = (out / "stages.json").read_text()
    assert RunConfig.from_dict(json.loads((out / "run_config.json").read_text())) == cfg

    again = run(cfg)  # the same command again: nothing left to do
    assert again.seconds["train"] < 1.0 and again.seconds["eval"] < 1.0
    assert (out / "stages.json").read_text() == stages
    assert again.metrics == metrics

    # training made progress for both SAEs (first vs last logged batch MSE)
    for n in ("vanilla", "poly"):
        rows = [json.loads(line) for line in open(out / f"train/{n}/metrics.jsonl")]
        assert rows[-1]["mse"] < rows[0]["mse"], n
