"""Attention capture on tiny random pipelines in the SD 1.x, SD 2.x and SDXL layouts.

What must hold whatever the model: images are bitwise those of the plain pipeline, the
layers' own processors come back, the store does not grow with the number of steps, the
recorded maps are probabilities averaged over exactly the steps and layers asked for, and a
sample's maps do not depend on the other samples of its batch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from maskmill.capture import AttentionStore, CaptureConfig, CaptureProcessor, capture_attention
from maskmill.tokens import ClassSpec
from maskmill.generate import GenerationSettings, generate_plain, generate_with_attention, latent_hw
from maskmill.tokens import ClassNotInPromptError, phrase_token_indices

from conftest import PROMPTS, SEEDS

SIZE = 32  # every layout here has a VAE factor of 2: 16x16 latents, attention at 16 and 8


def settings(steps: int = 3, guidance: float = 4.0) -> GenerationSettings:
    return GenerationSettings(steps=steps, guidance=guidance, height=SIZE, width=SIZE)


def run_capture(pipe, config: CaptureConfig, steps: int = 3, prompts=PROMPTS, seeds=SEEDS, guidance: float = 4.0):
    """Generate inside capture_attention; returns (images, store) so tests can inspect the accumulators."""
    s = settings(steps, guidance)
    with capture_attention(pipe.unet, config, batch_size=len(prompts), cfg=guidance > 1.0,
                           latent_hw=latent_hw(pipe, SIZE, SIZE), num_steps=steps) as store:
        images = generate_plain(pipe, list(prompts), list(seeds), s)
    return images, store


def accumulators(store: AttentionStore) -> dict[str, torch.Tensor]:
    out = {f"cross/{k}": v for k, v in store.cross.items()}
    out.update({f"self/{k}": v for k, v in store.self_attn.items()})
    out.update({f"feature/{k}": v for k, v in store.features.items()})
    out.update({f"layer/{k}": v for k, v in store.layer_self.items()})
    return out


def attn_layers(unet, kind: str) -> list[str]:
    return [k.removesuffix(".processor") for k in unet.attn_processors if k.endswith(f"{kind}.processor")]


# --- images are untouched --------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["sd1", "sd2", "sdxl"])
def test_images_are_bitwise_identical_with_and_without_capture(pipes, layout):
    pipe = pipes[layout]
    plain = generate_plain(pipe, PROMPTS, SEEDS, settings())
    config = CaptureConfig(feature_modules={"mid": "mid_block"})  # every layer, every step, features too
    images, maps = generate_with_attention(pipe, PROMPTS, SEEDS, settings(), config)
    assert len(images) == len(maps) == 2
    for a, b in zip(plain, images):
        assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3)
        assert np.array_equal(a, b)
    assert not np.array_equal(images[0], images[1])  # two prompts, two seeds: the comparison is not vacuous
    assert maps[0].cross and maps[0].self_attn and maps[0].features
    # uint8 rounding could hide small differences: the final latents must be bitwise equal too
    from maskmill.generate import generators

    def latents():
        return pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, height=SIZE, width=SIZE,
                    generator=generators(SEEDS), output_type="latent").images

    with torch.no_grad():
        reference = latents()
        with capture_attention(pipe.unet, config, batch_size=2, cfg=True, latent_hw=latent_hw(pipe, SIZE, SIZE),
                               num_steps=3):
            captured = latents()
    assert torch.equal(reference, captured)
    # and the pipeline is the plain one again afterwards
    assert np.array_equal(generate_plain(pipe, PROMPTS, SEEDS, settings())[0], plain[0])


def test_original_processors_are_restored_even_when_the_body_raises(sd1_pipe):
    unet = sd1_pipe.unet
    before = dict(unet.attn_processors)
    hooks_before = (len(unet._forward_pre_hooks), len(unet.mid_block._forward_hooks))
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(unet, CaptureConfig(feature_modules={"mid": "mid_block"}), batch_size=2, cfg=True,
                               latent_hw=(16, 16), num_steps=2):
            inside = unet.attn_processors
            assert all(isinstance(inside[k], CaptureProcessor) for k in before if ".attn" in k)
            assert all(inside[k].inner is before[k] for k in before)
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert (len(unet._forward_pre_hooks), len(unet.mid_block._forward_hooks)) == hooks_before


def test_processor_kwargs_reach_the_wrapped_processor_under_capture(sd1_pipe):
    """diffusers passes on only the cross_attention_kwargs a processor's signature names."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = []

    class TaggedProcessor(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     tag=None):
            seen.append(tag)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    unet = sd1_pipe.unet
    before = dict(unet.attn_processors)
    unet.set_attn_processor(TaggedProcessor())
    try:
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        with capture_attention(unet, CaptureConfig(), batch_size=1, cfg=True, latent_hw=(16, 16)) as store:
            with torch.no_grad():
                unet(latents, 500, encoder_hidden_states=context, cross_attention_kwargs={"tag": "kept"})
        assert seen and set(seen) == {"kept"}
        assert store.cross_count and any(n > 0 for n in store.self_count.values())
    finally:
        unet.set_attn_processor(before)


# --- memory flat in steps, results are averages ---------------------------------------------

def test_store_size_is_flat_in_steps_and_maps_are_probabilities(sd1_pipe):
    config = CaptureConfig()
    _, short = run_capture(sd1_pipe, config, steps=2)
    _, long = run_capture(sd1_pipe, config, steps=6)
    a, b = accumulators(short), accumulators(long)
    assert a.keys() == b.keys() and a
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    nbytes = lambda acc: sum(v.numel() * v.element_size() for v in acc.values())  # noqa: E731
    assert nbytes(a) == nbytes(b)
    # counts: one per layer per step
    for name in attn_layers(sd1_pipe.unet, "attn2"):
        assert short.cross_count[name] == 2 and long.cross_count[name] == 6
    side_of_block = {"down_blocks.0": 16, "down_blocks.1": 8, "mid_block": 8, "up_blocks.0": 8, "up_blocks.1": 16}
    n_self = {16: 0, 8: 0}
    for name in attn_layers(sd1_pipe.unet, "attn1"):
        n_self[side_of_block[name.split(".attentions")[0]]] += 1
    assert n_self == {16: 3, 8: 4}
    assert long.self_count == {s: 6 * n for s, n in n_self.items()}
    assert short.self_count == {s: 2 * n for s, n in n_self.items()}

    for sample in long.results():
        for side, sa in sample.self_attn.items():
            assert sa.shape == (side * side, side * side)
            assert torch.allclose(sa.sum(1), torch.ones(side * side), atol=1e-4)
            assert (sa >= 0).all()
        for name, ca in sample.cross.items():
            side = sample.cross_resolution[name]
            assert ca.shape == (77, side, side)
            assert torch.allclose(ca.sum(0), torch.ones(side, side), atol=1e-4)


def test_step_window_records_only_the_last_half(sd1_pipe, monkeypatch):
    recorded = []
    original = AttentionStore.add_cross

    def spy(self, name, probs, hw):
        recorded.append(self.step)
        return original(self, name, probs, hw)

    monkeypatch.setattr(AttentionStore, "add_cross", spy)
    n_cross = len(attn_layers(sd1_pipe.unet, "attn2"))
    _, store = run_capture(sd1_pipe, CaptureConfig(steps=(0.5, 1.0)), steps=4)
    assert sorted(set(recorded)) == [2, 3] and len(recorded) == 2 * n_cross
    assert set(store.cross_count.values()) == {2}
    assert store.step == 3  # every UNet call was counted, recorded or not

    # the two halves partition the steps: their sums add up to the whole run's
    recorded.clear()
    _, first = run_capture(sd1_pipe, CaptureConfig(steps=(0.0, 0.5)), steps=4)
    assert sorted(set(recorded)) == [0, 1]
    _, whole = run_capture(sd1_pipe, CaptureConfig(), steps=4)
    for name, acc in whole.cross.items():
        assert torch.allclose(acc, first.cross[name] + store.cross[name], atol=1e-5)
        assert not torch.allclose(first.cross[name], store.cross[name], atol=1e-4)


def test_self_blocks_select_sides_and_block_kinds(sd1_pipe):
    config = CaptureConfig(self_blocks={16: ("up",)}, per_layer_self=True)
    _, store = run_capture(sd1_pipe, config, steps=2)
    up16 = [n for n in attn_layers(sd1_pipe.unet, "attn1") if n.startswith("up_blocks.1")]
    assert len(up16) == 2
    assert set(store.self_attn) == {16}
    assert sorted(store.layer_self) == sorted(up16)
    assert store.self_count == {16: 2 * len(up16)}
    # the side's map is the mean of exactly those layers
    sample = store.results()[0]
    mean = torch.stack([sample.self_attn_layers[n] for n in up16]).mean(0)
    assert torch.allclose(sample.self_attn[16], mean, atol=1e-6)
    # empty selection: no self-attention computed at all; cross=False: no cross-attention
    _, none = run_capture(sd1_pipe, CaptureConfig(self_blocks={}, cross=False), steps=2)
    assert not none.self_attn and not none.cross


# --- batches: each sample on its own --------------------------------------------------------

def test_batched_samples_have_their_own_maps_equal_to_generating_them_alone(sd1_pipe):
    config = CaptureConfig()
    _, both = generate_with_attention(sd1_pipe, PROMPTS, SEEDS, settings(), config)
    assert not torch.allclose(both[0].cross[next(iter(both[0].cross))], both[1].cross[next(iter(both[1].cross))],
                              atol=1e-3)
    assert not torch.allclose(both[0].self_attn[16], both[1].self_attn[16], atol=1e-3)
    for i in range(2):
        _, alone = generate_with_attention(sd1_pipe, [PROMPTS[i]], [SEEDS[i]], settings(), config)
        for name, m in alone[0].cross.items():
            assert torch.allclose(both[i].cross[name], m, atol=1e-5), name
        for side, m in alone[0].self_attn.items():
            assert torch.allclose(both[i].self_attn[side], m, atol=1e-5), side


def test_multi_token_classes_and_missing_classes(tokenizer, sd1_pipe):
    prompt = "a photo of a potted plant"
    idx = phrase_token_indices(tokenizer, prompt, "potted plant")
    assert len(idx) == 2 and idx[1] == idx[0] + 1
    ids = tokenizer(prompt).input_ids
    assert [ids[i] for i in idx] == tokenizer("potted plant", add_special_tokens=False).input_ids
    assert phrase_token_indices(tokenizer, "a red circle", "red") == (2,)
    with pytest.raises(ClassNotInPromptError, match="traffic light"):
        phrase_token_indices(tokenizer, prompt, "traffic light")
    # a class's map is the sum of its tokens' maps
    _, maps = generate_with_attention(sd1_pipe, [prompt], [0], settings(steps=2))
    spec = ClassSpec("potted plant", idx)
    per_layer = maps[0].class_cross_attention(spec)
    for name, m in per_layer.items():
        assert m.shape == (16, 16) or m.shape == (8, 8)
        assert torch.allclose(m, maps[0].cross[name][idx[0]] + maps[0].cross[name][idx[1]])


def test_attention_probabilities_match_the_definition_for_any_chunk():
    from diffusers.models.attention_processor import Attention

    from maskmill.capture import attention_probabilities

    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8, cross_attention_dim=24)
    x, ctx = torch.randn(3, 50, 32), torch.randn(3, 77, 24)
    with torch.no_grad():
        q = attn.to_q(x).view(3, 50, 4, 8).transpose(1, 2)
        k = attn.to_k(ctx).view(3, 77, 4, 8).transpose(1, 2)
        expected = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)
        per_row = 3 * 4 * 77
        for chunk in (1, 7 * per_row, 7 * per_row + 5, 1 << 30, None):  # 1 row, 7 + remainder, all, default
            got = attention_probabilities(attn, x, ctx, chunk)
            assert got.shape == (3, 50, 77)
            assert torch.allclose(got, expected, atol=1e-6), chunk
        acc = torch.ones(3, 50, 77)
        attention_probabilities(attn, x, ctx, 7 * per_row, out=acc)  # adds into an accumulator
        assert torch.allclose(acc, expected + 1, atol=1e-6)


def test_chunking_does_not_change_the_maps(sd1_pipe):
    # 1 << 10 elements: one query row per chunk at side 16 (2 heads x 256 keys x batch 2)
    _, small = generate_with_attention(sd1_pipe, PROMPTS, SEEDS, settings(steps=2), CaptureConfig(chunk_elements=1 << 10))
    _, large = generate_with_attention(sd1_pipe, PROMPTS, SEEDS, settings(steps=2), CaptureConfig(chunk_elements=1 << 30))
    for a, b in zip(small, large):
        assert a.cross.keys() == b.cross.keys() and a.self_attn.keys() == b.self_attn.keys()
        for name in a.cross:
            assert torch.allclose(a.cross[name], b.cross[name], atol=1e-6)
        for side in a.self_attn:
            assert torch.allclose(a.self_attn[side], b.self_attn[side], atol=1e-6)


def test_feature_modules_keep_a_map_per_sample_from_the_last_recorded_step(sd1_pipe):
    unet = sd1_pipe.unet
    block_path = "down_blocks.1.attentions.0.transformer_blocks.0"  # returns (B, N, C) tokens
    seen: dict[str, list[torch.Tensor]] = {"mid": [], "block": []}

    def keep(key):
        def hook(_m, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            seen[key].append(t.detach().clone())
        return hook

    handles = [unet.mid_block.register_forward_hook(keep("mid")),
               unet.down_blocks[1].attentions[0].transformer_blocks[0].register_forward_hook(keep("block"))]
    try:
        config = CaptureConfig(self_blocks={}, cross=False, feature_modules={"mid": "mid_block", "block": block_path})
        _, maps = generate_with_attention(sd1_pipe, PROMPTS, SEEDS, settings(steps=3), config)
    finally:
        for h in handles:
            h.remove()
    assert len(seen["mid"]) == 3
    for i, sample in enumerate(maps):
        assert sample.features["mid"].shape == (64, 8, 8)
        assert sample.features["block"].shape == (64, 8, 8)
        assert torch.equal(sample.features["mid"], seen["mid"][-1][2 + i])  # conditional half of the last step
        tokens = seen["block"][-1][2 + i]  # (N, C)
        assert torch.equal(sample.features["block"], tokens.T.reshape(64, 8, 8))
    assert not torch.equal(maps[0].features["mid"], maps[1].features["mid"])


# --- SDXL ------------------------------------------------------------------------------------

def test_sdxl_cross_attention_with_several_transformer_layers_per_block(sdxl_pipe):
    _, maps = generate_with_attention(sdxl_pipe, PROMPTS, SEEDS, settings(steps=2))
    names = list(maps[0].cross)
    assert sorted(names) == sorted(attn_layers(sdxl_pipe.unet, "attn2"))  # in execution order
    assert any(".transformer_blocks.1." in n for n in names)
    assert set(maps[0].cross_resolution.values()) == {16, 8}
    for sample in maps:
        for name, ca in sample.cross.items():
            side = sample.cross_resolution[name]
            assert ca.shape == (77, side, side)
            assert torch.allclose(ca.sum(0), torch.ones(side, side), atol=1e-4)
        for side, sa in sample.self_attn.items():
            assert torch.allclose(sa.sum(1), torch.ones(side * side), atol=1e-4)
    # the two layers of one block attend differently: both were recorded, not one twice
    pair = [n for n in names if n.startswith("down_blocks.1.attentions.0.")]
    assert len(pair) == 2 and not torch.allclose(maps[0].cross[pair[0]], maps[0].cross[pair[1]])


def test_the_conditional_half_is_recorded(sd1_pipe):
    """At the first step both runs feed the UNet the same latents: with guidance the [uncond, cond] batch,
    without it the conditional batch alone. The maps recorded must be the same (the conditional ones)."""
    first = CaptureConfig(steps=(0.0, 0.25))
    _, guided = run_capture(sd1_pipe, first, steps=4, guidance=4.0)
    _, unguided = run_capture(sd1_pipe, first, steps=4, guidance=1.0)
    assert guided.cross_count == unguided.cross_count and set(guided.cross_count.values()) == {1}
    for name, acc in guided.cross.items():
        assert torch.allclose(acc, unguided.cross[name], atol=1e-5), name
    for side, acc in guided.self_attn.items():
        assert torch.allclose(acc, unguided.self_attn[side], atol=1e-5), side
