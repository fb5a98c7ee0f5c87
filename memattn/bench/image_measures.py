"""Copy similarity and prompt alignment for real models: SSCD descriptors and the CLIP score.

Both load only what the user has on disk (no hub access): an SSCD TorchScript file and a transformers
CLIP directory (safetensors). Used by ``memattn bench mitigate`` when the model is not the testbed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memattn.errors import MemattnError

# SSCD preprocessing as its README recommends ("small_288"): short edge resized to 288 (bilinear, as
# torchvision's Resize on PIL images), then ImageNet normalisation. The models return L2-normalised
# descriptors; they are normalised again here so any TorchScript embedding model can stand in.
SSCD_SHORT_EDGE = 288
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSCD_FORMAT = (
    "an SSCD TorchScript file such as sscd_disc_mixup.torchscript.pt or sscd_disc_large.torchscript.pt "
    "(facebookresearch/sscd-copy-detection): a module mapping [N, 3, H, W] images to [N, D] descriptors"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# ------------------------------------------------------------------------------------ copy similarity


class SSCD:
    """A TorchScript copy-detection descriptor (SSCD or anything with its interface)."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16) -> None:
        path = Path(path)
        if not path.is_file():
            raise MemattnError(f"--sscd {path} does not exist; expected {SSCD_FORMAT}")
        try:
            self.module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError, OSError, EOFError) as error:
            first = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
            raise MemattnError(
                f"{path} is not a TorchScript module ({first[:120]}); expected {SSCD_FORMAT}"
            ) from None
        self.module.eval()
        self.device = device
        self.batch_size = batch_size
        self.path = path

    @staticmethod
    def preprocess(image: Any) -> torch.Tensor:
        """PIL image -> [3, H, W]: short edge to ``SSCD_SHORT_EDGE``, ImageNet-normalised."""
        from PIL import Image

        image = image.convert("RGB")
        scale = SSCD_SHORT_EDGE / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        array = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
        array = (array - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    @torch.no_grad()
    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """L2-normalised float64 descriptors [N, D] (images of one batch must share a size)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start : start + self.batch_size]])
            try:
                features = self.module(batch.to(self.device))
            except RuntimeError as error:
                first = str(error).splitlines()[0][:120]
                raise MemattnError(f"--sscd {self.path} failed on a batch of images ({first})") from None
            if not isinstance(features, torch.Tensor) or features.dim() != 2 or len(features) != len(batch):
                shape = (
                    tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
                )
                raise MemattnError(f"--sscd {self.path} returned {shape}; expected {SSCD_FORMAT}")
            out.append(torch.nn.functional.normalize(features.double().cpu(), dim=1))
        return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def reference_images(directory: str | Path, count: int) -> list[Any]:
    """Training images of memorized prompts 0..count-1, named ``{i}.png`` or ``{i:04d}.png`` (or jpg/webp)."""
    from PIL import Image

    directory = Path(directory)
    if not directory.is_dir():
        raise MemattnError(f"--reference-dir {directory} is not a directory")
    found, missing = [], []
    for i in range(count):
        paths = [directory / f"{stem}{suffix}" for stem in (str(i), f"{i:04d}") for suffix in IMAGE_SUFFIXES]
        path = next((p for p in paths if p.is_file()), None)
        if path is None:
            missing.append(f"{i:04d}.png")
        else:
            found.append(Image.open(path).convert("RGB"))
    if missing:
        raise MemattnError(
            f"--reference-dir {directory} lacks {len(missing)} of {count} images (first: {missing[0]}); "
            "name the training image of memorized prompt i as i.png or {i:04d}.png"
        )
    return found


# ------------------------------------------------------------------------------------------- alignment


class ClipScore:
    """torchmetrics' CLIPScore, ``100 · max(cos(image, text), 0)``, from a local transformers CLIP dir."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16) -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = Path(path)
        hint = (
            "--clip expects a local directory written by CLIPModel/CLIPProcessor.save_pretrained "
            "(config.json, model.safetensors, tokenizer and image-processor files), e.g. a download of "
            "openai/clip-vit-large-patch14"
        )
        if not path.is_dir():
            raise MemattnError(f"--clip {path} is not a directory; {hint}")
        try:
            self.model = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
            self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as error:
            first = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            raise MemattnError(f"--clip {path} could not be loaded ({first}); {hint}") from None
        self.model.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def __call__(self, images: Sequence[Any], prompts: Sequence[str]) -> np.ndarray:
        """One score per (image, prompt) pair; prompts truncated to CLIP's 77 tokens, as torchmetrics does."""
        scores = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(
                text=list(prompts[start : start + self.batch_size]),
                images=list(images[start : start + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            out = self.model(**inputs)  # image_embeds / text_embeds: projected and L2-normalised
            cosine = (out.image_embeds.double() * out.text_embeds.double()).sum(-1)
            scores.append((100 * cosine.clamp(min=0)).cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0)
