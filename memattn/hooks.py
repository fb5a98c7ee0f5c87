"""Wrap a pipeline's ``encode_prompt`` for a ``with`` block: the one place every pipeline call passes.

Mitigations that change the text embeddings, or that must know when a new pipeline call starts (to
count its UNet calls from zero), hook here and put the original method back on exit.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

# (the call's arguments by name, encode_prompt's result) -> the result to hand to the pipeline
EncodeHook = Callable[[dict[str, Any], tuple], tuple]


@contextlib.contextmanager
def wrapping_encode_prompt(pipe: Any, hook: EncodeHook) -> Iterator[None]:
    original = pipe.encode_prompt
    had_own = "encode_prompt" in vars(pipe)
    names = list(inspect.signature(original).parameters)

    @functools.wraps(original)
    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        bound = dict(zip(names, args, strict=False)) | kwargs
        return hook(bound, original(*args, **kwargs))

    pipe.encode_prompt = encode_prompt
    try:
        yield
    finally:
        if had_own:
            pipe.encode_prompt = original
        else:
            del pipe.encode_prompt
