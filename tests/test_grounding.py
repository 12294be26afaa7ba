"""The grounding loss used to train the micro model: its processor, token positions and loss."""
import pytest
import torch

from maskmill.toyworld import grounding
from maskmill.toyworld.build import build_models, clip_tokenizer
from maskmill.toyworld.train import grow_text_layers, grow_transformer_layers


def test_object_token_positions_follow_the_caption_and_pad_with_minus_one():
    tok = clip_tokenizer()
    pos = grounding.object_token_positions(
        tok, ["a red circle and a blue square", "a green star"], [["red circle", "blue square"], ["green star"]])
    assert pos[0].tolist() == [[2, 3], [6, 7], [-1, -1]]  # BOS at 0, "a" at 1
    assert pos[1].tolist() == [[2, 3], [-1, -1], [-1, -1]]
    bare = grounding.object_token_positions(tok, ["a circle, a square and a star"], [["circle", "square", "star"]])
    assert bare[0].tolist() == [[2, -1], [5, -1], [8, -1]]  # colour dropout: the shape word alone
    same = grounding.object_token_positions(tok, ["a star, a circle and a star"], [["star", "circle", "star"]])
    assert same[0].tolist() == [[2, -1], [5, -1], [8, -1]]  # a recurring phrase: one occurrence each


def _one_token_attention(inside: bool, side: int = 8) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Token 3 (object 1's shape word) attends only inside a square object, or only outside it."""
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 8:16, 8:16] = 1
    obj = grounding.object_masks(labels, side)[0, :, 0] > 0.5
    where = obj if inside else ~obj
    probs = torch.full((1, side * side, 77), 1e-3)
    probs[0, where, 2] = probs[0, where, 3] = 1.0
    positions = torch.tensor([[[2, 3], [-1, -1], [-1, -1]]])
    return [probs], labels, positions


def test_token_loss_is_zero_inside_the_object_and_one_outside_and_skips_dropped_captions():
    keep = torch.tensor([True])
    store, labels, pos = _one_token_attention(inside=True)
    assert grounding.token_loss(store, labels, pos, keep) < 0.01
    store, labels, pos = _one_token_attention(inside=False)
    assert grounding.token_loss(store, labels, pos, keep) > 0.98
    assert grounding.token_loss(store, labels, pos, torch.tensor([False])) == 0  # nothing to ground


def test_pixel_loss_asks_every_object_pixel_to_read_its_phrase():
    keep = torch.tensor([True])
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 8:16, 8:16] = 1
    pos = torch.tensor([[[2, 3], [-1, -1], [-1, -1]]])
    obj = grounding.object_masks(labels, 8)[0, :, 0] > 0.5

    def probs(share_inside: float, share_outside: float) -> list[torch.Tensor]:
        p = torch.zeros(1, 64, 77)
        p[0, :, 0] = 1.0  # the rest of each pixel's attention goes to BOS
        for mask, share in ((obj, share_inside), (~obj, share_outside)):
            p[0, mask, 2] = p[0, mask, 3] = share / 2
            p[0, mask, 0] = 1 - share
        return [p]

    good, peaked, wrong = (grounding.pixel_loss(probs(a, b), labels, pos, keep) for a, b in
                           [(0.99, 0.01), (0.2, 0.01), (0.01, 0.99)])
    assert good < 0.05 < peaked < wrong
    assert grounding.pixel_loss(probs(0.01, 0.99), labels, pos, torch.tensor([False])) == 0
    # a phrase of one token (no colour word): the empty slot must not read BOS's attention as the phrase's
    shape_only = torch.tensor([[[3, -1], [-1, -1], [-1, -1]]])
    p = probs(0.0, 0.0)[0]
    p[0, obj, 3], p[0, obj, 0] = 0.99, 0.01
    assert grounding.pixel_loss([p], labels, shape_only, keep) < 0.05
    p[0, obj, 3], p[0, obj, 0] = 0.0, 1.0
    assert grounding.pixel_loss([p], labels, shape_only, keep) > 2.0


def test_grounding_processor_changes_nothing_but_keeps_the_probabilities():
    torch.manual_seed(0)
    _, text, unet = build_models(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    cond = text(clip_tokenizer()(["a red circle", "a blue star"], padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids)[0]
    with torch.no_grad():
        plain = unet(x, t, cond).sample
        store: list[torch.Tensor] = []
        grounding.install(unet, store)
        grounded = unet(x, t, cond).sample
    torch.testing.assert_close(grounded, plain, atol=1e-5, rtol=1e-4)
    n_cross = sum(".attn2." in n for n in unet.attn_processors)
    assert len(store) == n_cross == 7
    assert sorted({p.shape[1] for p in store}) == [64, 256] and all(p.shape[2] == 77 for p in store)
    torch.testing.assert_close(store[0].sum(-1), torch.ones(2, store[0].shape[1]))


def test_grown_text_layers_start_as_identities_and_cannot_shrink():
    torch.manual_seed(0)
    _, text, _ = build_models(0)
    ids = clip_tokenizer()(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = text(ids)[0]
        grown = grow_text_layers(text, 2)
        torch.testing.assert_close(grown(ids)[0], before)
    assert grown.config.num_hidden_layers == 2
    with pytest.raises(ValueError, match="--text-layers 1 is fewer than the 2 layers"):
        grow_text_layers(grown, 1)


def test_grown_unet_transformer_layers_start_as_identities_and_cannot_shrink():
    torch.manual_seed(0)
    _, _, unet = build_models(0)
    for p in unet.parameters():  # diffusers zero-inits proj_out: randomise so the check can fail
        torch.nn.init.normal_(p, std=0.05)
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 64)
    with torch.no_grad():
        before = unet(x, t, cond).sample
        grown = grow_transformer_layers(unet, 2)
        torch.testing.assert_close(grown(x, t, cond).sample, before)
    assert grown.config.transformer_layers_per_block == 2
    assert len(grown.down_blocks[0].attentions[0].transformer_blocks) == 2
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in unet.parameters())
    assert grow_transformer_layers(grown, None) is grown
    with pytest.raises(ValueError, match="--unet-transformer-layers 1: the --init-from UNet has 2"):
        grow_transformer_layers(grown, 1)
