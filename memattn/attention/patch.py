"""The one way memattn wraps a method of a pipeline for a while and puts it back exactly.

Every hook memattn places on a pipeline goes through :class:`Patch`: the attention session's
``encode_prompt`` wrapper (it learns each call's prompts and batch layout), the embedding-level
mitigations (:func:`wrapping_encode_prompt`) and the guard's ``prepare_latents`` capture. One binding
rule (arguments bound by name against the pipeline *class*'s method, defaults applied, so a user's own
wrapper with a ``*args`` signature changes nothing) and one restore rule (an attribute the instance
had of its own, such as a user's wrapper or an enclosing block's, comes back; otherwise the instance
attribute is deleted and the class method shows through again).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

_MISSING = object()


def call_arguments(owner: Any, name: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by parameter name (defaults included, ``self`` left out).

    Binds against ``type(owner).name`` when the class has it: an instance-level wrapper may hide the
    real signature behind ``*args, **kwargs``. Arguments that do not bind come back by keyword only.
    """
    method = getattr(type(owner), name, None)
    try:
        signature = inspect.signature(method if method is not None else getattr(owner, name))
        bound = (
            signature.bind(owner, *args, **kwargs) if method is not None else signature.bind(*args, **kwargs)
        )
    except (TypeError, ValueError):
        return dict(kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    return arguments


class Patch:
    """Replace ``owner.name`` by ``wrap(original)`` until :meth:`restore`."""

    def __init__(
        self, owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> None:
        self.owner, self.name = owner, name
        self._own = vars(owner).get(name, _MISSING)
        original = getattr(owner, name)
        replacement = wrap(original)
        functools.update_wrapper(replacement, original)
        setattr(owner, name, replacement)
        self._active = True

    def restore(self) -> None:
        if not self._active:
            return
        self._active = False
        if self._own is _MISSING:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self._own)


@contextlib.contextmanager
def patched(
    owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """:class:`Patch` for a ``with`` block."""
    patch = Patch(owner, name, wrap)
    try:
        yield
    finally:
        patch.restore()


# (the call's arguments by name, encode_prompt's result) -> the result to hand to the pipeline
EncodeHook = Callable[[dict[str, Any], tuple], tuple]


def wrapping_encode_prompt(pipe: Any, hook: EncodeHook) -> contextlib.AbstractContextManager:
    """Hand every ``encode_prompt`` result through ``hook`` inside the ``with`` block."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            return hook(call_arguments(pipe, "encode_prompt", args, kwargs), original(*args, **kwargs))

        return encode_prompt

    return patched(pipe, "encode_prompt", wrap)
