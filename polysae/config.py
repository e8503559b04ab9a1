"""Configuration of a sparse autoencoder: :class:`SAEConfig`.

Stdlib dataclass, one docstring per field, cross-field validation in ``__post_init__`` raising
``ValueError`` that names the offending field. ``to_dict``/``from_dict`` round-trip through JSON and
drop unknown keys (forward compatibility of checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

Sparsifier = Literal["topk", "batchtopk", "jumprelu", "relu", "matryoshka"]
DecoderKind = Literal["linear", "poly"]

SPARSIFIERS: tuple[str, ...] = typing.get_args(Sparsifier)
"""Every sparsifier, in the order the CLI and the docs list them (the one list of them)."""
DECODERS: tuple[str, ...] = typing.get_args(DecoderKind)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def check_values(owner: str, values: typing.Mapping[str, Any]) -> None:
    """Every config's value check, done once for all: a ``ValueError`` naming ``owner.field``
    for a non-finite float (NaN, inf; also inside tuples, lists and dicts) or an integer outside
    64 bits (a seed torch could not take). Called by :func:`known_fields` (every ``from_dict``),
    by the CLI's :func:`polysae.cli.flags.config_from_args` and by ``__post_init__``."""
    def bad(v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
            return f"{v} does not fit in 64 bits"
        if isinstance(v, (tuple, list)):
            return next((f"element {i}: {w}" for i, w in enumerate(map(bad, v)) if w), None)
        if isinstance(v, dict):
            return next((f"{k!r}: {w}" for k, w in ((k, bad(x)) for k, x in v.items()) if w),
                        None)
        return None

    for k, v in values.items():
        why = bad(v)
        if why:
            raise ValueError(f"{owner}.{k}: {why}")


def known_fields(cls: type, d: typing.Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of dataclass ``cls``: what ``from_dict`` of every
    config passes on, dropping keys a newer polysae wrote (forward compatibility); values are
    checked by :func:`check_values` (a non-finite float or a runaway integer names the field),
    and ``d`` must be a mapping (a file's ``"config": null`` is an error, not a traceback)."""
    if not isinstance(d, typing.Mapping):
        raise ValueError(f"{cls.__name__}: expected a JSON object of fields, got "
                         f"{type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: v for k, v in d.items() if k in names}
    check_values(cls.__name__, out)
    hints = typing.get_type_hints(cls)
    for k, v in out.items():
        if not _fits(hints[k], v):
            want = hints[k].__name__ if isinstance(hints[k], type) else str(hints[k])
            raise ValueError(f"{cls.__name__}.{k}: expected {want}, got {type(v).__name__} "
                             f"{v!r}"[:300])
    return out


def _fits(tp: Any, v: Any) -> bool:
    """Whether JSON value ``v`` can be a field of type ``tp`` (types this check does not know,
    Literals included, are left to the config's ``__post_init__``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_fits(a, v) for a in args)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if origin in (tuple, list):
        elem = [a for a in args if a is not Ellipsis]
        return isinstance(v, (list, tuple)) and all(
            any(_fits(a, x) for a in elem) if elem else True for x in v)
    if origin is dict or tp is dict:
        return isinstance(v, dict)
    return True


def plain_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass (nested ones included) as plain JSON types (tuples become lists)."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def default_matryoshka_widths(d_sae: int) -> tuple[int, ...]:
    """Nested prefix widths: d_sae/32, d_sae/8, d_sae (the reference's [512, 2048, 16384] at
    16k)."""
    widths = sorted({w for w in (d_sae // 32, d_sae // 8) if w >= 1} | {d_sae})
    return tuple(widths)


@dataclass
class SAEConfig:
    """Architecture of one SAE. Defaults follow the PolySAE paper (docs/method.md)."""

    d_in: int
    """Width of the activations the SAE reads (e.g. 768 for GPT-2 small's residual stream)."""

    d_sae: int
    """Number of latents (dictionary size), e.g. 16384."""

    k: int = 64
    """Active latents per token for TopK; the batch-average L0 for BatchTopK and Matryoshka.
    Ignored by ``relu`` and ``jumprelu`` (their sparsity comes from a penalty)."""

    sparsifier: Sparsifier = "topk"
    """How pre-activations become sparse codes: ``topk`` (per token), ``batchtopk`` (top k*B over
    the batch), ``jumprelu`` (learned per-latent threshold, straight-through estimator), ``relu``
    (ReLU + L1 penalty) or ``matryoshka`` (BatchTopK plus nested-prefix losses)."""

    decoder: DecoderKind = "poly"
    """``linear`` (``x_hat = b_dec + z @ W_dec``) or ``poly`` (the PolySAE decoder,
    ``x_hat = b_dec + y1 + lambda2*y2 + lambda3*y3`` factorised through an orthonormal ``U``)."""

    ranks: tuple[int, int, int] | None = None
    """Polynomial ranks (R1, R2, R3) of the linear, quadratic and cubic terms. ``None`` means
    ``(min(d_in, d_sae), min(64, R1), min(64, R1))``: R1 = d_in as in every paper setting."""

    order: int = 3
    """Highest polynomial order used by the poly decoder: 1 (low-rank linear), 2 or 3."""

    shared_u: bool = True
    """One projection ``U`` whose column prefixes feed all orders (the paper's mode). False gives
    separate ``U``, ``U2``, ``U3`` kept mutually orthogonal (the reference code's default)."""

    lambda2_init: float = -0.5
    """Initial value of the learnable quadratic weight lambda2."""

    lambda3_init: float = 0.5
    """Initial value of the learnable cubic weight lambda3."""

    matryoshka_widths: tuple[int, ...] | None = None
    """Nested prefix widths for ``matryoshka``, ascending, the last equal to ``d_sae``. ``None``
    means ``(d_sae/32, d_sae/8, d_sae)``, the reference's [512, 2048, 16384] at 16k latents."""

    jumprelu_threshold_init: float = 0.01
    """Initial per-latent threshold of ``jumprelu``."""

    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel in JumpReLU's straight-through gradient for the threshold."""

    l0_coefficient: float = 1.0
    """Weight of the (straight-through) L0 penalty for ``jumprelu``."""

    l1_coefficient: float = 1.0
    """Weight of the L1 penalty for ``relu`` (sum over latents of |z_i| times the norm of the
    latent's linear atom, so shrinking the decoder cannot buy sparsity)."""

    aux_k: int | None = None
    """Dead latents used by the AuxK loss per token. ``None`` means ``d_in // 2`` (SAELens)."""

    aux_coefficient: float = 1.0
    """Weight of the AuxK dead-latent loss (0 disables it)."""

    batchtopk_threshold_momentum: float = 0.01
    """EMA rate of BatchTopK's inference threshold (theta <- (1-m) theta + m * min kept)."""

    batchtopk_inference: Literal["threshold", "batch"] = "threshold"
    """How a BatchTopK/Matryoshka SAE encodes in eval mode: ``threshold`` applies the learned
    global threshold per token (JumpReLU-style export); ``batch`` applies batch-level top-k to
    each evaluation batch as the paper's pipeline did (docs/method.md, deviation 3)."""

    apply_b_dec_to_input: bool = True
    """Encode ``x - b_dec`` rather than ``x`` (SAELens default, the reference code's choice)."""

    dtype: str = dataclasses.field(default="float32", metadata={"choices": tuple(DTYPES)})
    """Parameter dtype: float32 (default), float64, bfloat16 or float16."""

    unit_norm_decoder: bool = False
    """Keep every row of a linear decoder's ``W_dec`` at unit L2 norm (sparsify's and SAEBench's
    convention): rows start at norm 1, the gradient component parallel to each row is removed
    before every optimiser step and the rows are renormalised after it. Off by default (the
    paper's recipe leaves decoder norms free). Linear decoders only: a poly decoder's linear atoms
    ``U C1^T`` share the orthonormal ``U`` and cannot be normalised row by row."""

    check_finite: bool = False
    """Raise on NaN/inf inputs to ``encode``/``forward`` (costs one reduction per call)."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SAEConfig.{name}: {why}")

        check_values("SAEConfig", dataclasses.asdict(self))
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, f"must be a positive integer, got {v!r}")
        if self.sparsifier not in SPARSIFIERS:
            raise bad("sparsifier", f"must be one of {SPARSIFIERS}, got {self.sparsifier!r}")
        if self.decoder not in DECODERS:
            raise bad("decoder", f"must be one of {DECODERS}, got {self.decoder!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise bad("k", f"must be a positive integer, got {self.k!r}")
        if self.k > self.d_sae:
            raise bad("k", f"k={self.k} exceeds d_sae={self.d_sae}")
        if self.order not in (1, 2, 3):
            raise bad("order", f"must be 1, 2 or 3, got {self.order!r}")
        if self.unit_norm_decoder and self.decoder != "linear":
            raise bad("unit_norm_decoder", "applies to linear decoders only: a poly decoder's "
                      "linear atoms U C1^T share the orthonormal U and cannot be renormalised row "
                      "by row (train the poly SAE without it, or use decoder='linear')")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.ranks is None:
            r1 = min(self.d_in, self.d_sae)
            self.ranks = (r1, min(64, r1), min(64, r1))
        self.ranks = tuple(int(r) for r in self.ranks)  # type: ignore[assignment]
        if len(self.ranks) != 3:
            raise bad("ranks", f"must be three integers (R1, R2, R3), got {self.ranks!r}")
        r1, r2, r3 = self.ranks
        if min(self.ranks) < 1:
            raise bad("ranks", f"every rank must be >= 1, got {self.ranks}")
        if self.decoder == "poly":
            if r1 > self.d_sae:
                raise bad("ranks", f"R1={r1} exceeds d_sae={self.d_sae}: U [d_sae, R1] cannot have "
                          "orthonormal columns")
            if r1 > self.d_in:
                raise bad("ranks", f"R1={r1} exceeds d_in={self.d_in}: the linear term U C1^T has "
                          f"rank at most d_in, so extra columns are wasted")
            if r2 > r1:
                raise bad("ranks", f"R1={r1} < R2={r2}: the quadratic term uses the first R2 "
                          "columns of U, so R2 <= R1 is required")
            if r3 > r1:
                raise bad("ranks", f"R1={r1} < R3={r3}: R3 <= R1 is required")
            if not self.shared_u:
                if r3 > r2:
                    raise bad("ranks", f"R2={r2} < R3={r3}: separate-U mode needs R1 >= R2 >= R3")
                if r1 + r2 + r3 > self.d_sae:
                    raise bad("ranks", f"separate-U mode keeps U, U2, U3 mutually orthogonal, "
                              f"which needs R1+R2+R3={r1 + r2 + r3} <= d_sae={self.d_sae}")
        if self.sparsifier == "matryoshka":
            if self.matryoshka_widths is None:
                self.matryoshka_widths = default_matryoshka_widths(self.d_sae)
            w = tuple(int(v) for v in self.matryoshka_widths)
            if not w or any(a >= b for a, b in zip(w, w[1:])) or w[0] < 1:
                raise bad("matryoshka_widths", f"must be strictly ascending positive, got {w}")
            if w[-1] != self.d_sae:
                raise bad("matryoshka_widths", f"the last width must equal d_sae={self.d_sae}, "
                          f"got {w[-1]}")
            self.matryoshka_widths = w
        elif self.matryoshka_widths is not None:
            self.matryoshka_widths = tuple(int(v) for v in self.matryoshka_widths)
        if self.aux_k is not None and self.aux_k < 1:
            raise bad("aux_k", f"must be a positive integer or None, got {self.aux_k!r}")
        for name in ("jumprelu_threshold_init", "jumprelu_bandwidth"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise bad(name, f"must be a positive finite number, got {v!r}")
        for name in ("l0_coefficient", "l1_coefficient", "aux_coefficient"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise bad(name, f"must be a non-negative finite number, got {v!r}")
        if not 0 < self.batchtopk_threshold_momentum <= 1:
            raise bad("batchtopk_threshold_momentum", "must lie in (0, 1]")
        if self.batchtopk_inference not in ("threshold", "batch"):
            raise bad("batchtopk_inference", f"must be 'threshold' or 'batch', got "
                      f"{self.batchtopk_inference!r}")

    # -- derived ------------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def effective_aux_k(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    @property
    def uses_threshold(self) -> bool:
        """True when the SAE carries a ``threshold`` tensor (JumpReLU, BatchTopK, Matryoshka)."""
        return self.sparsifier in ("jumprelu", "batchtopk", "matryoshka")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("ranks", "matryoshka_widths"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build from a dict, dropping keys this version does not know (forward compatibility)."""
        return cls(**known_fields(cls, d))

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


def check_sae_overrides(overrides: dict[str, Any], *, fixed: tuple[str, ...], owner: str,
                        fixed_why: str = "set per SAE, not shared") -> dict[str, Any]:
    """Validate a dict of :class:`SAEConfig` overrides shared by several SAEs (``polysae run``,
    ``polysae replicate``) before any work starts: no field in ``fixed`` (set per SAE), no unknown
    field, and values a config accepts (k > d_sae, bad ranks ... fail here, with ``d_in`` taken
    as large as the ranks need). ``owner`` names the dict in the error (``RunConfig.sae``).
    Returns the overrides with JSON lists turned back into the tuples the fields hold."""
    bad_keys = sorted(set(overrides) & set(fixed))
    if bad_keys:
        raise ValueError(f"{owner}: overrides {bad_keys} are {fixed_why}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SAEConfig)})
    if unknown:
        raise ValueError(f"{owner}: unknown SAEConfig fields {unknown}")
    hints = typing.get_type_hints(SAEConfig)
    out = {k: tuple(v) if isinstance(v, list) and "tuple" in str(hints[k]) else v
           for k, v in overrides.items()}  # JSON gives lists
    SAEConfig(**({"d_in": (out.get("ranks") or (1,))[0]} | out))
    return out


__all__ = ["SAEConfig", "ParamCounts", "count_params", "SPARSIFIERS", "DECODERS", "DTYPES",
           "check_sae_overrides", "check_values", "default_matryoshka_widths"]


class ParamCounts(NamedTuple):
    """Parameter accounting as in the paper's tables (docs/method.md#parameter-count)."""

    encoder: int
    """W_enc + b_enc."""
    decoder: int
    """Decoder incl. b_dec: vanilla F*D + D; poly D + F*R1 + D*(R1+R2+R3) + 2 (shared U)."""
    total: int
    """encoder + decoder (+ JumpReLU thresholds)."""
    vanilla_decoder: int
    """A linear decoder of the same width: F*D + D."""
    overhead_vs_decoder: float
    """(decoder - vanilla_decoder) / vanilla_decoder."""
    overhead_vs_sae: float
    """(decoder - vanilla_decoder) / (a vanilla SAE's total): the paper's "≈3%"."""


def count_params(cfg: SAEConfig) -> ParamCounts:
    D, F_ = cfg.d_in, cfg.d_sae
    enc = D * F_ + F_
    vanilla_dec = F_ * D + D
    if cfg.decoder == "linear":
        dec = vanilla_dec
    else:
        r1, r2, r3 = cfg.ranks
        rs = [r1, r2, r3][: cfg.order]
        dec = D + F_ * r1 + D * sum(rs) + (cfg.order - 1)
        if not cfg.shared_u:
            dec += F_ * sum(rs[1:])
    thr = F_ if cfg.sparsifier == "jumprelu" else 0
    extra = dec - vanilla_dec
    return ParamCounts(enc, dec, enc + dec + thr, vanilla_dec, extra / vanilla_dec,
                       extra / (enc + vanilla_dec + thr))
