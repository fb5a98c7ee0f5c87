"""The joint-attention processor memattn installs on an MMDiT (SD3/SD3.5): the image→text block.

An MMDiT has no cross-attention. Each joint block projects the image tokens (``to_q/to_k/to_v``, keys
normalised by ``norm_k``) and the text tokens (``add_q_proj/add_k_proj/add_v_proj``, keys normalised by
``norm_added_k``) and runs one softmax over ``[image keys, text keys]`` for every query. The probe
computes the layer exactly as diffusers' ``JointAttnProcessor2_0`` does (same projections, norms and
fused kernel call, so images are bit-identical) and hands the session two views of what the *image*
queries do with the *text* keys:

- the **text distribution**: ``softmax(q_img · k_textᵀ/√d)`` over the text tokens alone, i.e. the joint
  softmax's image→text block renormalised over the text (the editing listeners first change the text
  keys and their mask, so readers see what the model uses); the entropy scores read this;
- the **text share**: how much of each image query's joint softmax falls on text keys at all (mean over
  image queries, per head), computed only when a listener asks for it, by one more fused kernel call on
  the image queries whose values are 1 on text keys and 0 on image keys.

An edit's mask covers the text keys for every query of the layer (image and text queries: the masked
text tokens are removed as keys), and ``C`` scales the BOS key as in the cross-attention edit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

if TYPE_CHECKING:
    from memattn.attention.session import AttentionSession


class JointAttentionProbe:
    """Joint-attention processor of one layer of an :class:`~memattn.attention.session.AttentionSession`."""

    def __init__(self, session: AttentionSession, layer: int) -> None:
        self.session = session
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        n_image = query.shape[2]
        if encoder_hidden_states is not None:
            text_query = attn.add_q_proj(encoder_hidden_states)
            text_key = attn.add_k_proj(encoder_hidden_states)
            text_value = attn.add_v_proj(encoder_hidden_states)
            text_query = text_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            text_key = text_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            text_value = text_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)

            session = self.session
            if session.editors:
                text_key, mask = session.edit(self.layer, query, text_key, None)
            if session.readers:
                session.observe(self.layer, query, text_key, mask)
            image_query = query
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
            if mask is not None:  # (batch, 1, 1, text) -> (batch, 1, 1, image + text): image keys stay
                mask = F.pad(mask, (n_image, 0))
            if session.share_readers:
                session.observe_share(self.layer, text_share(image_query, key, mask, n_image))

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


@torch.no_grad()
def text_share(
    image_query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, n_image: int
) -> torch.Tensor:
    """``(batch, heads)``: mean over image queries of the joint-softmax mass on the text keys.

    The attention of the image queries against all keys, applied to values that are 1 on text keys and
    0 on image keys, is that mass per query; the fused kernel computes it without a
    ``(queries, keys)`` matrix. Float32, so the mass is not rounded to the model's half precision.
    """
    batch, heads, _, head_dim = image_query.shape
    indicator = torch.zeros(batch, heads, key.shape[2], head_dim, dtype=torch.float32, device=key.device)
    indicator[:, :, n_image:] = 1.0
    mass = F.scaled_dot_product_attention(
        image_query.float(),
        key.float(),
        indicator,
        attn_mask=None if mask is None else mask.float(),
        dropout_p=0.0,
        is_causal=False,
    )
    return mass[..., 0].mean(dim=2)
