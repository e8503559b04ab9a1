"""Round trips through other tools' layouts: folders written by :func:`polysae.formats.export`
carry polysae's own config under ``polysae_config`` in their ``cfg.json`` (the other tools ignore
unknown keys), and the readers take training-only fields back from it."""

from __future__ import annotations

from typing import Any

from polysae.config import SAEConfig


def restore_polysae_fields(cfg: dict[str, Any], sae_cfg: SAEConfig) -> SAEConfig:
    """Folders written by :func:`polysae.formats.export` carry polysae's own config under
    ``polysae_config``; training-only fields (sparsifier name, Matryoshka widths, inits) come back
    from it when the shapes agree. Nothing that changes the forward pass is taken from it."""
    own = cfg.get("polysae_config")
    if not isinstance(own, dict):
        return sae_cfg
    try:
        ref = SAEConfig.from_dict(own)
    except (TypeError, ValueError):
        return sae_cfg
    if (ref.d_in, ref.d_sae, ref.decoder) != (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.decoder):
        return sae_cfg
    keep = {"lambda2_init", "lambda3_init", "jumprelu_threshold_init", "jumprelu_bandwidth",
            "l0_coefficient", "l1_coefficient", "aux_k", "aux_coefficient",
            "batchtopk_threshold_momentum", "check_finite", "unit_norm_decoder"}
    changes = {k: getattr(ref, k) for k in keep}
    # BatchTopK/Matryoshka export as JumpReLU with the EMA threshold: identical in eval mode, so
    # the training sparsifier can come back (with its k) without changing any output.
    if sae_cfg.sparsifier == "jumprelu" and ref.sparsifier in ("batchtopk", "matryoshka") \
            and ref.batchtopk_inference == "threshold":
        changes.update(sparsifier=ref.sparsifier, k=ref.k,
                       matryoshka_widths=ref.matryoshka_widths)
    return sae_cfg.replace(**changes)


__all__ = ["restore_polysae_fields"]
