"""User encoders: order invariance, padding, caching, head save/load; clip and a tiny random VLM (offline)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from diffalign.personalization import (
    SetPooling,
    UserEmbeddingCache,
    UserExample,
    VLMUserEncoder,
    create_user_encoder,
    example_digest,
    tiny_clip_user_encoder,
)


@pytest.fixture(scope="module")
def clip_encoder():
    return tiny_clip_user_encoder(dim=16, num_tokens=3).eval()


def _examples(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [
        UserExample(f"prompt {seed} {i}", torch.rand(3, size, size, generator=g) * 2 - 1, torch.rand(3, size, size, generator=g) * 2 - 1)
        for i in range(n)
    ]


def test_clip_encoder_shape_and_order_invariance(clip_encoder):
    examples = _examples(5)
    emb = clip_encoder(examples)
    assert emb.shape == (3, 16)
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        torch.testing.assert_close(clip_encoder([examples[i] for i in perm]), emb, atol=1e-5, rtol=1e-5)
    # Not a constant: other examples, or chosen/rejected swapped, give another user.
    assert (clip_encoder(_examples(5, seed=1)) - emb).abs().max() > 1e-3
    swapped = [UserExample(e.prompt, e.rejected, e.chosen) for e in examples]
    assert (clip_encoder(swapped) - emb).abs().max() > 1e-3


def test_clip_encoder_one_example_pil_and_padding(clip_encoder):
    pil = Image.new("RGB", (40, 24), (200, 30, 30))
    one = [UserExample("a red square", pil, Image.new("RGB", (40, 24), (30, 30, 200)))]
    assert clip_encoder(one).shape == (3, 16)
    # A batch of users with different example counts equals encoding each alone (padding is masked).
    users = [_examples(4), _examples(1, seed=2), _examples(2, seed=3)]
    batched = clip_encoder.encode_users(users)
    for i, user in enumerate(users):
        torch.testing.assert_close(batched[i], clip_encoder(user), atol=1e-5, rtol=1e-5)


def test_encoder_input_errors(clip_encoder):
    with pytest.raises(ValueError, match="at least one example"):
        clip_encoder([])
    with pytest.raises(TypeError, match="UserExample"):
        clip_encoder([("p", None, None)])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        clip_encoder([UserExample("p", torch.zeros(32, 32), torch.zeros(32, 32))])
    with pytest.raises(ValueError, match="unknown user encoder"):
        create_user_encoder("resnet")
    with pytest.raises(ValueError, match="at least one valid"):
        SetPooling(8, 8, 2, 2)(torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.bool))


def test_set_pooling_is_permutation_invariant_with_mask():
    torch.manual_seed(0)
    pool = SetPooling(12, 16, num_tokens=2, num_heads=4).eval()
    x = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = pool(x, mask)
    perm = torch.tensor([3, 1, 0, 2, 5, 4])
    torch.testing.assert_close(pool(x[:, perm], mask[:, perm]), out, atol=1e-5, rtol=1e-5)
    garbage = x.clone()
    garbage[0, 4:] = 100.0  # padded rows do not matter
    torch.testing.assert_close(pool(garbage, mask)[0], out[0], atol=1e-5, rtol=1e-5)


def test_head_save_load_round_trip(clip_encoder, tmp_path):
    path = tmp_path / "head.safetensors"
    clip_encoder.save_head(path)
    other = tiny_clip_user_encoder(dim=16, num_tokens=3, seed=0).eval()  # same backbone...
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # ...another head
        for p in other.head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    examples = _examples(3)
    assert (other(examples) - clip_encoder(examples)).abs().max() > 1e-4  # a different random head
    other.load_head(path)
    torch.testing.assert_close(other(examples), clip_encoder(examples), atol=1e-6, rtol=1e-6)
    wrong = tiny_clip_user_encoder(dim=8, num_tokens=3)
    with pytest.raises(ValueError, match="dim"):
        wrong.load_head(path)


def test_embedding_cache(clip_encoder, tmp_path):
    cache = UserEmbeddingCache(clip_encoder, directory=tmp_path / "cache")
    examples = _examples(3)
    first = cache.embedding("alice", examples)
    again = cache.embedding("alice", list(reversed(examples)))  # same set, other order: a hit
    assert cache.hits == 1 and cache.misses == 1 and again is first
    torch.testing.assert_close(first, clip_encoder(examples).detach())
    cache.embedding("alice", examples[:2])  # other examples: a miss
    assert cache.misses == 2
    fresh = UserEmbeddingCache(clip_encoder, directory=tmp_path / "cache")  # persisted on disk
    torch.testing.assert_close(fresh.embedding("alice", examples), first)
    assert fresh.hits == 1 and fresh.misses == 0
    assert example_digest(examples) != example_digest(examples[:2])
    fresh.clear_embeddings()
    fresh.embedding("alice", examples)
    assert fresh.misses == 1


# ------------------------------------------------------------------------------------------ vlm back-end


@pytest.fixture(scope="module")
def tiny_vlm():
    """A randomly initialised LLaVA (tiny CLIP vision tower + tiny Llama) with an offline tokenizer."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from diffalign.tokenization import clip_tokenizer

    tokenizer = clip_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, max_position_embeddings=256,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, processor


def test_vlm_encoder_tiny_llava(tiny_vlm):
    model, processor = tiny_vlm
    torch.manual_seed(0)
    encoder = VLMUserEncoder(model, processor, layer=-2, dim=16, num_tokens=2).eval()
    assert encoder.feature_dim == 32
    examples = _examples(3)
    emb = encoder(examples)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(encoder(examples[::-1]), emb, atol=1e-5, rtol=1e-5)
    assert (encoder(_examples(3, seed=5)) - emb).abs().max() > 1e-4
    # The chosen layer matters: the last layer gives other features than the second to last.
    last = VLMUserEncoder(model, processor, layer=-1, dim=16, num_tokens=2)
    assert (last.example_features(examples) - encoder.example_features(examples)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="out of range"):
        VLMUserEncoder(model, processor, layer=10, dim=16, num_tokens=2).example_features(examples)
    # Only the head trains.
    encoder.train()
    encoder.encode_users([examples]).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in encoder.head_parameters())


def test_vlm_masked_mean_pooling_ignores_padding():
    class Stub(torch.nn.Module):
        config = None

    encoder = VLMUserEncoder(Stub(), processor=None, hidden_size=4, dim=8, num_tokens=1, num_heads=2)
    hidden = torch.tensor([[[1.0, 1, 1, 1], [3.0, 3, 3, 3], [100.0, 100, 100, 100]]])
    pooled = encoder.pool_hidden(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(pooled, torch.full((4,), 2.0))
