"""The sparse autoencoder: :class:`SAE` (linear or polynomial decoder, five sparsifiers).

Shape letters: N rows (tokens; any leading batch dims are flattened to N and restored), D = d_in,
F = d_sae, K = active latents per row in the sparse path.

Encoder (docs/method.md): ``pre = (x - b_dec) @ W_enc + b_enc`` (``x`` alone when
``apply_b_dec_to_input`` is False), then a sparsifier:

- ``topk``: top k of ``pre`` per row, ReLU on them;
- ``batchtopk`` / ``matryoshka``: ReLU, then the top k*N values of the whole batch; an EMA of the
  smallest kept value (float64) is the inference threshold (``threshold`` tensor);
- ``jumprelu``: ``pre * (pre > theta)``, theta learned per latent through a straight-through
  estimator with a rectangle kernel of width ``jumprelu_bandwidth``;
- ``relu``: ReLU, with an L1 penalty.

Public API: ``encode(x) -> codes [..., F]`` (dense, SAELens/SAEBench convention),
``decode(codes) -> [..., D]``, ``forward(x) -> x_hat``; the sparse path ``encode_sparse(x) ->
SparseCodes`` and ``decode_sparse(values, indices)``; ``loss(x, dead_mask) -> LossOutput`` with
MSE, AuxK, sparsity and Matryoshka terms; ``save(dir)`` and :func:`load_checkpoint`.

Devices: ``encode``, ``encode_sparse``, ``decode``, ``decode_sparse`` and ``forward`` accept inputs
on any device. They compute on the SAE's device, in the SAE's dtype, and return their results on
the device of their input (a CPU tensor in, a CPU tensor out, as a function would), so callers never
have to know where the SAE lives. The copies are no-ops when input and SAE share a device (training).
``loss`` is the training path and expects its batch on the SAE's device already.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polysae import kernels
from polysae.config import ParamCounts, SAEConfig, count_params
from polysae.decoders import make_decoder
from polysae.fileio import atomic_write_text, atomic_write_with, sha256_file
from polysae.validate import check_finite_tensors, check_save_target, read_checkpoint_doc

FORMAT_VERSION = 1
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


class SparseCodes(NamedTuple):
    """Sparse codes of N rows. Padding entries have value 0 (their index is arbitrary)."""

    values: Tensor
    """[N, K] activations of the active latents (>= 0 except in AuxK)."""
    indices: Tensor
    """[N, K] int64 latent ids."""
    pre_acts: Tensor
    """[N, F] encoder pre-activations (before the sparsifier)."""


class LossOutput(NamedTuple):
    """Training losses of one batch; ``loss`` is what the optimiser minimises."""

    loss: Tensor
    """Total: mse + aux + sparsity + inner."""
    mse: Tensor
    """Mean over rows of ||x - x_hat||^2 (sum over D), docs/method.md#losses."""
    aux: Tensor
    """AuxK dead-latent loss (0 when no latent is dead)."""
    sparsity: Tensor
    """L1 (relu) or L0 (jumprelu) penalty, already weighted; 0 otherwise."""
    inner: Tensor
    """Sum of Matryoshka nested-prefix MSEs (0 for other sparsifiers)."""
    x_hat: Tensor
    """[N, D] reconstruction."""
    codes: SparseCodes
    """The sparse codes the reconstruction came from."""


# -- straight-through estimators for JumpReLU (Rajamanoharan et al., 2024) ----------------------
def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        g_pre = g * (pre > theta)
        g_theta = -(theta / bw) * _rect((pre - theta) / bw) * g
        return g_pre, g_theta.reshape(-1, theta.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        g_theta = -(1.0 / bw) * _rect((pre - theta) / bw) * g
        return torch.zeros_like(pre), g_theta.reshape(-1, theta.shape[-1]).sum(0), None


def _pack(z: Tensor) -> tuple[Tensor, Tensor]:
    """Dense non-negative codes [N, F] -> (values, indices) [N, Kmax], Kmax = max nonzeros per
    row."""
    kmax = max(1, int((z != 0).sum(-1).max())) if z.numel() else 1
    values, indices = z.topk(kmax, dim=-1, sorted=False)
    return values, indices


class SAE(nn.Module):
    """A sparse autoencoder with a linear or polynomial decoder; see the module docstring."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        D, F_, dt = cfg.d_in, cfg.d_sae, cfg.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(D, F_, device=device, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(F_, device=device, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(D, device=device, dtype=dt))
        self.decoder = make_decoder(cfg, device)
        if cfg.sparsifier == "jumprelu":
            self.threshold = nn.Parameter(
                torch.full((F_,), float(cfg.jumprelu_threshold_init), device=device, dtype=dt))
        elif cfg.uses_threshold:
            # BatchTopK EMA of the smallest kept activation, float64 as in the reference
            self.register_buffer("threshold", torch.zeros(F_, device=device, dtype=torch.float64))
        self._init_encoder()

    @torch.no_grad()
    def _init_encoder(self) -> None:
        """docs/method.md#initialisation: W_dec ~ kaiming_uniform [F, D], rows rescaled to norm
        0.1, W_enc = W_dec^T (with ``unit_norm_decoder`` the decoder rows start at norm 1).
        For the poly decoder this W_dec only initialises the encoder and is then discarded."""
        W = torch.empty(self.cfg.d_sae, self.cfg.d_in, device=self.W_enc.device,
                        dtype=torch.float32)
        nn.init.kaiming_uniform_(W)
        W *= 0.1 / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_enc.copy_(W.T)
        if self.cfg.decoder == "linear":
            self.decoder.W_dec.copy_(W * (10.0 if self.cfg.unit_norm_decoder else 1.0))  # 0.1 -> 1

    # -- input checks -------------------------------------------------------------------------
    def _flatten(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"SAE input: expected last dimension d_in={self.cfg.d_in}, got shape "
                             f"{tuple(x.shape)}")
        if self.cfg.check_finite and not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(f"SAE input of shape {tuple(x.shape)} holds NaN/inf (first at index "
                             f"{bad})")
        return (x.reshape(-1, self.cfg.d_in).to(self.W_enc.device, self.W_enc.dtype),
                tuple(x.shape[:-1]))

    # -- encode -------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """[N, D] -> [N, F] encoder pre-activations."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.addmm(self.b_enc, x, self.W_enc)

    def encode_sparse(self, x: Tensor) -> SparseCodes:
        """[..., D] -> SparseCodes with values/indices [N, K] and pre_acts [N, F] (N = rows), on
        the device of ``x``."""
        xf, _ = self._flatten(x)
        return SparseCodes(*(t.to(x.device) for t in self._codes(xf)))

    def _codes(self, x: Tensor) -> SparseCodes:
        """The sparsifier on flattened rows [N, D] already on the SAE's device and dtype."""
        cfg = self.cfg
        sp = cfg.sparsifier
        b_dec = self.b_dec if cfg.apply_b_dec_to_input else None
        if sp == "topk":
            # Same maths as pre_acts + topk + relu; its backward touches only the k selected
            # latents (Triton or plain torch; b_dec's gradient is one GEMV, no [N, D] input grad).
            return SparseCodes(*kernels.topk_encode(x, self.W_enc, self.b_enc, cfg.k, b_dec))
        if sp in ("batchtopk", "matryoshka") and (
                self.training or cfg.batchtopk_inference == "batch"
                or not bool(self.threshold[0] > 0)):
            return self._batch_topk(x, b_dec)
        pre = self.pre_acts(x)
        if sp == "relu":
            return SparseCodes(*_pack(F.relu(pre)), pre)
        if sp == "jumprelu":
            theta = self.threshold
            return SparseCodes(*_pack(_JumpReLU.apply(pre, theta, cfg.jumprelu_bandwidth)), pre)
        # batchtopk / matryoshka at inference: the EMA threshold
        z = pre * (pre > self.threshold.to(pre.dtype))
        return SparseCodes(*_pack(F.relu(z)), pre)

    def _batch_topk(self, x: Tensor, b_dec: Tensor | None) -> SparseCodes:
        """The k*N largest activations of the batch (sparse backward); in training the EMA of the
        smallest kept activation (the inference threshold) moves towards this batch's."""
        values, indices, pre = kernels.batchtopk_encode(x, self.W_enc, self.b_enc, self.cfg.k,
                                                        b_dec)
        if self.training:
            with torch.no_grad():
                pos = values[values > 0]
                if pos.numel():
                    m = self.cfg.batchtopk_threshold_momentum
                    self.threshold.mul_(1 - m).add_(m * pos.min().double())
        return SparseCodes(values, indices, pre)

    def encode(self, x: Tensor) -> Tensor:
        """[..., D] -> dense codes [..., F] (zeros outside the active latents), on the device
        of ``x``."""
        xf, lead = self._flatten(x)
        c = self._codes(xf)
        z = torch.zeros_like(c.pre_acts).scatter_add(1, c.indices, c.values)
        return z.reshape(*lead, self.cfg.d_sae).to(x.device)

    # -- decode -------------------------------------------------------------------------------
    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """values, indices [N, K] -> x_hat [N, D] through the sparse gather path (the kernels),
        on the device of ``values``."""
        if values.shape != indices.shape or values.ndim != 2:
            raise ValueError(f"decode_sparse: values {tuple(values.shape)} and indices "
                             f"{tuple(indices.shape)} must both be [N, K]")
        home = self.b_dec
        out = self.decoder.decode_sparse(values.to(home.device, home.dtype),
                                         indices.to(home.device, torch.long), home)
        return out.to(values.device)

    def decode(self, codes: Tensor, path: str = "auto") -> Tensor:
        """Dense codes [..., F] -> x_hat [..., D]. ``path`` = ``sparse`` (gather the nonzeros),
        ``dense`` (codes @ U, as the paper's code) or ``auto`` (sparse when at most F/8 latents
        are active in every row, the CPU default)."""
        if codes.ndim == 0 or codes.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"SAE.decode: expected last dimension d_sae={self.cfg.d_sae}, got "
                             f"shape {tuple(codes.shape)}")
        lead = codes.shape[:-1]
        z = codes.reshape(-1, self.cfg.d_sae).to(self.b_dec.device, self.b_dec.dtype)
        kmax = max(1, int((z != 0).sum(-1).max())) if z.numel() and path != "dense" else 1
        if path == "auto":
            path = "sparse" if kmax <= max(1, self.cfg.d_sae // 8) else "dense"
        if path == "sparse":
            _, idx = z.abs().topk(kmax, dim=-1, sorted=False)
            out = self.decode_sparse(z.gather(1, idx), idx)
        elif path == "dense":
            out = self.decoder.decode_dense(z, self.b_dec)
        else:
            raise ValueError(f"SAE.decode: path must be 'auto', 'sparse' or 'dense', got {path!r}")
        return out.reshape(*lead, self.cfg.d_in).to(codes.device)

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> x_hat [..., D] on the device of ``x``; equals ``decode(encode(x))``."""
        xf, lead = self._flatten(x)
        c = self._codes(xf)
        return self.decode_sparse(c.values, c.indices).reshape(*lead, self.cfg.d_in).to(x.device)

    # -- training losses ----------------------------------------------------------------------
    def loss(self, x: Tensor, dead_mask: Tensor | None = None) -> LossOutput:
        """Losses on a batch [N, D] (docs/method.md). ``dead_mask`` [F] bool marks latents that
        have not fired within the trainer's window; it drives AuxK."""
        x, _ = self._flatten(x)
        cfg = self.cfg
        codes = self._codes(x)
        x_hat = self.decode_sparse(codes.values, codes.indices)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        zero = mse.new_zeros(())
        aux = self._auxk(x, x_hat, codes.pre_acts, dead_mask) if cfg.sparsifier != "relu" else zero
        sparsity = zero
        if cfg.sparsifier == "relu":
            norms = self.decoder.linear_atoms().norm(dim=-1)
            sparsity = cfg.l1_coefficient * (codes.values * norms[codes.indices]).sum(-1).mean()
        elif cfg.sparsifier == "jumprelu":
            l0 = _Step.apply(codes.pre_acts, self.threshold, cfg.jumprelu_bandwidth)
            sparsity = cfg.l0_coefficient * l0.sum(-1).mean()
        inner = zero
        if cfg.sparsifier == "matryoshka":
            # Nested prefixes decoded through the SAE's OWN decoder (polynomial for PolySAE). The
            # reference code decodes them with its unused linear W_dec instead, so its encoder is
            # shared by a polynomial full-width loss and linear prefix losses; we treat that as a
            # defect and do not copy it (docs/method.md, deviation 1).
            for w in cfg.matryoshka_widths[:-1]:
                v = codes.values * (codes.indices < w)
                inner = inner + (self.decode_sparse(v, codes.indices) - x).pow(2).sum(-1).mean()
        return LossOutput(mse + aux + sparsity + inner, mse, aux, sparsity, inner, x_hat, codes)

    def _auxk(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK (SAELens/OpenAI): reconstruct the detached residual from the top dead latents'
        raw (not ReLU'd) pre-activations through the same decoder, b_dec included."""
        cfg = self.cfg
        if dead_mask is None or cfg.aux_coefficient == 0:
            return x.new_zeros(())
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return x.new_zeros(())
        k_aux = cfg.effective_aux_k
        v, i = pre.masked_fill(~dead_mask.to(pre.device), float("-inf")).topk(
            min(k_aux, n_dead), dim=-1, sorted=False)
        recon = self.decode_sparse(v, i)
        resid = (x - x_hat).detach()
        scale = min(n_dead / k_aux, 1.0)
        return cfg.aux_coefficient * scale * (recon - resid).pow(2).sum(-1).mean()

    # -- constraint ---------------------------------------------------------------------------
    @torch.no_grad()
    def retract_(self, fast: bool = True) -> None:
        """Orthonormalise U after an optimiser step (poly decoder); no-op for linear."""
        self.decoder.retract_(fast)

    # -- analysis accessors -------------------------------------------------------------------
    @torch.no_grad()
    def fold_scale_(self, s: float) -> SAE:
        """Rewrite this SAE (trained on ``x / s``) in place to take raw ``x``; returns it.

        Trained: ``pre = (x/s - b_dec) W_enc + b_enc`` and ``x_hat_n = b_dec + dec(z)``. Wanted:
        the same codes ``z`` for raw ``x`` and ``x_hat(x) = s * x_hat_n(x/s)``.

        - Encoder: ``(x - s b_dec) (W_enc/s) + b_enc = (x/s - b_dec) W_enc + b_enc``, so
          ``W_enc/s`` with ``b_dec -> s b_dec`` gives identical pre-activations (and codes, so
          every sparsifier's threshold is unchanged). Without ``apply_b_dec_to_input``,
          ``x (W_enc/s) = (x/s) W_enc``.
        - Decoder: ``s * (b_dec + dec(z)) = s b_dec + s dec(z)``: the decoder scales its own
          output (:meth:`LinearDecoder.scale_output_`, :meth:`PolyDecoder.scale_output_`).
        - ``unit_norm_decoder``: the codes carry the scale and the rows stay unit norm: ``b_enc,
          b_dec, theta -> s b_enc, s b_dec, s theta`` give ``s pre``, codes ``s z``, ``s x_hat``.
        """
        s = float(s)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"fold_scale_: scale must be positive and finite, got {s}")
        if self.cfg.unit_norm_decoder:
            for t in (self.b_enc, self.b_dec, *([self.threshold] if self.cfg.uses_threshold
                                                else [])):
                t.mul_(s)
            return self
        self.W_enc.div_(s)
        self.b_dec.mul_(s)
        self.decoder.scale_output_(s)
        return self

    def linear_atoms(self) -> Tensor:
        """[F, D] linear atom of every latent (W_dec, or U C1^T for the poly decoder)."""
        return self.decoder.linear_atoms()

    def linear_atom(self, i: int) -> Tensor:
        return self.linear_atoms()[i]

    def pair_atom(self, i: int, j: int) -> Tensor:
        """[D] pairwise atom B_ij (poly decoder only)."""
        return self.decoder.pair_atoms(torch.tensor([i]), torch.tensor([j]))[0]

    def pair_terms(self, i: Tensor, j: Tensor) -> Tensor:
        """[P, D] pairwise-interaction term of latents i and j (index vectors [P]; poly decoder
        of order >= 2 only, ValueError otherwise): the mixed second derivative
        d^2 x_hat / (dz_i dz_j) at z = 0, i.e. lambda2 (B_ij + B_ji), which is 2 lambda2 B_ij with
        a shared U. For i != j this is the second-order part of
        decode(e_i + e_j) - decode(e_i) - decode(e_j) + b_dec (exactly that difference at
        order 2; order 3 adds cubic cross terms); for i == j it is 2 lambda2 B_ii."""
        dec = self.decoder
        if getattr(dec, "lambda2", None) is None:
            dec.pair_atoms(torch.tensor([0]), torch.tensor([0]))  # raises the decoder's error
            raise ValueError("this decoder has no pairwise term")
        i, j = torch.as_tensor(i).reshape(-1), torch.as_tensor(j).reshape(-1)
        if i.shape != j.shape:
            raise ValueError(f"pair_terms: i {tuple(i.shape)} and j {tuple(j.shape)} differ")
        B = dec.pair_atoms(i, j)
        if getattr(dec, "U2", None) is not None:
            B = B + dec.pair_atoms(j, i)
        else:
            B = 2 * B
        return dec.lambda2 * B

    def triple_atom(self, i: int, j: int, k: int) -> Tensor:
        """[D] triple atom Gamma_ijk (poly decoder of order 3 only)."""
        return self.decoder.triple_atoms(torch.tensor([i]), torch.tensor([j]),
                                         torch.tensor([k]))[0]

    def decoder_directions(self) -> Tensor:
        """[F, D] unit-norm linear atoms (SAEBench's ``W_dec`` view)."""
        A = self.linear_atoms()
        return A / A.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def param_counts(self) -> ParamCounts:
        return count_params(self.cfg)

    # -- checkpoint ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The documented checkpoint tensors: W_enc, b_enc, b_dec, decoder tensors, threshold."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec}
        out.update(self.decoder.tensors())
        if self.cfg.uses_threshold:
            out["threshold"] = self.threshold
        return {k: v.detach().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor], source: str = "tensors") -> None:
        """Copy checkpoint tensors in, checking names and shapes (errors name ``source``)."""
        want = self.tensors()
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want))
        if missing or extra:
            raise ValueError(f"{source}: tensor names do not match the config (missing {missing}, "
                             f"unexpected {extra})")
        for name, ref in want.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(ref.shape)}")
        params = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec}
        params.update(self.decoder.tensors())
        for name, p in params.items():
            p.copy_(tensors[name])
        if self.cfg.uses_threshold:
            self.threshold.copy_(tensors["threshold"])

    def save(self, directory: str | os.PathLike, metadata: dict[str, Any] | None = None,
             overwrite: bool = False) -> Path:
        """Write ``sae.safetensors`` and ``config.json`` atomically (temp name, fsync, rename).

        config.json is written last and records the weights' sha256, so a folder whose weights
        were replaced or damaged after the fact fails to load instead of looking valid. Refuses
        NaN/inf weights (nothing written) and a folder holding another SAE or a foreign
        config.json unless ``overwrite`` (:func:`polysae.validate.check_save_target`)."""
        from safetensors.torch import save_file

        d = Path(directory)
        tensors = {k: v.cpu() for k, v in self.tensors().items()}
        check_finite_tensors(tensors, d / WEIGHTS_FILE, "; not saved (what is on disk is kept)")
        check_save_target(d, self.cfg.to_dict(), overwrite)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"format": "polysae", "format_version": str(FORMAT_VERSION)}
        digest = atomic_write_with(d / WEIGHTS_FILE,
                                   lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        from polysae.version import __version__

        cfg_doc = {"format": "polysae", "format_version": FORMAT_VERSION,
                   "polysae_version": __version__, "config": self.cfg.to_dict(),
                   "weights_sha256": digest, "metadata": metadata or {}}
        atomic_write_text(d / CONFIG_FILE, json.dumps(cfg_doc, indent=2, sort_keys=True))
        return d


def load_checkpoint(directory: str | os.PathLike, device: torch.device | str | None = None,
                    verify: bool = True) -> tuple[SAE, dict[str, Any]]:
    """Read a polysae checkpoint folder -> (SAE in eval mode, metadata). Errors name the file.
    A PolySAE whose U is off the orthonormal constraint set (orthogonality error above 1e-3)
    loads with a warning."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint folder {d} does not exist")
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint {d}: missing file {p}")
    doc = read_checkpoint_doc(cfg_path, d, FORMAT_VERSION)  # types, version first, no NaN
    try:
        cfg = SAEConfig.from_dict(doc["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {d}: {cfg_path} is not a valid polysae config ({e})") from e
    if verify and doc.get("weights_sha256"):
        got = sha256_file(w_path)
        if got != doc["weights_sha256"]:
            raise ValueError(f"checkpoint {d}: {w_path} is corrupt or was replaced (sha256 "
                             f"{got[:12]}... does not match {cfg_path})")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {d}: cannot read {w_path} ({e})") from e
    check_finite_tensors(tensors, w_path, "; a diverged run's weights are refused")
    sae = SAE(cfg, device="meta")
    sae.load_tensors(tensors, source=str(w_path))  # names/shapes vs the config, before allocating
    sae = sae.to_empty(device=device or "cpu")
    sae.load_tensors(tensors, source=str(w_path))
    if cfg.decoder == "poly":  # U saved off the constraint set (e.g. between retractions)
        sae.decoder.check_on_manifold(f"checkpoint {d}")
    sae.eval()
    return sae, doc["metadata"]
