"""The attention session: ref-counted probes, listener order, nesting of trace, mitigate and Guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generators

import memattn
from memattn.attention.patch import Patch
from memattn.attention.processor import CrossAttentionProbe
from memattn.attention.session import AttentionSession, BatchDescription, Listener
from memattn.errors import LayoutError
from memattn.mitigation.guard import Guard

PROMPTS = ["a dog", "an old red barn in a snowy field at dusk"]
STEPS = 4


def run(pipe, prompts=PROMPTS, seeds=(1, 2)):
    return pipe(
        prompts, num_inference_steps=STEPS, generator=generators(list(seeds)), output_type="np"
    ).images


def padding_mass(record) -> torch.Tensor:
    """``[step, image]``: attention mass on the tokens after each row's first EOS (layer and head mean)."""
    attention = record.head_mean().mean(dim=1)  # step, image, token
    rows = [attention[:, i, layout.padding_span].sum(dim=-1) for i, layout in enumerate(record.layouts)]
    return torch.stack(rows, dim=1)


def test_probes_are_installed_once_and_restored_by_the_last_user(sd1_pipe):
    before = dict(sd1_pipe.unet.attn_processors)
    with memattn.trace(sd1_pipe):
        session = AttentionSession.active(sd1_pipe)
        probes = dict(sd1_pipe.unet.attn_processors)
        assert session is not None and any(isinstance(p, CrossAttentionProbe) for p in probes.values())
        with memattn.mitigate(sd1_pipe):
            assert AttentionSession.active(sd1_pipe) is session
            assert all(sd1_pipe.unet.attn_processors[name] is probes[name] for name in probes)
            assert [listener.role for listener in session.listeners] == ["trace", "mitigate"]
        # mitigate released its use: the trace's probes and recorder stay, its edit is gone.
        assert all(sd1_pipe.unet.attn_processors[name] is probes[name] for name in probes)
        assert [listener.role for listener in session.listeners] == ["trace"]
        assert "encode_prompt" in vars(sd1_pipe)
    assert AttentionSession.active(sd1_pipe) is None
    assert all(sd1_pipe.unet.attn_processors[name] is before[name] for name in before)
    assert "encode_prompt" not in vars(sd1_pipe)


@pytest.mark.parametrize("trace_outside", [True, False])
def test_a_recorder_records_the_attention_the_mitigated_model_used(sd1_pipe, trace_outside):
    """Edits apply before every reader, whichever block was entered first: the recorder sees the
    padding masked (mass 0) and the images are the mitigated ones."""
    with memattn.mitigate(sd1_pipe):
        mitigated = run(sd1_pipe)
    with memattn.trace(sd1_pipe) as plain_trace:
        plain = run(sd1_pipe)
    if trace_outside:
        with memattn.trace(sd1_pipe) as tr, memattn.mitigate(sd1_pipe):
            images = run(sd1_pipe)
    else:
        with memattn.mitigate(sd1_pipe), memattn.trace(sd1_pipe) as tr:
            images = run(sd1_pipe)
    assert np.array_equal(images, mitigated)
    assert float(padding_mass(plain_trace.record).min()) > 1e-3  # unedited: the padding takes attention
    assert float(padding_mass(tr.record).max()) == 0.0
    assert np.abs(plain - mitigated).max() > 1e-3


class _Scale(Listener):
    edits = True

    def __init__(self, factor: float, seen: list) -> None:
        self.factor, self.seen = factor, seen

    def edit(self, session, layer, query, key, mask):
        self.seen.append((self.factor, float(key.abs().sum())))
        return key * self.factor, mask


class _Keys(Listener):
    reads = True

    def __init__(self) -> None:
        self.sums: list[float] = []

    def observe(self, session, layer, query, key, mask):
        self.sums.append(float(key.abs().sum()))


def test_editors_chain_in_the_order_added_and_readers_see_the_final_keys(sd1_pipe):
    seen: list = []
    keys = _Keys()
    session = AttentionSession.acquire(sd1_pipe)
    try:
        for listener in (keys, _Scale(2.0, seen), _Scale(3.0, seen)):  # a reader added first still reads last
            session.add(listener)
        sd1_pipe("a dog", num_inference_steps=1, generator=generators([0]), output_type="latent")
    finally:
        session.release()
    assert AttentionSession.active(sd1_pipe) is None
    n_layers = len(session.layer_names)
    assert len(seen) == 2 * n_layers and len(keys.sums) == n_layers
    for layer in range(n_layers):
        (first, before), (second, after_first) = seen[2 * layer], seen[2 * layer + 1]
        assert (first, second) == (2.0, 3.0)
        assert after_first == pytest.approx(2.0 * before, rel=1e-5)
        assert keys.sums[layer] == pytest.approx(6.0 * before, rel=1e-5)


def test_a_guard_inside_a_trace_works_and_the_trace_records_the_whole_run(sd1_pipe):
    """The guard adds its own step-1 recorder and, after step 1, an edit for the flagged rows only;
    the user's trace sees every step, the edit from step 2 on, and keeps its recorder afterwards."""
    alone = Guard(sd1_pipe, threshold=-1e9, mode="continue")(
        PROMPTS, num_inference_steps=STEPS, generator=generators([1, 2]), output_type="np"
    )
    with memattn.trace(sd1_pipe) as tr:
        session = AttentionSession.active(sd1_pipe)
        out = Guard(sd1_pipe, threshold=-1e9, mode="continue")(
            PROMPTS, num_inference_steps=STEPS, generator=generators([1, 2]), output_type="np"
        )
        assert [listener.role for listener in session.listeners] == ["trace"]
    assert np.array_equal(out.images, alone.images)
    assert all(v.flagged for v in out.verdicts)
    assert tr.record.n_steps == STEPS and tr.record.prompts == tuple(PROMPTS)
    mass = padding_mass(tr.record)
    assert float(mass[0].min()) > 1e-3  # step 1 unedited: that is what the guard scores
    assert float(mass[1:].max()) == 0.0  # mitigated from step 2 on


def test_an_inner_block_that_describes_the_batch_differently_is_refused():
    from memattn.testing import sd1_unet

    torch.manual_seed(0)
    unet = sd1_unet().eval()
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    before = dict(unet.attn_processors)
    with memattn.trace(unet, lengths=[4, 6]) as tr:
        with pytest.raises(LayoutError, match="describe it once, in the outer block"):
            AttentionSession.acquire(unet, BatchDescription.of(lengths=[5, 5]))
        # The same description, or none, is accepted: the outermost one is in force.
        with memattn.mitigate(unet, lengths=[4, 6]), torch.no_grad():
            unet(sample, 10, encoder_hidden_states=context)
        assert AttentionSession.active(unet).description == BatchDescription.of(lengths=[4, 6])
    assert [layout.n_tokens for layout in tr.record.layouts] == [4, 6]
    assert AttentionSession.active(unet) is None
    assert all(unet.attn_processors[name] is before[name] for name in before)


class _Owner:
    def method(self) -> str:
        return "class"


def test_patches_restore_in_reverse_what_was_there_class_method_or_instance_wrapper():
    owner = _Owner()
    owner.method = (lambda wrapped: lambda: "user+" + wrapped())(owner.method)  # a user's own wrapper
    user = owner.method
    outer = Patch(owner, "method", lambda original: lambda: "outer+" + original())
    inner = Patch(owner, "method", lambda original: lambda: "inner+" + original())
    assert owner.method() == "inner+outer+user+class"
    inner.restore()
    assert owner.method() == "outer+user+class"
    outer.restore()
    outer.restore()  # a second restore is a no-op
    assert owner.method is user
    bare = _Owner()
    patch = Patch(bare, "method", lambda original: lambda: "patched+" + original())
    assert bare.method() == "patched+class"
    patch.restore()  # nothing was on the instance: the class method shows through again
    assert "method" not in vars(bare) and bare.method() == "class"
