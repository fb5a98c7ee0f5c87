"""Baseline detectors next to the paper's D and E, all read from the one generation a user already runs.

- Wen et al. (ICLR 2024): ``‖ε(x_t, c) − ε(x_t, ∅)‖₂`` per image, mean over the first ``k`` steps, taken
  from the CFG call the pipeline makes anyway (:class:`NoiseDifference`, a UNet forward hook).
- Chen et al. (ICLR 2025) "bright ending": the end-token attention map ``m`` at the last step, averaged
  over the first two down cross-attention layers and the heads, and the masked magnitude
  ``BE = mean_t ‖(ε_c − ε_u) ⊙ m‖₂ / mean(m)``. The official code generates twice (the mask exists only
  after the last step); with the same seeds the trajectory is identical, so here one generation keeps
  the per-step differences and applies the mask at the end: one full run instead of two.
- Step-1 features for the combined detector (:mod:`memattn.detection.combined`): E of every layer, BOS and
  summary-token shares, Wen's norm — all free at the first CFG call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memattn.attention.layers import find_denoiser
from memattn.attention.record import AttentionRecord
from memattn.attention.session import AttentionSession
from memattn.detection import scores
from memattn.errors import MemattnError, RecordError

BE_LAYERS = (0, 1)  # the first two down-block cross-attention layers (64×64 in SD1 at 512 px)


class NoiseDifference:
    """Context manager: per UNet call, the CFG difference ``ε_c − ε_u`` of every image.

    ``keep="norm"`` stores only the per-image L2 norms; ``keep="full"`` the differences themselves
    (float32, on the model's device; what bright ending needs). ``max_calls`` stops storing after that
    many calls (step-1 detectors keep one).
    """

    def __init__(self, pipe: Any, keep: str = "norm", max_calls: int | None = None) -> None:
        if keep not in ("norm", "full"):
            raise MemattnError(f"keep must be 'norm' or 'full', got {keep!r}")
        self.pipe = pipe
        self.keep = keep
        self.max_calls = max_calls
        self.norms: list[torch.Tensor] = []  # per call: [image]
        self.differences: list[torch.Tensor] = []  # per call: [image, C, H, W] (keep="full")
        self._handle: Any = None
        self._noise_channels: int | None = None

    def __enter__(self) -> NoiseDifference:
        _, denoiser = find_denoiser(self.pipe)
        # learned-sigma denoisers (PixArt: 2× the latent channels) predict noise in the first half only,
        # as their pipelines read it
        config = getattr(denoiser, "config", None)
        in_channels, out_channels = (
            getattr(config, "in_channels", None),
            getattr(config, "out_channels", None),
        )
        self._noise_channels = in_channels if in_channels and out_channels == 2 * in_channels else None
        self._handle = denoiser.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.max_calls is not None and len(self.norms) >= self.max_calls:
            return
        if not _uses_cfg(self.pipe):
            raise MemattnError(
                "Wen's and bright-ending scores need classifier-free guidance (guidance_scale > 1): they "
                "compare the conditional and unconditional noise predictions"
            )
        sample = output[0] if isinstance(output, tuple) else output.sample
        if self._noise_channels is not None:
            sample = sample[:, : self._noise_channels]
        uncond, cond = sample.detach().float().chunk(2)
        difference = cond - uncond
        self.norms.append(difference.flatten(1).norm(dim=1))
        if self.keep == "full":
            self.differences.append(difference)

    def wen(self, k: int = 1) -> np.ndarray:
        """Per image: mean over the first ``k`` steps of the noise-difference norm."""
        if len(self.norms) < k:
            raise MemattnError(
                f"Wen's score over {k} steps needs {k} recorded UNet calls, got {len(self.norms)}"
            )
        return torch.stack(self.norms[:k]).mean(dim=0).cpu().numpy()

    def reset(self) -> None:
        self.norms.clear()
        self.differences.clear()


def _uses_cfg(pipe: Any) -> bool:
    """The pipeline's CFG flag; PixArt keeps it local, so there it is the attention session's word."""
    flag = getattr(pipe, "do_classifier_free_guidance", None)
    if flag is not None:
        return bool(flag)
    session = AttentionSession.active(pipe)
    return bool(session is not None and session.call is not None and session.call.cfg)


def end_token_map(record: AttentionRecord, layers: Sequence[int] = BE_LAYERS, step: int = -1) -> torch.Tensor:
    """``[image, h, w]``: attention of each pixel to the image's end token, mean over heads and layers.

    Needs the trace's full maps at that step and those layers (``map_steps``/``map_layers``). Layers of
    another resolution are resized to the first one's.
    """
    layouts = record.require_layouts()
    step = step % record.n_steps
    maps = []
    size: tuple[int, int] | None = None
    for layer in layers:
        if (step, layer) not in record.maps:
            raise RecordError(
                f"no attention map for step {step}, layer {layer}: trace with map_steps=[{step}] and "
                f"map_layers={list(layers)}"
            )
        probs = record.maps[(step, layer)].float()  # [image, head, query, token]
        eos = torch.tensor([layout.eos_index for layout in layouts], device=probs.device)
        column = probs[torch.arange(len(layouts)), :, :, eos]  # [image, head, query]
        height, width = record.map_sizes[layer]
        spatial = column.mean(dim=1).reshape(len(layouts), 1, height, width)
        if size is None:
            size = (height, width)
        elif (height, width) != size:
            spatial = F.interpolate(spatial, size=size, mode="bilinear", align_corners=False)
        maps.append(spatial[:, 0])
    return torch.stack(maps).mean(dim=0)


def bright_ending(
    record: AttentionRecord, noise: NoiseDifference, layers: Sequence[int] = BE_LAYERS
) -> np.ndarray:
    """Per image: ``mean_t ‖(ε_c − ε_u) ⊙ m‖₂ / mean(m)`` with ``m`` the last step's end-token map."""
    if not noise.differences:
        raise MemattnError("bright ending needs the per-step noise differences: NoiseDifference(keep='full')")
    mask = end_token_map(record, layers)
    values = []
    for difference in noise.differences:
        m = mask.to(difference.device)
        if m.shape[-2:] != difference.shape[-2:]:
            m = F.interpolate(m[:, None], size=difference.shape[-2:], mode="bilinear", align_corners=False)[
                :, 0
            ]
        masked = difference * m[:, None]
        values.append(masked.flatten(1).norm(dim=1) / m.flatten(1).mean(dim=1).clamp_min(1e-12))
    return torch.stack(values).mean(dim=0).cpu().numpy()


STEP1_ATTENTION_FEATURES = ("bos_share", "summary_share")


def step1_features(record: AttentionRecord, wen_norm: np.ndarray | None) -> tuple[np.ndarray, list[str]]:
    """``[image, feature]`` at the first step: E per layer, BOS and summary shares, Wen's norm.

    Without a BOS (T5: PixArt) there is no ``bos_share`` column, so the names say which features exist:
    a detector fitted on a model with BOS is refused on one without (its feature names differ).
    """
    per_layer = scores.layer_entropy_curves(record)[0].T.numpy()  # [image, layer]
    summary = np.array([float(v) for v in scores.summary_share(record)])
    names = [f"e_layer{i}" for i in range(per_layer.shape[1])]
    columns = [per_layer]
    if all(layout.has_bos for layout in record.require_layouts()):
        columns.append(scores.bos_share(record).numpy()[:, None])
        names.append("bos_share")
    columns.append(summary[:, None])
    names.append("summary_share")
    if wen_norm is not None:
        columns.append(np.asarray(wen_norm, dtype=np.float64)[:, None])
        names.append("wen_step1")
    return np.concatenate(columns, axis=1).astype(np.float64), names
