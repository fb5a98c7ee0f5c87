"""Record where each image's cross-attention goes, at (almost) no cost.

Every text cross-attention layer (``attn2``) of a UNet gets a :class:`CrossAttentionProbe`: it computes
the layer's output exactly as diffusers' ``AttnProcessor2_0`` does (same projections, same fused
``scaled_dot_product_attention`` call, so images are bit-identical to an untraced run) and, for the
recorded rows only, the query-mean of ``softmax(QKᵀ/√d)`` over the text tokens — a ``(rows, heads, 77)``
tensor kept on the model's device. Self-attention keeps its own processor. A forward pre-hook on the
UNet opens a new step per UNet call; a wrapper on ``pipe.encode_prompt`` learns each call's prompts,
images per prompt and whether classifier-free guidance doubled the batch.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from memattn.edits import AttentionEdit, merge_masks
from memattn.errors import LayoutError, RecordError, UnsupportedModelError
from memattn.layers import resolve_layer
from memattn.record import AttentionRecord
from memattn.tokens import TokenLayout, pipeline_layouts

_SECTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def forward_order_key(name: str) -> tuple:
    """Sort key that puts UNet layer names in forward order: down blocks, mid block, up blocks.

    ``attn_processors`` lists modules in registration order (down, up, mid), which is not the order the
    forward pass visits them; numeric parts compare as numbers (``transformer_blocks.10`` after ``.2``).
    """
    parts = name.split(".")
    section = _SECTION_ORDER.get(parts[0], 3)
    return (section, *[(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts])


def find_denoiser(target: Any) -> tuple[Any | None, torch.nn.Module]:
    """Split a pipeline or bare model into (pipeline or None, denoiser module)."""
    if isinstance(target, torch.nn.Module):
        return None, target
    for attribute in ("unet", "transformer"):
        module = getattr(target, attribute, None)
        if isinstance(module, torch.nn.Module):
            return target, module
    raise UnsupportedModelError(
        f"{type(target).__name__} is neither a diffusers pipeline with a `unet` nor a UNet2DConditionModel; "
        "memattn.trace needs one of those"
    )


def cross_attention_layers(model: torch.nn.Module) -> list[tuple[str, Attention]]:
    """Text cross-attention layers (``attn2`` with a separate text key/value) in forward order."""
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if name.split(".")[-1] == "attn2"
        and isinstance(module, Attention)
        and module.is_cross_attention
        and module.added_kv_proj_dim is None
    ]
    if layers:
        return sorted(layers, key=lambda item: forward_order_key(item[0]))
    kind = type(model).__name__
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if "Transformer" in kind or any("Joint" in type(m.processor).__name__ for m in attentions):
        why = (
            "it attends jointly over image and text tokens (SD3/Flux-style MMDiT), so there is no "
            "separate text cross-attention to read"
        )
    elif any(m.added_kv_proj_dim is not None for m in attentions):
        why = (
            "its text keys/values are prepended to image self-attention (added-KV attention, as in "
            "DeepFloyd IF), which memattn does not read yet"
        )
    else:
        why = "it has no text conditioning at all (e.g. an unconditional UNet2DModel)"
    raise UnsupportedModelError(
        f"{kind} has no text cross-attention layers (attn2): {why}; memattn supports "
        "UNet2DConditionModel pipelines (SD1.x, SD2.x, SDXL)"
    )


@dataclass
class _Segment:
    """Buffers of one pipeline call (or of a bare-UNet trace)."""

    prompts: tuple[str, ...] | None = None
    layouts: tuple[TokenLayout, ...] | None = None
    uncond_layouts: tuple[TokenLayout, ...] | None = None
    images_per_prompt: int = 1
    cfg: bool | None = None
    n_images: int | None = None
    steps: list[list[torch.Tensor | None]] = field(default_factory=list)
    uncond_steps: list[list[torch.Tensor | None]] = field(default_factory=list)
    timesteps: list[Any] = field(default_factory=list)
    maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    map_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    record: AttentionRecord | None = None


class Recorder:
    """State shared by every probe of one trace: current step, batch rows, buffers."""

    def __init__(
        self,
        layer_names: Sequence[str],
        heads: Sequence[int],
        *,
        record_uncond: bool = False,
        map_steps: Sequence[int] | None = None,
        map_layers: Sequence[int] | None = None,
    ) -> None:
        self.layer_names = tuple(layer_names)
        self.heads = tuple(heads)
        self.record_uncond = record_uncond
        self.want_maps = map_steps is not None or map_layers is not None
        self.map_steps = None if map_steps is None else set(map_steps)
        self.map_layers = None if map_layers is None else set(map_layers)
        self.segments: list[_Segment] = []
        self.store = True  # False while only a mitigation uses the probes: nothing is recorded
        self.editor: AttentionEdit | None = None  # logit edit applied by every probe (memattn.mitigate)
        self.edit_rows: torch.Tensor | None = None  # bool per conditional row: which images to edit
        self.schedule_length: Callable[[], int | None] | None = None
        self.default_cfg = False
        self.default_layouts: tuple[TokenLayout, ...] | None = None
        self.cond_rows = slice(0, 0)
        self.observed_rows = slice(0, 0)
        self.latent_size: tuple[int, int] = (0, 0)

    # ---- segments and steps -------------------------------------------------------------------
    def start_segment(self, **fields: Any) -> None:
        if not self.store:  # nothing recorded: keep only the current call's bookkeeping
            self.segments.clear()
        self.segments.append(_Segment(**fields))

    @property
    def step(self) -> int:
        """Index of the current UNet call within the current pipeline call (-1 before the first)."""
        return len(self.segments[-1].steps) - 1 if self.segments else -1

    @property
    def layouts(self) -> tuple[TokenLayout, ...] | None:
        """Token layouts of the current call's conditional rows (None when unknown)."""
        return self.segments[-1].layouts if self.segments else None

    def begin_step(self, batch: int, timestep: Any, latent_size: tuple[int, int]) -> None:
        """Called before every UNet forward: one UNet call is one recorded step."""
        if not self.segments:
            self.start_segment(cfg=self.default_cfg, layouts=self.default_layouts)
        segment = self.segments[-1]
        cfg = bool(segment.cfg)
        if cfg and batch % 2:
            raise RecordError(
                f"classifier-free guidance needs an even UNet batch ([uncond, cond]), got {batch}; "
                "trace a bare UNet with cfg=False when the batch holds only conditional rows"
            )
        rows = batch // 2 if cfg else batch
        if segment.n_images is None:
            segment.n_images = rows
        elif segment.n_images != rows:
            raise RecordError(
                f"UNet batch has {rows} conditional rows but this call recorded {segment.n_images} so far; "
                "call tr.reset() between batches of different size"
            )
        self.cond_rows = slice(batch - rows, batch)
        self.observed_rows = slice(0, batch) if (cfg and self.record_uncond) else self.cond_rows
        self.latent_size = latent_size
        segment.steps.append([None] * len(self.layer_names))
        if cfg and self.record_uncond:
            segment.uncond_steps.append([None] * len(self.layer_names))
        segment.timesteps.append(timestep.detach() if isinstance(timestep, torch.Tensor) else timestep)
        segment.record = None
        if self.editor is not None and len(segment.steps) == 1 and self.schedule_length is not None:
            length = self.schedule_length()
            if length:
                self.editor.check_schedule(length)

    @torch.no_grad()
    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Store the query-mean attention probabilities of the observed rows (no host sync).

        Runs without autograd: in a training forward the record must not keep the graph alive.
        """
        if not self.store or not self.segments or not self.segments[-1].steps:
            return
        segment = self.segments[-1]
        rows = self.observed_rows
        query = query[rows].float() * query.shape[-1] ** -0.5  # scale the (L, d) side, not (L, 77)
        logits = query @ key[rows].float().transpose(-1, -2)
        if mask is not None:
            logits = logits + mask[rows].float()
        probs = logits.softmax(dim=-1)
        mean = probs.mean(dim=2)
        step = len(segment.steps) - 1
        n_cond = self.cond_rows.stop - self.cond_rows.start
        segment.steps[step][layer] = mean[-n_cond:]
        if segment.uncond_steps:
            segment.uncond_steps[step][layer] = mean[:-n_cond]
        if (
            self.want_maps
            and (self.map_steps is None or step in self.map_steps)
            and (self.map_layers is None or layer in self.map_layers)
        ):
            segment.maps[(step, layer)] = probs[-n_cond:].detach()
            segment.map_sizes.setdefault(layer, _spatial_size(self.latent_size, probs.shape[2]))

    # ---- results ------------------------------------------------------------------------------
    def records(self) -> list[AttentionRecord]:
        return [self._finalize(s) for s in self.segments if s.steps]

    def _finalize(self, segment: _Segment) -> AttentionRecord:
        if segment.record is None:
            n_images = segment.n_images or 0
            layouts = segment.layouts
            if layouts is not None and len(layouts) != n_images:
                raise LayoutError(
                    f"{len(layouts)} token layouts for {n_images} conditional rows; pass one length or "
                    "layout per image"
                )
            segment.record = AttentionRecord(
                attention=self._stack(segment.steps, n_images),
                layer_names=self.layer_names,
                heads=self.heads,
                timesteps=torch.tensor([_as_float(t) for t in segment.timesteps], dtype=torch.float32),
                layouts=layouts,
                prompts=segment.prompts,
                images_per_prompt=segment.images_per_prompt,
                uncond_attention=self._stack(segment.uncond_steps, n_images)
                if segment.uncond_steps
                else None,
                uncond_layouts=segment.uncond_layouts,
                maps={k: v.float().cpu() for k, v in segment.maps.items()},
                map_sizes=dict(segment.map_sizes),
            )
        return segment.record

    def _stack(self, steps: list[list[torch.Tensor | None]], n_images: int) -> torch.Tensor:
        """``[step, layer, image, head, token]`` float32 on the CPU; one device→host copy at the end."""
        width = max(self.heads)
        tokens = next((t.shape[-1] for step in steps for t in step if t is not None), 0)
        device = next((t.device for step in steps for t in step if t is not None), torch.device("cpu"))
        blank = torch.full((n_images, width, tokens), float("nan"), device=device)
        stacked = []
        for step in steps:
            layers = []
            for layer in step:
                if layer is None:
                    layers.append(blank)
                elif layer.shape[1] < width:
                    layers.append(torch.cat([layer, blank[:, : width - layer.shape[1]]], dim=1))
                else:
                    layers.append(layer)
            stacked.append(torch.stack(layers))
        return torch.stack(stacked).float().cpu()


def _spatial_size(latent_size: tuple[int, int], n_queries: int) -> tuple[int, int]:
    """Height and width of a layer's query grid from the latent size and its query count."""
    height, width = latent_size
    if height * width == 0:
        return (n_queries, 1)
    factor = max(1, round(math.sqrt(height * width / n_queries)))
    size = (-(-height // factor), -(-width // factor))
    return size if size[0] * size[1] == n_queries else (n_queries, 1)


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() else float("nan")
    return float(value) if value is not None else float("nan")


class CrossAttentionProbe:
    """``attn2`` processor: diffusers' SDPA path for the output, plus query-mean probabilities.

    A plain object (not an ``nn.Module``) so it adds no parameters to the UNet (EMA stays aligned).
    """

    def __init__(self, recorder: Recorder, layer: int) -> None:
        self.recorder = recorder
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        recorder = self.recorder
        editor = recorder.editor
        if editor is not None and not editor.is_noop and editor.active(recorder.step, self.layer):
            key, bias = editor.apply(key, recorder.cond_rows, recorder.layouts, recorder.edit_rows)
            if bias is not None:
                attention_mask = merge_masks(bias, attention_mask)
        recorder.observe(self.layer, query, key, attention_mask)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class Trace:
    """Context manager that installs probes and restores the original processors on exit.

    Use :func:`trace` to build one. ``tr.record`` is the last pipeline call's :class:`AttentionRecord`,
    ``tr.records`` one per call made inside the block.
    """

    def __init__(
        self,
        target: Any,
        *,
        record_uncond: bool = False,
        map_steps: Sequence[int] | None = None,
        map_layers: Sequence[int | str] | None = None,
        lengths: Sequence[int] | None = None,
        layouts: Sequence[TokenLayout] | None = None,
        cfg: bool = False,
    ) -> None:
        self.pipeline, self.model = find_denoiser(target)
        layers = cross_attention_layers(self.model)
        self.layer_names = [name for name, _ in layers]
        self._modules = [module for _, module in layers]
        layer_indices = None
        if map_layers is not None:
            layer_indices = [self._resolve_layer(layer) for layer in map_layers]
        self.recorder = Recorder(
            self.layer_names,
            [module.heads for module in self._modules],
            record_uncond=record_uncond,
            map_steps=map_steps,
            map_layers=layer_indices,
        )
        if lengths is not None and layouts is not None:
            raise LayoutError("pass either lengths= or layouts=, not both")
        self.lengths = None if lengths is None else [int(n) for n in lengths]
        if layouts is not None:
            self.recorder.default_layouts = tuple(layouts)
        elif self.lengths is not None and self.pipeline is None:
            self.recorder.default_layouts = tuple(TokenLayout.from_length(n) for n in self.lengths)
        self.recorder.default_cfg = cfg
        self._originals: dict[str, Any] | None = None
        self._hook: Any = None
        self._wrapped_encode = False
        self._previous_encode: Callable[..., Any] | None = None
        self._host: Recorder | None = None  # set while recording through a mitigation's probes
        self._host_options: tuple = ()
        self._first_segment = 0
        self._segments: list[_Segment] | None = None  # an attached trace's segments, kept at exit

    def _resolve_layer(self, layer: int | str) -> int:
        return resolve_layer(self.layer_names, layer)

    # ---- install / restore --------------------------------------------------------------------
    def _installed_recorder(self) -> Recorder | None:
        """The recorder of memattn probes already on this model (a trace or a mitigation), if any."""
        for processor in self.model.attn_processors.values():
            if isinstance(processor, CrossAttentionProbe):
                return processor.recorder
        return None

    def __enter__(self) -> Trace:
        existing = self._installed_recorder()
        if existing is not None:
            if existing.store:
                raise RecordError(
                    "this model is already traced by an enclosing memattn.trace; nested traces are not "
                    "supported: read everything from the outer trace's records"
                )
            self._attach(existing)  # a mitigation owns the probes: record through them
            return self
        self._originals = dict(self.model.attn_processors)
        probes = {
            f"{name}.processor": CrossAttentionProbe(self.recorder, i)
            for i, name in enumerate(self.layer_names)
        }
        self.model.set_attn_processor({key: probes.get(key, proc) for key, proc in self._originals.items()})
        try:
            self._hook = self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)
            self._forward_signature = inspect.signature(self.model.forward)
            if self.pipeline is not None and callable(getattr(self.pipeline, "encode_prompt", None)):
                self._wrap_encode_prompt()
            if self.pipeline is not None and getattr(self.pipeline, "scheduler", None) is not None:
                scheduler = self.pipeline.scheduler
                self.recorder.schedule_length = lambda: _schedule_length(scheduler)
        except BaseException:
            self._restore()
            raise
        return self

    def _attach(self, host: Recorder) -> None:
        """Record through a mitigation's probes: same hooks, this trace's recording options."""
        mine = self.recorder
        self._host_options = (host.record_uncond, host.want_maps, host.map_steps, host.map_layers)
        host.record_uncond, host.want_maps = mine.record_uncond, mine.want_maps
        host.map_steps, host.map_layers = mine.map_steps, mine.map_layers
        host.store = True
        self._host = host
        self._first_segment = len(host.segments)
        self.recorder = host

    def __exit__(self, *exc: object) -> None:
        if self._host is not None:
            host, self._host = self._host, None
            self._segments = list(host.segments[self._first_segment :])
            host.store = False
            host.record_uncond, host.want_maps, host.map_steps, host.map_layers = self._host_options
            return
        self._restore()

    def _restore(self) -> None:
        try:
            if self._originals is not None:
                self.model.set_attn_processor(dict(self._originals))
                self._originals = None
        finally:
            self.recorder.schedule_length = None
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._wrapped_encode:
                if self._previous_encode is None:
                    del self.pipeline.encode_prompt
                else:  # an enclosing trace's wrapper
                    self.pipeline.encode_prompt = self._previous_encode
                self._wrapped_encode = False

    # ---- hooks --------------------------------------------------------------------------------
    def _on_model_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        sample = bound.get("sample", bound.get("hidden_states"))
        self.recorder.begin_step(int(sample.shape[0]), bound.get("timestep"), tuple(sample.shape[-2:]))

    def _wrap_encode_prompt(self) -> None:
        self._previous_encode = vars(self.pipeline).get("encode_prompt")
        original: Callable[..., Any] = self.pipeline.encode_prompt
        # Bind against the pipeline class's own method: a user's wrapper may hide the signature.
        signature = inspect.signature(type(self.pipeline).encode_prompt)
        tokenizers = [
            t
            for t in (getattr(self.pipeline, "tokenizer", None), getattr(self.pipeline, "tokenizer_2", None))
            if t is not None
        ]

        @functools.wraps(original)
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(self.pipeline, *args, **kwargs)
            except TypeError:
                arguments: dict[str, Any] = {}
            else:
                bound.apply_defaults()
                arguments = dict(bound.arguments)
            self._start_call(arguments, tokenizers)
            return original(*args, **kwargs)

        self.pipeline.encode_prompt = encode_prompt
        self._wrapped_encode = True

    def _start_call(self, arguments: dict[str, Any], tokenizers: list[Any]) -> None:
        prompt = arguments.get("prompt")
        per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        cfg = bool(
            arguments.get(
                "do_classifier_free_guidance", getattr(self.pipeline, "do_classifier_free_guidance", False)
            )
        )
        prompts = _as_list(prompt)
        if prompts is not None:
            layouts = pipeline_layouts(tokenizers, prompts, _as_list(arguments.get("prompt_2"), len(prompts)))
        else:
            embeds = arguments.get("prompt_embeds")
            count = int(embeds.shape[0]) if isinstance(embeds, torch.Tensor) else None
            layouts = None
            if self.lengths is not None:
                if count is not None and len(self.lengths) != count:
                    raise LayoutError(f"{len(self.lengths)} lengths given for {count} prompt embeddings")
                layouts = [TokenLayout.from_length(n) for n in self.lengths]
        uncond_layouts = None
        if (
            self.recorder.record_uncond
            and cfg
            and prompts is not None
            and arguments.get("negative_prompt_embeds") is None
        ):
            negatives = _as_list(arguments.get("negative_prompt") or "", len(prompts))
            uncond_layouts = _repeat(pipeline_layouts(tokenizers, negatives), per_prompt)
        self.recorder.start_segment(
            prompts=None if prompts is None else tuple(prompts),
            layouts=None if layouts is None else _repeat(layouts, per_prompt),
            uncond_layouts=uncond_layouts,
            images_per_prompt=per_prompt,
            cfg=cfg,
        )

    # ---- results ------------------------------------------------------------------------------
    @property
    def records(self) -> list[AttentionRecord]:
        if self._segments is not None:
            return [self.recorder._finalize(s) for s in self._segments if s.steps]
        if self._host is not None:
            segments = self.recorder.segments[self._first_segment :]
            return [self.recorder._finalize(s) for s in segments if s.steps]
        return self.recorder.records()

    @property
    def record(self) -> AttentionRecord:
        records = self.records
        if not records:
            raise RecordError("nothing was recorded: call the pipeline (or UNet) inside the `with` block")
        return records[-1]

    def reset(self) -> None:
        """Drop everything recorded so far (e.g. between training steps on a bare UNet)."""
        if self._host is not None:
            del self.recorder.segments[self._first_segment :]
        elif self._segments is not None:
            self._segments.clear()
        else:
            self.recorder.segments.clear()


def _schedule_length(scheduler: Any) -> int | None:
    """UNet calls the current pipeline call will make (set by ``set_timesteps`` before the first)."""
    timesteps = getattr(scheduler, "timesteps", None)
    return None if timesteps is None else len(timesteps)


def _as_list(value: Any, count: int | None = None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value] * (count or 1)
    values = list(value)
    if count is not None and len(values) == 1 and count > 1:
        values = values * count
    return values


def _repeat(layouts: Sequence[TokenLayout], times: int) -> tuple[TokenLayout, ...]:
    """diffusers repeats each prompt's rows ``num_images_per_prompt`` times consecutively."""
    return tuple(layout for layout in layouts for _ in range(times))


def trace(
    target: Any,
    *,
    record_uncond: bool = False,
    map_steps: Sequence[int] | None = None,
    map_layers: Sequence[int | str] | None = None,
    lengths: Sequence[int] | None = None,
    layouts: Sequence[TokenLayout] | None = None,
    cfg: bool = False,
) -> Trace:
    """Record cross-attention of a diffusers pipeline or bare UNet inside a ``with`` block.

    ``with memattn.trace(pipe) as tr: pipe(prompts)`` then read ``tr.record``.
    ``record_uncond`` also keeps the unconditional half; ``map_steps``/``map_layers`` keep full
    ``(image, head, query, token)`` maps for those steps/layers (off by default: they are large).
    ``lengths`` gives token counts (BOS and EOS included) per prompt when prompts come as
    ``prompt_embeds``; ``layouts``/``lengths`` and ``cfg`` describe the batch of a bare UNet, whose
    rows are all conditional unless ``cfg=True``.
    """
    return Trace(
        target,
        record_uncond=record_uncond,
        map_steps=map_steps,
        map_layers=map_layers,
        lengths=lengths,
        layouts=layouts,
        cfg=cfg,
    )


__all__ = ["AttentionRecord", "CrossAttentionProbe", "Recorder", "Trace", "cross_attention_layers", "trace"]
