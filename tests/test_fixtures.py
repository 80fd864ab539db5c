import numpy as np
import pytest
import torch

from diffalign.testing import tiny_sd3_pipeline, tiny_sdxl_pipeline
from diffalign.tokenization import clip_tokenizer


def test_offline_clip_tokenizer_matches_real_ids():
    tokenizer = clip_tokenizer()
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408
    ids = tokenizer("a red cube on a blue sphere").input_ids
    assert ids == [49406, 320, 736, 11353, 525, 320, 1746, 6987, 49407]
    padded = tokenizer("a cat", padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert padded.shape == (1, 77)


def _generate(pipe, seed=0):
    out = pipe(
        "a photo of a red cube",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def test_tiny_sdxl_pipeline_generates_64px():
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    # Same seed, same weights -> same image; another weight seed -> another image.
    np.testing.assert_allclose(images, _generate(tiny_sdxl_pipeline(seed=0)), atol=1e-6)
    assert not np.allclose(images, _generate(tiny_sdxl_pipeline(seed=1)), atol=1e-3)


@pytest.mark.parametrize("with_t5", [False, True])
def test_tiny_sd3_pipeline_generates_64px(with_t5):
    from diffusers import StableDiffusion3Pipeline

    pipe = tiny_sd3_pipeline(seed=0, with_t5=with_t5)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert (pipe.text_encoder_3 is not None) == with_t5
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
