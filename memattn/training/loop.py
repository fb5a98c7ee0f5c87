"""Fine-tune a text-to-image UNet with a training-time memorization mitigation (``memattn finetune``).

The loop has the shape of diffusers' ``examples/text_to_image/train_text_to_image.py``: accelerate
(mixed precision, gradient accumulation, multi-GPU under ``accelerate launch``), frozen text encoder
and VAE, AdamW + a diffusers LR schedule, optional EMA, ``--resume-from-checkpoint latest``, and a
final pipeline saved with ``save_pretrained`` (safetensors). What it adds:

- ``--mitigation none|entropy|noise-norm|caption-aug`` (:mod:`memattn.training.filters`): the keep-mask
  multiplies the per-sample MSE. The entropy rule reads the probe installed on the UNet during the
  training forward (no extra UNet call); noise-norm costs one extra no-grad unconditional pass.
- A per-step JSONL log (``OUTPUT/log.jsonl``): loss, kept/dropped counts, the sample ids of the step
  and which were dropped, the timesteps and the filter's scores, so precision/recall against known
  duplicates can be computed afterwards.
- Reproducibility: every micro-batch draws its rows, caption dropout, noise and timesteps from a
  generator seeded by ``(seed, step, micro-step, process)``; nothing else is random, so a run killed
  and resumed from a checkpoint takes exactly the uninterrupted run's steps (bit-exact on CPU) and no
  RNG state needs saving. ``memattn testbed train`` is this loop with the testbed's recipe
  (:mod:`memattn.testbed.train`); it still trains, bit for bit, what the testbed's former trainer
  trained (tests/test_testbed_train.py).
- Checkpoints (``OUTPUT/checkpoints/step-NNNNNNN``): UNet, EMA and optimizer as safetensors plus a
  JSON state (step, recipe, LR schedule, filter windows, file sizes), written to a dot-named temporary
  directory, fsynced and renamed into place: a crash never leaves a half-written checkpoint that
  ``latest`` would pick. Missing, truncated or foreign checkpoints are one-line errors.

:func:`memattn.training.run.finetune` drives it (resume point, progress bar, Ctrl-C).

Data: ``testbed`` (the testbed dataset the base model's manifest describes; sample ids are item ids,
so the known duplicates are the memorized groups) or a directory of images with ``captions.jsonl``
(or diffusers' ``metadata.jsonl``): one ``{"file_name": ..., "text": ...}`` per line.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memattn.attention.layers import parse_layers
from memattn.errors import MemattnError
from memattn.training.checkpoints import (
    corrupt_checkpoint,
    flatten_optimizer,
    fsync_path,
    unflatten_optimizer,
)
from memattn.training.config import (
    CHECKPOINT_FORMAT,
    CHECKPOINTS,
    PASS_STREAM,
    PIPELINE,
    POSITION_KEYS,
    RANDOM_DROP_STREAM,
    RUN_FILE,
    TEXT_CACHE_BYTES,
    FinetuneConfig,
    saved_recipe,
)
from memattn.training.data import load_folder_data, load_testbed_data
from memattn.training.filters import (
    CaptionAugmenter,
    EntropyFilter,
    NoiseNormFilter,
    masked_loss,
    per_sample_mse,
)

# ---- the loop ----------------------------------------------------------------------------------------


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def _fresh_accelerate_state() -> None:
    """accelerate keeps one state per process; let a single-process caller (the benchmark, tests) run
    several configs in turn, e.g. fp32 then bf16. Under ``accelerate launch`` the state is left alone."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if AcceleratorState._shared_state and PartialState._shared_state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


class Finetuner:
    """Networks, optimizer, data and filters of one run; ``with Finetuner(config) as ft: ft.train_step()``.

    Entering installs the attention probe on the UNet when the entropy rule (or monitoring) needs it;
    leaving restores the UNet's processors. Export after leaving.
    """

    def __init__(
        self, config: FinetuneConfig, *, on_checkpoint: Callable[[Finetuner], dict] | None = None
    ) -> None:
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        from memattn.loading import load_pipeline, resolve_model

        self.config = config
        self.out = Path(config.output_dir)
        _fresh_accelerate_state()
        try:
            self.accelerator = Accelerator(
                mixed_precision=config.mixed_precision,
                gradient_accumulation_steps=config.gradient_accumulation_steps,
            )
        except (ValueError, RuntimeError) as error:
            raise MemattnError(f"accelerate refused the setup: {error}") from None
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and self.accelerator.num_processes == 1:  # each would write the same run alone
            raise MemattnError(
                f"launched as {launched} processes but accelerate runs {self.accelerator.num_processes}: "
                "without GPUs set ACCELERATE_USE_CPU=1 (gloo), e.g. `ACCELERATE_USE_CPU=1 torchrun "
                "--nproc_per_node N -m memattn.cli.finetune finetune ...`, or use `accelerate launch`"
            )
        device = self.accelerator.device
        self.weight_dtype = _weight_dtype(config.mixed_precision)
        self.base = Path(resolve_model(config.model))
        pipe = load_pipeline(config.model, progress_bar=False)
        self.pipe = pipe
        if getattr(pipe, "unet", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise MemattnError(
                f"{config.model} has no unet/tokenizer: memattn finetune needs a UNet pipeline"
            )
        self.tokenizer = pipe.tokenizer
        self.text_encoder = self._frozen(pipe.text_encoder, device)
        self.pixel_space = bool(getattr(pipe.vae, "pixel_space", False))  # images are their own latents
        self.vae = None if self.pixel_space else self._frozen(pipe.vae, device)
        self.noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_schedule.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise MemattnError(f"prediction type {self.prediction_type!r} is not supported (epsilon, v)")
        if config.data == "testbed":
            self.data = load_testbed_data(self.base)
        else:
            resolution = config.resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
            self.data = load_folder_data(Path(config.data), resolution)
        unet = pipe.unet if pipe.unet.dtype == torch.float32 else pipe.unet.float()  # trained in fp32
        unet = unet.to(device).train().requires_grad_(True)
        self.ema = copy.deepcopy(unet).eval().requires_grad_(False) if config.use_ema else None
        optimizer = torch.optim.AdamW(
            unet.parameters(),
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )
        processes = self.accelerator.num_processes
        try:
            lr_scheduler = get_scheduler(
                config.lr_scheduler,
                optimizer=optimizer,
                num_warmup_steps=config.lr_warmup_steps * processes,
                num_training_steps=config.max_train_steps * processes,
            )
        except ValueError as error:
            raise MemattnError(f"--lr-scheduler {config.lr_scheduler!r}: {error}") from None
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, lr_scheduler)
        self.model = self.accelerator.unwrap_model(self.unet)
        self._encode_captions()
        self._build_mitigation()
        self.step = 0
        self._trace: Any = None
        self._pass_orders: dict[int, torch.Tensor] = {}  # sampling="epochs": the current passes' orders
        # ``on_checkpoint(tuner)`` adds one entry per checkpoint (the testbed's sink probe); the list is
        # saved with each checkpoint, restored on resume and exported with the run.
        self.on_checkpoint = on_checkpoint
        self.checkpoint_log: list[dict] = []

    def _frozen(self, module: torch.nn.Module | None, device: torch.device) -> Any:
        if module is None:
            return None
        if module.dtype != self.weight_dtype:  # the exported pipeline keeps the base's own weights
            module = copy.deepcopy(module).to(dtype=self.weight_dtype)
        return module.requires_grad_(False).eval().to(device)

    # ---- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Text-encoder states of captions, float32 on the device (pipeline tokenization, 77 tokens)."""
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.accelerator.device)
        return self.text_encoder(ids)[0].float()

    def _encode_captions(self) -> None:
        self.empty = self.encode([""])
        per_caption = self.empty[0].numel() * 4
        self.embeddings: torch.Tensor | None = None
        if per_caption * len(self.data.captions) <= TEXT_CACHE_BYTES:
            captions = self.data.captions
            self.embeddings = torch.cat(
                [self.encode(captions[i : i + 256]) for i in range(0, len(captions), 256)]
            )

    def _context(self, rows: torch.Tensor, drop: torch.Tensor, key: int) -> tuple[torch.Tensor, list[bool]]:
        index = [self.data.caption_of_row[int(r)] for r in rows]
        if self.embeddings is not None:
            context = self.embeddings[torch.tensor(index, device=self.embeddings.device)].clone()
        else:
            context = self.encode([self.data.captions[i] for i in index])
        augmented = [False] * len(index)
        if self.augmenter is not None:
            captions, augmented = self.augmenter([self.data.captions[i] for i in index], key)
            changed = [i for i, a in enumerate(augmented) if a and not bool(drop[i])]
            if changed:
                context[changed] = self.encode([captions[i] for i in changed])
            augmented = [a and not bool(d) for a, d in zip(augmented, drop.tolist(), strict=True)]
        context[drop.to(context.device)] = self.empty
        return context, augmented

    # ---- mitigation ---------------------------------------------------------------------------
    def _build_mitigation(self) -> None:
        m = self.config.mitigation
        timesteps = int(self.noise_schedule.config.num_train_timesteps)
        common = dict(
            z=m.z,
            drop=m.drop,
            window=m.window,
            timestep_bins=m.timestep_bins,
            num_train_timesteps=timesteps,
            min_samples=m.min_samples,
        )
        self.entropy_filter: EntropyFilter | None = None
        self.noise_filter: NoiseNormFilter | None = None
        self.augmenter: CaptionAugmenter | None = None
        if m.kind == "entropy":
            self.entropy_filter = EntropyFilter(
                m.rule or "zscore", threshold=m.threshold, layers=parse_layers(m.layers), **common
            )
        elif m.monitor:
            self.entropy_filter = EntropyFilter("zscore", layers=parse_layers(m.layers))
        if m.kind == "noise-norm":
            self.noise_filter = NoiseNormFilter(
                self.model, m.rule or "zscore", threshold=m.threshold, **common
            )
        elif m.monitor:
            self.noise_filter = NoiseNormFilter(self.model)
        if m.kind == "caption-aug":
            self.augmenter = CaptionAugmenter(
                self.tokenizer, m.caption_aug_prob, m.caption_aug_tokens, seed=self.config.seed
            )

    @property
    def _active_filter(self) -> EntropyFilter | NoiseNormFilter | None:
        """The filter whose rule decides the keep-mask (a monitor-only filter just logs its scores)."""
        filters = {"entropy": self.entropy_filter, "noise-norm": self.noise_filter}
        return filters.get(self.config.mitigation.kind)

    def _filters_state(self) -> dict[str, Any]:
        active = self._active_filter
        return active.state_dict() if active is not None else {}

    def _load_filters_state(self, state: dict[str, Any]) -> None:
        active = self._active_filter
        if active is not None:
            active.load_state_dict(state)

    def __enter__(self) -> Finetuner:
        if self.entropy_filter is not None:
            import memattn

            self._trace = memattn.trace(self.model, cfg=False)
            self._trace.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._trace is not None:
            self._trace.__exit__(*exc)
            self._trace = None

    def _gathered(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.accelerator.num_processes == 1:
            return list(tensors)
        return [self.accelerator.gather(t.contiguous()) for t in tensors]

    def _decide(
        self,
        prediction: torch.Tensor,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        eligible: torch.Tensor,
        key: int,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        signals: dict[str, Any] = {}
        if self.entropy_filter is not None:
            if self._trace is None:
                raise MemattnError("the entropy rule reads the probe: use the Finetuner inside `with`")
            record = self._trace.record
            signals["entropy"] = self.entropy_filter.scores(record)
            if self.config.mitigation.monitor:
                signals["layer_entropy"] = self.entropy_filter.layer_scores(record)
        if self.noise_filter is not None:
            signals["noise_norm"] = self.noise_filter.scores(noisy, timesteps, prediction, self.empty)
        kind = self.config.mitigation.kind
        keep = torch.ones(len(prediction), dtype=torch.bool)
        if kind == "random-drop":  # its own stream: the batch's draws are the same as in `none`
            coin = torch.Generator().manual_seed(key * 2_654_435_761 % (1 << 62) + RANDOM_DROP_STREAM)
            dropped = torch.rand(len(prediction), generator=coin) < self.config.mitigation.drop_prob
            keep = ~(dropped & eligible.cpu())
        active = self._active_filter
        if active is not None:
            scores = signals[active.signal].float().to(timesteps.device)
            population = None
            pop_t = None
            if self.accelerator.num_processes > 1:
                all_scores, all_eligible, all_t = self._gathered(
                    scores, eligible.to(scores.device), timesteps
                )
                population, pop_t = all_scores[all_eligible], all_t[all_eligible]
            keep = active.rule.decide(
                scores.cpu(),
                timesteps.cpu(),
                eligible.cpu(),
                population=population,
                population_timesteps=pop_t,
            )
        return keep, signals

    # ---- one optimizer step -------------------------------------------------------------------
    def _key(self, micro: int) -> int:
        index = self.accelerator.process_index * self.config.gradient_accumulation_steps + micro
        return self.config.seed * 1_000_003 + self.step + index * 1_000_000_007

    def _pass_order(self, index: int) -> torch.Tensor:
        """The seeded permutation of pass ``index`` (sampling="epochs"); the last two are kept."""
        if index not in self._pass_orders:
            rng = np.random.default_rng((self.config.seed, PASS_STREAM, index))
            order = torch.from_numpy(rng.permutation(len(self.data)))
            self._pass_orders = {k: v for k, v in self._pass_orders.items() if k == index - 1}
            self._pass_orders[index] = order
        return self._pass_orders[index]

    def _batch_rows(self, micro: int, generator: torch.Generator) -> torch.Tensor:
        """This micro-batch's rows: uniform draws, or the next slice of the seeded passes (every process
        and micro-step takes its own slice, in a fixed order, so a resumed run takes the same rows)."""
        cfg, n = self.config, self.config.train_batch_size
        if cfg.sampling == "uniform":
            return torch.randint(len(self.data), (n,), generator=generator)
        acc = self.accelerator
        index = (self.step * cfg.gradient_accumulation_steps + micro) * acc.num_processes + acc.process_index
        size = len(self.data)
        return torch.stack([self._pass_order(p // size)[p % size] for p in range(index * n, (index + 1) * n)])

    def _latents(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        device = self.accelerator.device
        if self.pixel_space:
            return images.to(device)
        with torch.no_grad():
            dist = self.vae.encode(images.to(device, self.weight_dtype)).latent_dist
            sample = dist.sample(generator=generator).float()
        return sample * float(self.vae.config.scaling_factor)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches); returns its log entry."""
        cfg, acc = self.config, self.accelerator
        device = acc.device
        started = time.perf_counter()
        entry: dict[str, Any] = {
            "ids": [],
            "dropped_ids": [],
            "dropped_at": [],
            "timesteps": [],
            "no_caption": [],
            "augmented": [],
        }
        losses, signal_rows = [], {}
        for micro in range(cfg.gradient_accumulation_steps):
            key = self._key(micro)
            generator = torch.Generator().manual_seed(key)
            torch.manual_seed(key)  # anything else random in the model (dropout) follows the step too
            n = cfg.train_batch_size
            rows = self._batch_rows(micro, generator)
            images = self.data.images(rows)
            if cfg.random_flip:
                flip = torch.rand(n, generator=generator) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            clean = self._latents(images, generator)
            drop = torch.rand(n, generator=generator) < cfg.caption_dropout
            context, augmented = self._context(rows, drop, key)
            noise = torch.randn(clean.shape, generator=generator).to(device)
            timesteps = torch.randint(
                0, int(self.noise_schedule.config.num_train_timesteps), (n,), generator=generator
            ).to(device)
            noisy = self.noise_schedule.add_noise(clean, noise, timesteps)
            with acc.accumulate(self.unet):
                if self._trace is not None:
                    self._trace.reset()
                prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
                target = (
                    noise
                    if self.prediction_type == "epsilon"
                    else self.noise_schedule.get_velocity(clean, noise, timesteps)
                )
                keep, signals = self._decide(prediction, noisy, timesteps, ~drop, key)
                if bool(keep.all()):  # exactly diffusers' loss when nothing is dropped
                    loss = F.mse_loss(prediction.float(), target.float())
                else:
                    loss = masked_loss(per_sample_mse(prediction, target), keep.to(prediction.device))
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.unet.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            ids = [self.data.ids[int(r)] for r in rows]
            offset = len(entry["ids"])
            entry["ids"] += ids
            entry["dropped_ids"] += [i for i, k in zip(ids, keep.tolist(), strict=True) if not k]
            entry["dropped_at"] += [offset + i for i, k in enumerate(keep.tolist()) if not k]
            entry["timesteps"] += timesteps.tolist()
            entry["no_caption"] += [offset + i for i, d in enumerate(drop.tolist()) if d]
            entry["augmented"] += [offset + i for i, a in enumerate(augmented) if a]
            for name, values in signals.items():
                signal_rows.setdefault(name, []).extend(values.tolist())
        if not acc.sync_gradients:  # cannot happen: micro-steps always complete an accumulation
            raise MemattnError("gradient accumulation fell out of step with the optimizer")
        self.step += 1
        if self.ema is not None:
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        entry = self._gather_entry({**entry, **signal_rows})
        loss_value = sum(losses) / len(losses)
        if acc.num_processes > 1:
            loss_value = float(acc.gather(torch.tensor([loss_value], device=device)).mean())
        return {
            "step": self.step,
            "loss": loss_value,
            "lr": float(self.lr_scheduler.get_last_lr()[0]),
            "seconds": round(time.perf_counter() - started, 6),
            "threads": torch.get_num_threads(),  # CPU results are bit-exact only at one thread count
            "n": len(entry["ids"]),
            "kept": len(entry["ids"]) - len(entry["dropped_ids"]),
            "dropped": len(entry["dropped_ids"]),
            **entry,
        }

    def _gather_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        if self.accelerator.num_processes == 1:
            return entry
        from accelerate.utils import gather_object

        shift = self.accelerator.process_index * len(entry["ids"])  # positions index the gathered ids
        for key in POSITION_KEYS:
            entry[key] = [shift + i for i in entry[key]]
        return {key: gather_object(values) for key, values in entry.items()}

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step-N`` atomically (main process); returns it."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        root = self.out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:07d}"
        partial = root / f".partial-{self.step:07d}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        tensors, groups = flatten_optimizer(self.optimizer.state_dict())
        files = {"unet.safetensors": self.model.state_dict(), "optimizer.safetensors": tensors}
        if self.ema is not None:
            files["ema.safetensors"] = self.ema.state_dict()
        for name, state in files.items():
            save_file({k: v.detach().contiguous() for k, v in state.items()}, partial / name)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config.recipe(),
            "param_groups": groups,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "filter": self._filters_state(),
            "checkpoint_log": self._checkpoint_log_now(),
            "torch_threads": torch.get_num_threads(),
            "files": {name: (partial / name).stat().st_size for name in files},
        }
        (partial / "state.json").write_text(json.dumps(state))
        for path in partial.iterdir():
            fsync_path(path)
        fsync_path(partial)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        fsync_path(root)
        self._prune(root)
        return final

    def _checkpoint_log_now(self) -> list[dict]:
        if self.on_checkpoint is not None and not any(e["step"] == self.step for e in self.checkpoint_log):
            self.checkpoint_log.append({"step": self.step, **self.on_checkpoint(self)})
        return self.checkpoint_log

    def _prune(self, root: Path) -> None:
        limit = self.config.checkpoints_total_limit
        if limit is None:
            return
        complete = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
        for old in complete[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, LR schedule, filter windows and step; clear errors otherwise."""
        path = Path(path)
        if not path.is_dir():
            raise MemattnError(
                f"checkpoint {path} does not exist; pass a checkpoints/step-N directory or 'latest'"
            )
        try:
            state = json.loads((path / "state.json").read_text())
        except FileNotFoundError:
            raise corrupt_checkpoint(path, "state.json is missing: it was never completed") from None
        except (OSError, ValueError) as error:
            raise corrupt_checkpoint(path, f"state.json is unreadable: {error}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise corrupt_checkpoint(path, "state.json is not a memattn finetune checkpoint of this version")
        theirs = saved_recipe(state.get("config") or {})
        if theirs != self.config.recipe():
            mine = self.config.recipe()
            differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise MemattnError(
                f"checkpoint {path} was written by a different recipe (differs in: {', '.join(differ)}); "
                "resume with the same options or use a new --output-dir"
            )
        for name, size in state.get("files", {}).items():
            file = path / name
            if not file.is_file():
                raise corrupt_checkpoint(path, f"{name} is missing")
            if file.stat().st_size != size:
                raise corrupt_checkpoint(path, f"{name} has {file.stat().st_size} bytes, {size} were written")
        try:
            self.model.load_state_dict(load_file(path / "unet.safetensors"))
            if self.ema is not None:
                self.ema.load_state_dict(load_file(path / "ema.safetensors"))
            self.optimizer.load_state_dict(
                unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["param_groups"])
            )
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self._load_filters_state(state.get("filter", {}))
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
            raise corrupt_checkpoint(path, f"{type(error).__name__}: {str(error)[:160]}") from None
        self.step = int(state["step"])
        self.checkpoint_log = list(state.get("checkpoint_log", []))
        self.checkpoint_threads: int | None = state.get("torch_threads")

    # ---- export -------------------------------------------------------------------------------
    def export(self, seconds: float, command: str = "") -> Path:
        """Save the trained (EMA if used) UNet with the base's other components: ``OUTPUT/pipeline``."""
        if self._trace is not None:
            raise MemattnError("export after leaving the Finetuner's `with` block (the probe is still on)")
        self.accelerator.wait_for_everyone()
        target = self.out / PIPELINE
        if not self.accelerator.is_main_process:
            return target
        unet = copy.deepcopy(self.ema if self.ema is not None else self.model).eval().requires_grad_(False)
        tmp = target.with_name("." + target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        trained = self.pipe.unet
        self.pipe.unet = unet  # the base pipeline, its own components and config, with the new UNet
        try:
            self.pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            self.pipe.unet = trained
        run = {
            "command": command,
            "config": json.loads(json.dumps(asdict(self.config))),
            "steps": self.step,
            "training_seconds": round(seconds, 1),
            "base": str(self.base),
            "data": self.data.description,
            "mitigation": self.config.mitigation.describe(),
            **({"checkpoint_log": self.checkpoint_log} if self.checkpoint_log else {}),
        }
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=1))
        if self.data.manifest is not None and self.data.manifest_file:  # keep the data's ground truth
            manifest = copy.deepcopy(self.data.manifest)
            manifest["command"] = command or manifest.get("command", "")
            manifest["training_seconds"] = round(seconds, 1)
            manifest.setdefault("config", {})["steps"] = self.step
            manifest["finetune"] = run
            (tmp / self.data.manifest_file).write_text(json.dumps(manifest, indent=1))
        for name in self.data.carried_files:  # e.g. the testbed's alignment measure
            if (self.base / name).is_file():
                shutil.copyfile(self.base / name, tmp / name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target
