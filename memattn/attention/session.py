"""One attention session per denoiser: memattn's probes installed once, listeners that read or edit.

The design is the prompt-to-prompt controller's: the processors (:class:`CrossAttentionProbe`) stay
dumb, and one object per denoiser knows where the run is (which pipeline call, which UNet call, which
batch rows are conditional, which token layout each row has). Everything memattn does to attention is
a :class:`Listener` added to that session: ``trace`` adds a recorder, ``mitigate`` adds an edit, the
guard adds a recorder for the first step and, for the flagged rows, an edit after it, and removes only
what it added.

- **Installing is ref-counted.** :meth:`AttentionSession.acquire` installs the probes, the UNet
  pre-hook and the pipeline's ``encode_prompt`` wrapper on the first use; :meth:`release` by the last
  user puts back exactly the processors and methods that were there.
- **Order.** At every layer call, editing listeners change the keys and mask in the order they were
  added, each on the previous one's result; then every reading listener sees the query, the edited
  keys and the final mask. A recorder inside or around a mitigation therefore records the attention
  the model used.
- **Batch description.** A pipeline call describes itself (its prompts, images per prompt and
  whether CFG doubled the batch: learnt from ``encode_prompt``). A bare UNet, or a pipeline called with
  ``prompt_embeds``, is described by the user (``lengths``/``layouts``/``cfg``); the outermost block
  that gives a description sets it, and an inner block that gives another one is refused.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from memattn.attention.joint import JointAttentionProbe
from memattn.attention.layers import cross_attention_layers, find_denoiser, is_joint
from memattn.attention.patch import Patch, call_arguments
from memattn.attention.processor import CrossAttentionProbe
from memattn.attention.tokens import TokenLayout, adds_bos, encode_spec, pipeline_layouts
from memattn.errors import LayoutError, MemattnError, RecordError


@dataclass(frozen=True)
class BatchDescription:
    """What the user says about a batch memattn cannot read off a pipeline call."""

    lengths: tuple[int, ...] | None = None  # token counts (BOS and EOS included) per prompt
    layouts: tuple[TokenLayout, ...] | None = None  # one per conditional row of a bare UNet
    cfg: bool = False  # a bare UNet's batch is [uncond, cond]

    def __post_init__(self) -> None:
        if self.lengths is not None and self.layouts is not None:
            raise LayoutError("pass either lengths= or layouts=, not both")

    @classmethod
    def of(
        cls,
        lengths: Sequence[int] | None = None,
        layouts: Sequence[TokenLayout] | None = None,
        cfg: bool = False,
    ) -> BatchDescription:
        return cls(
            lengths=None if lengths is None else tuple(int(n) for n in lengths),
            layouts=None if layouts is None else tuple(layouts),
            cfg=bool(cfg),
        )

    @property
    def given(self) -> bool:
        return self.lengths is not None or self.layouts is not None or self.cfg

    def bare_layouts(self) -> tuple[TokenLayout, ...] | None:
        if self.layouts is not None:
            return self.layouts
        if self.lengths is not None:
            return tuple(TokenLayout.from_length(n) for n in self.lengths)
        return None


@dataclass
class Call:
    """One pipeline call, or on a bare UNet everything until the batch changes meaning (a reset)."""

    index: int
    prompts: tuple[str, ...] | None = None
    layouts: tuple[TokenLayout, ...] | None = None
    images_per_prompt: int = 1
    cfg: bool = False
    bare: bool = False
    n_images: int | None = None
    steps: int = 0  # UNet calls made so far
    _uncond: Callable[[], tuple[TokenLayout, ...] | None] | None = field(default=None, repr=False)
    _uncond_done: bool = field(default=False, repr=False)
    _uncond_value: tuple[TokenLayout, ...] | None = field(default=None, repr=False)

    @property
    def uncond_layouts(self) -> tuple[TokenLayout, ...] | None:
        """Layouts of the unconditional rows (negative prompts), tokenised only when a listener asks."""
        if not self._uncond_done:
            self._uncond_value = self._uncond() if self._uncond is not None else None
            self._uncond_done = True
        return self._uncond_value


class Listener:
    """Something that reads or edits attention through a session. Override what you need.

    ``edits`` declares whether :meth:`edit` changes anything (the probes skip the edit hook when no
    listener edits, and the read hook when none reads). ``role`` names the kind of block that added it
    (``"trace"``, ``"mitigate"``, ``"guard"``): the public blocks refuse to nest in themselves.
    """

    edits: bool = False
    reads: bool = False
    reads_share: bool = False  # wants the text share of joint-attention layers (SD3; one more kernel call)
    role: str = ""

    def on_step(self, session: AttentionSession) -> None:
        """A UNet call begins: ``session.call``, ``session.step``, ``session.cond_rows`` are set."""

    def edit(
        self,
        session: AttentionSession,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Change the text keys and additive mask of one layer call (``query``: its image queries)."""
        return key, mask

    def observe(
        self,
        session: AttentionSession,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        """Read one layer call (query, the keys after every edit, the final additive mask)."""

    def observe_share(self, session: AttentionSession, layer: int, share: torch.Tensor) -> None:
        """Read a joint layer's ``(batch, heads)`` share of the image queries' softmax on text keys."""


_SESSIONS: weakref.WeakKeyDictionary[torch.nn.Module, AttentionSession] = weakref.WeakKeyDictionary()


class AttentionSession:
    """The probes on one denoiser and the state of the run they see; build with :meth:`acquire`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        layers = cross_attention_layers(model)
        self.layer_names = tuple(name for name, _ in layers)
        self.heads = tuple(module.heads for _, module in layers)
        self.joint = tuple(is_joint(module) for _, module in layers)
        self.pipeline: Any = None
        self.listeners: list[Listener] = []
        self.editors: tuple[Listener, ...] = ()
        self.readers: tuple[Listener, ...] = ()
        self.share_readers: tuple[Listener, ...] = ()
        self.call: Call | None = None
        self.step = -1  # index of the current UNet call within the current call
        self.timestep: Any = None
        self.batch = 0
        self.cond_rows = slice(0, 0)
        self.latent_size: tuple[int, int] = (0, 0)
        self.text_mask: torch.Tensor | None = None  # the denoiser call's encoder_attention_mask
        self._calls = 0
        self._users = 0
        self._descriptions: list[BatchDescription] = []
        self._originals: dict[str, Any] | None = None
        self._hook: Any = None
        self._patches: list[Patch] = []
        self._forward_signature: inspect.Signature | None = None
        self._tokenizers: list[Any] = []
        self._tail_tokenizer: Any = None  # SD3's T5 (tokenizer_3): its sequence follows the CLIP one

    # ---- lifetime -----------------------------------------------------------------------------
    @staticmethod
    def active(target: Any) -> AttentionSession | None:
        """The session installed on ``target``'s denoiser, if any."""
        _, model = find_denoiser(target)
        return _SESSIONS.get(model)

    @classmethod
    def acquire(cls, target: Any, batch: BatchDescription | None = None) -> AttentionSession:
        """The session of ``target``'s denoiser, installed on first use; pair with :meth:`release`."""
        pipeline, model = find_denoiser(target)
        session = _SESSIONS.get(model)
        if session is None:
            session = cls(model)
            session._install()
            _SESSIONS[model] = session
        try:
            if pipeline is not None:
                session._attach_pipeline(pipeline)
            if batch is not None and batch.given:
                current = session.description
                if current.given and current != batch:
                    raise LayoutError(
                        f"an enclosing memattn block already describes this batch ({_describe(current)}); "
                        f"this one says {_describe(batch)}: describe it once, in the outer block"
                    )
                session._descriptions.append(batch)
        except BaseException:
            if session._users == 0:
                session._uninstall()
            raise
        session._users += 1
        return session

    def release(self, batch: BatchDescription | None = None) -> None:
        """One user is done; the last one restores the model and pipeline exactly."""
        if batch is not None:
            for i, known in enumerate(self._descriptions):
                if known is batch:
                    del self._descriptions[i]
                    break
        self._users -= 1
        if self._users <= 0:
            self._uninstall()

    @property
    def description(self) -> BatchDescription:
        """The batch description in force: the outermost one given."""
        return self._descriptions[0] if self._descriptions else BatchDescription()

    def _install(self) -> None:
        self._originals = dict(self.model.attn_processors)
        probes = {
            f"{name}.processor": (JointAttentionProbe if joint else CrossAttentionProbe)(self, i)
            for i, (name, joint) in enumerate(zip(self.layer_names, self.joint, strict=True))
        }
        self.model.set_attn_processor({key: probes.get(key, proc) for key, proc in self._originals.items()})
        try:
            self._forward_signature = inspect.signature(self.model.forward)
            self._hook = self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)
        except BaseException:
            self._uninstall()
            raise

    def _uninstall(self) -> None:
        try:
            if self._originals is not None:
                self.model.set_attn_processor(dict(self._originals))
                self._originals = None
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            for patch in reversed(self._patches):
                patch.restore()
            self._patches.clear()
            if _SESSIONS.get(self.model) is self:
                del _SESSIONS[self.model]

    def _attach_pipeline(self, pipeline: Any) -> None:
        if self.pipeline is pipeline:
            return
        if self.pipeline is not None:
            raise MemattnError(
                "this denoiser is already read through another pipeline object; use one pipeline per "
                "memattn block, or exit the enclosing block first"
            )
        self.pipeline = pipeline
        self._tokenizers = [
            t for t in (getattr(pipeline, "tokenizer", None), getattr(pipeline, "tokenizer_2", None)) if t
        ]
        if any(self.joint):
            self._tail_tokenizer = getattr(pipeline, "tokenizer_3", None)
            if self._tail_tokenizer is None or getattr(pipeline, "text_encoder_3", None) is None:
                raise LayoutError(
                    f"{type(pipeline).__name__} has no T5 encoder (tokenizer_3/text_encoder_3 is None): its "
                    "text then ends in zero vectors that memattn does not describe yet; load the pipeline "
                    "with its T5 encoder"
                )
        if callable(getattr(pipeline, "encode_prompt", None)):

            def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
                def encode_prompt(*args: Any, **kwargs: Any) -> Any:
                    self._start_call(call_arguments(pipeline, "encode_prompt", args, kwargs))
                    return original(*args, **kwargs)

                return encode_prompt

            self._patches.append(Patch(pipeline, "encode_prompt", wrap))

    # ---- listeners ----------------------------------------------------------------------------
    def add(self, listener: Listener) -> None:
        self.listeners.append(listener)
        self._sort()

    def remove(self, listener: Listener) -> None:
        """Remove exactly this listener (by identity); a listener that is not there is ignored."""
        self.listeners = [known for known in self.listeners if known is not listener]
        self._sort()

    def has(self, role: str) -> bool:
        return any(listener.role == role for listener in self.listeners)

    def _sort(self) -> None:
        self.editors = tuple(listener for listener in self.listeners if listener.edits)
        self.readers = tuple(listener for listener in self.listeners if listener.reads)
        self.share_readers = tuple(listener for listener in self.listeners if listener.reads_share)

    # ---- the run ------------------------------------------------------------------------------
    def restart_bare_call(self) -> None:
        """On a bare UNet, the next UNet call starts a new call (a batch of another size may follow)."""
        if self.call is not None and self.call.bare:
            self.call = None

    def schedule_length(self) -> int | None:
        """UNet calls the current pipeline call will make (set by ``set_timesteps`` before the first)."""
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        return None if timesteps is None else len(timesteps)

    def _start_call(self, arguments: dict[str, Any]) -> None:
        pipeline = self.pipeline
        per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        cfg = bool(
            arguments.get(
                "do_classifier_free_guidance", getattr(pipeline, "do_classifier_free_guidance", False)
            )
        )
        prompts = _as_list(arguments.get("prompt"))
        uncond: Callable[[], tuple[TokenLayout, ...] | None] | None = None
        if prompts is not None:
            spec = encode_spec(pipeline, arguments)  # the length and mask of this very call
            tail = self._tail_tokenizer
            layouts = pipeline_layouts(
                self._tokenizers,
                prompts,
                _as_list(arguments.get("prompt_2"), len(prompts)),
                spec=spec,
                tail_tokenizer=tail,
                prompts_3=_as_list(arguments.get("prompt_3"), len(prompts)),
            )
            if cfg and arguments.get("negative_prompt_embeds") is None:
                negatives = _as_list(arguments.get("negative_prompt") or "", len(prompts))
                negatives_2 = _as_list(arguments.get("negative_prompt_2"), len(prompts))
                negatives_3 = _as_list(arguments.get("negative_prompt_3"), len(prompts))

                def uncond() -> tuple[TokenLayout, ...]:
                    negative = pipeline_layouts(
                        self._tokenizers,
                        negatives,
                        negatives_2,
                        spec=spec,
                        tail_tokenizer=tail,
                        prompts_3=negatives_3,
                    )
                    return _repeat(negative, per_prompt)
        else:
            embeds = arguments.get("prompt_embeds")
            count = int(embeds.shape[0]) if isinstance(embeds, torch.Tensor) else None
            layouts = None
            given = self.description.bare_layouts()  # lengths= or layouts= (SD3: CLIP with a T5 tail)
            if given is not None:
                if count is not None and len(given) != count:
                    what = "lengths" if self.description.lengths is not None else "layouts"
                    raise LayoutError(f"{len(given)} {what} given for {count} prompt embeddings")
                layouts = list(given)
            elif isinstance(arguments.get("prompt_attention_mask"), torch.Tensor) and self._tokenizers:
                # PixArt with prompt_embeds: the mask says which positions are words + EOS
                bos = adds_bos(self._tokenizers[0])
                rows = arguments["prompt_attention_mask"].tolist()  # once per call, before the denoiser
                layouts = [TokenLayout.from_mask(row, bos=bos) for row in rows]
        self._calls += 1
        self.call = Call(
            index=self._calls,
            prompts=None if prompts is None else tuple(prompts),
            layouts=None if layouts is None else _repeat(layouts, per_prompt),
            images_per_prompt=per_prompt,
            cfg=cfg,
            _uncond=uncond,
        )
        self.step = -1

    def _on_model_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        assert self._forward_signature is not None
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        sample = bound.get("sample", bound.get("hidden_states"))
        # PixArt: the (batch, tokens) 0/1 mask (or additive bias) that hides the padding in attn2
        self.text_mask = bound.get("encoder_attention_mask")
        self.begin_step(int(sample.shape[0]), bound.get("timestep"), tuple(sample.shape[-2:]))

    def begin_step(self, batch: int, timestep: Any, latent_size: tuple[int, int]) -> None:
        """Called before every denoiser forward (UNet or PixArt transformer): one call is one step."""
        if self.call is None:
            description = self.description
            self._calls += 1
            self.call = Call(
                index=self._calls, layouts=description.bare_layouts(), cfg=description.cfg, bare=True
            )
            self.step = -1
        call = self.call
        if call.cfg and batch % 2:
            raise RecordError(
                f"classifier-free guidance needs an even UNet batch ([uncond, cond]), got {batch}; "
                "trace a bare UNet with cfg=False when the batch holds only conditional rows"
            )
        rows = batch // 2 if call.cfg else batch
        if call.n_images is None:
            call.n_images = rows
        elif call.n_images != rows:
            raise RecordError(
                f"UNet batch has {rows} conditional rows but this call recorded {call.n_images} so far; "
                "call tr.reset() between batches of different size"
            )
        call.steps += 1
        self.step = call.steps - 1
        self.batch = batch
        self.cond_rows = slice(batch - rows, batch)
        self.latent_size = latent_size
        self.timestep = timestep.detach() if isinstance(timestep, torch.Tensor) else timestep
        for listener in list(self.listeners):
            listener.on_step(self)

    def edit(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for listener in self.editors:
            key, mask = listener.edit(self, layer, query, key, mask)
        return key, mask

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        for listener in self.readers:
            listener.observe(self, layer, query, key, mask)

    def observe_share(self, layer: int, share: torch.Tensor) -> None:
        for listener in self.share_readers:
            listener.observe_share(self, layer, share)


def _describe(batch: BatchDescription) -> str:
    parts = []
    if batch.lengths is not None:
        parts.append(f"lengths {list(batch.lengths)}")
    if batch.layouts is not None:
        parts.append(f"{len(batch.layouts)} layouts")
    parts.append(f"cfg={batch.cfg}")
    return ", ".join(parts)


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
