"""A grounding loss on cross-attention, for training the micro model (TokenCompose-style).

Real SD learned from billions of captions that a noun's token should be read where the noun is
drawn; a 2-core CPU run on 16k scenes does not get there by itself (model card). TokenCompose
(Wang et al., CVPR 2024) fine-tunes SD with a token loss that pushes each object token's
cross-attention mass inside the object's mask, which also improved multi-object composition.
We add that term while training on rendered scenes, whose masks are exact:

    L_token = mean over (object, token of its phrase, cross-attention layer) of (1 - mass inside)^2

The token loss alone is met by a peak at the object's centre (mass share 0.84 but IoU 0.30 at
half the peak, measured), so the pixel loss asks every pixel of the object to read its phrase:

    L_pixel = balanced BCE between a pixel's attention share on the phrase's tokens and the mask
              (inside and outside pixels weigh half each)

Only cross-attention is supervised; self-attention grouping stays whatever the model learns.
The probabilities are kept by a processor installed with `set_attn_processor` (diffusers'
way of changing attention), with gradients, during training only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ..tokens import phrase_token_indices

MAX_OBJECTS = 3
TOKENS_PER_PHRASE = 2  # "<colour> <shape>": one CLIP token each


class GroundingProcessor(AttnProcessor):
    """diffusers' plain attention (probabilities computed explicitly) for the SD UNet's transformer
    cross-attention, which has no norm, residual or rescaling inside (`install` checks); appends the
    probabilities, averaged over heads as (batch, pixels, tokens), to `store`."""

    def __init__(self, store: list[torch.Tensor]):
        super().__init__()
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, pixels = hidden_states.shape[0], hidden_states.shape[1]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.append(probs.view(batch, attn.heads, pixels, -1).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def install(unet, store: list[torch.Tensor]) -> None:
    """Grounding processors on every cross-attention (attn2), SDPA on self-attention."""
    for name, module in unet.named_modules():
        if name.endswith(".attn2") and (module.group_norm is not None or module.spatial_norm is not None
                                        or module.norm_cross or module.residual_connection
                                        or module.rescale_output_factor != 1.0):
            raise ValueError(f"{name}: attention with norms, residual or rescaling is not supported here")
    unet.set_attn_processor({name: GroundingProcessor(store) if ".attn2." in name else AttnProcessor2_0()
                             for name in unet.attn_processors})


def object_token_positions(tokenizer, captions: list[str], phrases: list[list[str]]) -> torch.Tensor:
    """(N, MAX_OBJECTS, TOKENS_PER_PHRASE) token positions of each object's phrase; -1 where no object
    (and after a phrase's last token when it has fewer: a shape without its colour).

    Object k of caption i is phrases[i][k] and has label k + 1 in the rendered label map.
    """
    out = torch.full((len(captions), MAX_OBJECTS, TOKENS_PER_PHRASE), -1, dtype=torch.long)
    memo: dict[tuple[str, str], tuple[int, ...]] = {}
    lengths: dict[str, int] = {}  # captions repeat across a training set of 32k: tokenize each text once
    for i, (caption, objs) in enumerate(zip(captions, phrases)):
        for k, phrase in enumerate(objs):
            key = (caption, phrase)
            if key not in memo:
                memo[key] = phrase_token_indices(tokenizer, caption, phrase)
            if phrase not in lengths:
                lengths[phrase] = len(tokenizer(phrase, add_special_tokens=False).input_ids)
            n = lengths[phrase]
            if n > TOKENS_PER_PHRASE:
                raise ValueError(f"phrase {phrase!r} in {caption!r} has more than {TOKENS_PER_PHRASE} tokens")
            # the same phrase can recur ("a star, a star and a star"): object k is its r-th occurrence
            r = objs[:k].count(phrase)
            out[i, k, :n] = torch.tensor(memo[key][r * n : (r + 1) * n])
    return out


def object_masks(labels: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, W) label maps -> (B, side*side, MAX_OBJECTS) fraction of each cell covered by object k."""
    one_hot = torch.stack([(labels == k + 1).float() for k in range(MAX_OBJECTS)], 1)
    return F.adaptive_avg_pool2d(one_hot, side).flatten(2).transpose(1, 2)


def phrase_attention(probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, HW, 77) probabilities -> (B, HW, MAX_OBJECTS * TOKENS_PER_PHRASE) at the phrase tokens;
    slots without a token (-1) are zero."""
    flat = positions.flatten(1)
    picked = probs.gather(2, flat.clamp(min=0).unsqueeze(1).expand(-1, probs.shape[1], -1))
    return picked * (flat >= 0).unsqueeze(1)


def token_loss(store: list[torch.Tensor], labels: torch.Tensor, positions: torch.Tensor,
               keep: torch.Tensor) -> torch.Tensor:
    """Mean (1 - share of the token's attention inside its object)^2 over objects, tokens and layers.

    labels (B, H, W); positions (B, MAX_OBJECTS, TOKENS_PER_PHRASE), -1 = none; keep (B,) bool:
    rows whose caption was dropped (classifier-free guidance) have no tokens to ground.
    """
    valid = (positions >= 0) & keep.view(-1, 1, 1)
    losses = []
    for probs in store:
        side = int(round(probs.shape[1] ** 0.5))
        masks = object_masks(labels, side).repeat_interleave(TOKENS_PER_PHRASE, dim=2)  # (B, HW, K*T)
        attn = phrase_attention(probs, positions)
        inside = (attn * masks).sum(1) / attn.sum(1).clamp_min(1e-8)
        losses.append((1 - inside) ** 2)
    per = torch.stack(losses).mean(0).view_as(valid)
    return (per * valid).sum() / valid.sum().clamp_min(1)


def pixel_loss(store: list[torch.Tensor], labels: torch.Tensor, positions: torch.Tensor,
               keep: torch.Tensor) -> torch.Tensor:
    """Balanced BCE: each pixel's attention share on object k's phrase tokens vs k's mask.

    Arguments as `token_loss`. A pixel's share is a probability (softmax over tokens), so inside
    pixels are asked to read the phrase and every other pixel to read anything else.
    """
    valid = ((positions[..., 0] >= 0) & keep.view(-1, 1)).float()  # (B, K)
    losses = []
    for probs in store:
        side = int(round(probs.shape[1] ** 0.5))
        inside = object_masks(labels, side)  # (B, HW, K)
        share = phrase_attention(probs, positions)
        share = share.view(*share.shape[:2], MAX_OBJECTS, TOKENS_PER_PHRASE).sum(-1).clamp(1e-6, 1 - 1e-6)
        on = -(inside * share.log()).sum(1) / inside.sum(1).clamp_min(1e-6)
        off = -((1 - inside) * (1 - share).log()).sum(1) / (1 - inside).sum(1).clamp_min(1e-6)
        losses.append(0.5 * (on + off))  # (B, K)
    per = torch.stack(losses).mean(0)
    return (per * valid).sum() / valid.sum().clamp_min(1)
