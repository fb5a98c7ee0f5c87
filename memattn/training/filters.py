"""Training-time memorization filters: per sample, does its loss count in this step?

Three mitigations for a diffusers-style training step (``unet(noisy, t, text)`` → per-sample MSE):

- :class:`EntropyFilter` — Ren et al.'s unreleased training-time method, as we implement it: the
  cross-attention entropy of each sample, read from the probe during the training forward that computes
  the loss (no extra UNet call), thresholded into a keep-mask. The paper's code was never released, so
  the variant is a design choice (docs/training.md): entropy over all tokens of the head-
  and layer-mean attention (``layers``: all by default) at the sampled timestep.
- :class:`NoiseNormFilter` — Wen et al.'s filter: one extra unconditional pass on the same noisy input
  and timestep, ``‖ε(x_t, c) − ε(x_t, ∅)‖₂`` per sample, drop if ``≥ τ`` (their ``--hard_threshold 2``).
- :class:`CaptionAugmenter` — Somepalli et al.'s random token addition (``randwordadd``): with
  probability ``p`` (their ``--trainspecial_prob 0.1``) insert 2 random vocabulary tokens at random word
  positions of the caption.

Both filters share :class:`ThresholdRule`: a ``fixed`` threshold, or a robust z-score
``(s − median) / (1.4826 · MAD)`` against the current batch (``window=0``) or a running window of recent
scores, optionally kept per timestep bin (the attention entropy moves with ``t`` far more than with
memorization). The direction is a parameter (``drop="high"|"low"``): the paper drops high-entropy
samples, but on the testbed the inference-time signal was absent or inverted (benchmarks/RESULTS.md),
so which direction — if any — separates duplicates must be measured, not assumed.

Use in any loop::

    filt = EntropyFilter(rule="zscore", z=2.0)
    with memattn.trace(unet, cfg=False) as tr:
        for batch in loader:
            tr.reset()
            pred = unet(noisy, t, text).sample
            keep = filt.keep_mask(tr.record, timesteps=t)
            loss = masked_loss(per_sample_mse(pred, target), keep)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from memattn.attention.record import AttentionRecord
from memattn.detection.scores import entropy, layer_entropy_curves, mean_attention
from memattn.errors import MemattnError

Rule = Literal["fixed", "zscore"]
Direction = Literal["high", "low"]
MAD_SCALE = 1.4826  # MAD of a normal distribution × this = its standard deviation


def _flat(values: Any, dtype: type = np.float64) -> np.ndarray:
    """A tensor (or number) as a flat NumPy array on the host: the rules' statistics run there."""
    tensor = torch.as_tensor(values).detach().cpu().reshape(-1)
    if tensor.dtype != torch.bool:
        tensor = tensor.double()  # bf16 has no NumPy dtype
    return tensor.numpy().astype(dtype)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[batch]`` mean squared error of each sample (float32), the loss a filter masks."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def masked_loss(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean loss over the kept samples; 0 (with a graph) when every sample is dropped."""
    weight = keep.to(device=per_sample.device, dtype=per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


class ThresholdRule:
    """Scores → keep-mask: a fixed threshold or a robust (median/MAD) z-score.

    ``window=0``: statistics of the current batch (``population`` when given, e.g. gathered over
    processes); ``window=N``: of the last ``N`` eligible scores per timestep bin (the current batch
    included), kept in :meth:`state_dict` so a resumed run decides exactly as an uninterrupted one.
    Fewer than ``min_samples`` reference scores, or a MAD of 0, give z = 0 (keep): a rule never drops on
    statistics it does not have.
    """

    def __init__(
        self,
        rule: Rule = "zscore",
        *,
        threshold: float | None = None,
        z: float = 2.0,
        drop: Direction = "high",
        window: int = 0,
        timestep_bins: int = 1,
        num_train_timesteps: int = 1000,
        min_samples: int = 8,
    ) -> None:
        if rule not in ("fixed", "zscore"):
            raise MemattnError(f"unknown threshold rule {rule!r}; choose 'fixed' or 'zscore'")
        if drop not in ("high", "low"):
            raise MemattnError(f"drop must be 'high' or 'low', got {drop!r}")
        if rule == "fixed" and (threshold is None or not math.isfinite(threshold)):
            raise MemattnError("the fixed rule needs a finite threshold (--threshold)")
        if rule == "zscore" and not (math.isfinite(z) and z > 0):
            raise MemattnError(f"the z-score rule needs z > 0, got {z}")
        if window < 0 or timestep_bins < 1 or min_samples < 2 or num_train_timesteps < 1:
            raise MemattnError(
                "window must be >= 0, timestep_bins >= 1, min_samples >= 2 and num_train_timesteps >= 1"
            )
        self.rule, self.threshold, self.z, self.drop = rule, threshold, float(z), drop
        self.window, self.timestep_bins, self.min_samples = window, timestep_bins, min_samples
        self.num_train_timesteps = num_train_timesteps
        self.history: list[list[float]] = [[] for _ in range(timestep_bins)]

    def describe(self) -> str:
        if self.rule == "fixed":
            return f"fixed: drop {'≥' if self.drop == 'high' else '≤'} {self.threshold:g}"
        where = "batch" if self.window == 0 else f"running window {self.window}"
        bins = f", {self.timestep_bins} timestep bins" if self.timestep_bins > 1 else ""
        return f"z-score vs {where}{bins}: drop z {'≥' if self.drop == 'high' else '≤ -'}{self.z:g}"

    def _bins(self, timesteps: torch.Tensor | None, n: int) -> np.ndarray:
        if timesteps is None or self.timestep_bins == 1:
            return np.zeros(n, dtype=np.int64)
        t = _flat(timesteps)
        if t.size == 1 and n > 1:
            t = np.full(n, t[0])
        bins = np.floor(t * self.timestep_bins / self.num_train_timesteps).astype(np.int64)
        return np.clip(bins, 0, self.timestep_bins - 1)

    def z_scores(
        self,
        scores: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        eligible: torch.Tensor | None = None,
        *,
        population: torch.Tensor | None = None,
        population_timesteps: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Robust z-score of each score against its bin's reference; updates the running window."""
        values = _flat(scores)
        ok = np.ones(len(values), bool) if eligible is None else _flat(eligible, bool)
        if population is None:
            reference = values[ok]
            reference_bins = self._bins(timesteps, len(values))[ok]
        else:
            reference = _flat(population)
            reference_bins = self._bins(population_timesteps, len(reference))
        bins = self._bins(timesteps, len(values))
        z = np.zeros(len(values))
        for b in range(self.timestep_bins):
            current = reference[reference_bins == b]
            if self.window:
                self.history[b] = (self.history[b] + current.tolist())[-self.window :]
                current = np.asarray(self.history[b])
            mine = bins == b
            if len(current) < self.min_samples or not mine.any():
                continue
            median = float(np.median(current))
            mad = float(np.median(np.abs(current - median)))
            if mad > 0:
                z[mine] = (values[mine] - median) / (MAD_SCALE * mad)
        return z

    def decide(
        self,
        scores: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        eligible: torch.Tensor | None = None,
        *,
        population: torch.Tensor | None = None,
        population_timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[batch]`` bool keep-mask on the scores' device; ineligible samples are always kept."""
        values = _flat(scores)
        if self.rule == "fixed":
            assert self.threshold is not None
            flagged = values >= self.threshold if self.drop == "high" else values <= self.threshold
        else:
            z = self.z_scores(
                scores, timesteps, eligible, population=population, population_timesteps=population_timesteps
            )
            flagged = z >= self.z if self.drop == "high" else z <= -self.z
        if eligible is not None:
            flagged &= _flat(eligible, bool)
        return torch.from_numpy(~flagged).to(scores.device)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state.get("history", [])
        if len(history) != self.timestep_bins:
            raise MemattnError(
                f"filter state has {len(history)} timestep bins, this rule {self.timestep_bins}"
            )
        self.history = [[float(x) for x in h] for h in history]


class EntropyFilter:
    """Keep-mask from the cross-attention entropy of the training forward (no extra UNet call).

    Score per sample: Shannon entropy (nats) over all tokens of the attention averaged over heads, then
    over ``layers`` (indices or diffusers names; all cross-attention layers by default), at recorded
    step ``step`` (0: the first UNet call after ``tr.reset()``, i.e. the training forward).
    """

    signal = "entropy"

    def __init__(
        self,
        rule: Rule = "zscore",
        *,
        threshold: float | None = None,
        z: float = 2.0,
        drop: Direction = "high",
        layers: Sequence[int | str] | None = None,
        window: int = 0,
        timestep_bins: int = 1,
        num_train_timesteps: int = 1000,
        min_samples: int = 8,
        step: int = 0,
    ) -> None:
        self.rule = ThresholdRule(
            rule,
            threshold=threshold,
            z=z,
            drop=drop,
            window=window,
            timestep_bins=timestep_bins,
            num_train_timesteps=num_train_timesteps,
            min_samples=min_samples,
        )
        self.layers = None if layers is None else list(layers)
        self.step = step

    def scores(self, record: AttentionRecord) -> torch.Tensor:
        """``[image]`` entropy at the filter's step (float32, CPU)."""
        return entropy(mean_attention(record, self.layers)[self.step])

    def layer_scores(self, record: AttentionRecord) -> torch.Tensor:
        """``[image, layer]`` entropy of each layer alone (what a layer choice would be measured on)."""
        return layer_entropy_curves(record)[self.step].T

    def keep_mask(
        self,
        record: AttentionRecord,
        timesteps: torch.Tensor | None = None,
        eligible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[image]`` True where the sample's loss counts."""
        return self.rule.decide(self.scores(record), timesteps, eligible)

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state)


class NoiseNormFilter:
    """Wen et al.'s training filter: one extra no-grad unconditional pass per step, drop if norm ≥ τ.

    ``scores`` runs ``unet(noisy, timesteps, uncond)`` and returns ``‖prediction − ε(x_t, ∅)‖₂`` over
    all latent elements per sample (``prediction`` is the training forward's output, detached). The
    default rule is Wen's: fixed, drop ``≥ threshold`` (their README: 2, for SD1.4 latents); the value is
    model- and parameterisation-specific (v-prediction differs), so calibrate it or use ``zscore``.
    """

    signal = "noise_norm"

    def __init__(
        self,
        unet: torch.nn.Module,
        rule: Rule = "fixed",
        *,
        threshold: float | None = 2.0,
        z: float = 2.0,
        drop: Direction = "high",
        window: int = 0,
        timestep_bins: int = 1,
        num_train_timesteps: int = 1000,
        min_samples: int = 8,
    ) -> None:
        self.unet = unet
        self.rule = ThresholdRule(
            rule,
            threshold=threshold,
            z=z,
            drop=drop,
            window=window,
            timestep_bins=timestep_bins,
            num_train_timesteps=num_train_timesteps,
            min_samples=min_samples,
        )

    @torch.no_grad()
    def scores(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prediction: torch.Tensor,
        uncond_embeddings: torch.Tensor,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """``[batch]`` text-conditional noise norm (float32, on the prediction's device)."""
        batch = noisy.shape[0]
        uncond = uncond_embeddings
        if uncond.shape[0] == 1 and batch > 1:
            uncond = uncond.expand(batch, *uncond.shape[1:])
        unconditional = self.unet(noisy, timesteps, encoder_hidden_states=uncond, **unet_kwargs).sample
        return (prediction.detach().float() - unconditional.float()).flatten(1).norm(dim=1)

    def keep_mask(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prediction: torch.Tensor,
        uncond_embeddings: torch.Tensor,
        eligible: torch.Tensor | None = None,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """``[batch]`` True where the sample's loss counts (costs one extra UNet forward)."""
        scores = self.scores(noisy, timesteps, prediction, uncond_embeddings, **unet_kwargs)
        return self.rule.decide(scores, timesteps, eligible)

    def state_dict(self) -> dict[str, Any]:
        return self.rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state)


class CaptionAugmenter:
    """Somepalli et al.'s random token addition (``--trainspecial randwordadd``), seeded per call.

    With probability ``prob`` a caption gets ``n_tokens`` tokens drawn uniformly from the tokenizer's
    vocabulary (special tokens excluded), decoded to text and inserted at random word positions, as
    their ``datasets.py`` does. ``key`` (e.g. the training step) seeds the draw, so a resumed run
    augments exactly as an uninterrupted one. Note: a restricted vocabulary (the testbed's tokenizer
    holds only the BPE pieces its captions need) draws mostly sub-word and byte tokens.
    """

    def __init__(self, tokenizer: Any, prob: float = 0.1, n_tokens: int = 2, seed: int = 0) -> None:
        if not (math.isfinite(prob) and 0.0 <= prob <= 1.0):
            raise MemattnError(f"caption augmentation probability must lie in [0, 1], got {prob}")
        if n_tokens < 1:
            raise MemattnError(f"caption augmentation inserts at least one token, got {n_tokens}")
        self.tokenizer, self.prob, self.n_tokens, self.seed = tokenizer, prob, n_tokens, seed
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._ids = [i for i in range(len(tokenizer)) if i not in special]
        if not self._ids:
            raise MemattnError("the tokenizer has no ordinary tokens to insert")

    def _token(self, rng: random.Random) -> str:
        for _ in range(100):
            text = self.tokenizer.decode([rng.choice(self._ids)]).strip()
            if text:
                return text
        raise MemattnError("could not draw a printable token from the tokenizer in 100 tries")

    def __call__(self, captions: Sequence[str], key: int | str) -> tuple[list[str], list[bool]]:
        """The captions (some augmented) and which ones were."""
        rng = random.Random(f"caption-aug:{self.seed}:{key}")
        out, changed = [], []
        for caption in captions:
            if rng.random() < self.prob:
                words = caption.split()
                for _ in range(self.n_tokens):
                    words.insert(rng.randint(0, len(words)), self._token(rng))
                out.append(" ".join(words))
                changed.append(True)
            else:
                out.append(caption)
                changed.append(False)
        return out, changed


__all__ = [
    "CaptionAugmenter",
    "EntropyFilter",
    "NoiseNormFilter",
    "ThresholdRule",
    "masked_loss",
    "per_sample_mse",
]
