"""PickScore (Kirstain et al. 2023): a transformers CLIPModel fine-tuned on Pick-a-Pic.

score = logit_scale.exp() * cos(image embedding, text embedding), as in the authors' model card.
In transformers 5, `get_image_features` / `get_text_features` return output objects; the
projected embedding is `.pooler_output`.
"""

from __future__ import annotations

import torch

from diffalign.rewards.base import PreprocessConfig, RewardModel, register_reward

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _embedding(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def processor_preprocess_config(image_processor) -> PreprocessConfig:
    """Read the torch-path constants off a transformers CLIPImageProcessor, refusing what it cannot mirror."""
    size = image_processor.size
    shortest = size.get("shortest_edge") if hasattr(size, "get") else getattr(size, "shortest_edge", None)
    crop = image_processor.crop_size
    crop_h = crop.get("height") if hasattr(crop, "get") else crop.height
    crop_w = crop.get("width") if hasattr(crop, "get") else crop.width
    if shortest is None or not image_processor.do_center_crop or crop_h != crop_w or crop_h != shortest:
        raise NotImplementedError(
            f"image processor with size={size} crop={crop} is not the CLIP 'shortest edge + square centre crop' "
            "recipe that the tensor path mirrors")
    resample = int(image_processor.resample)
    if resample != 3:  # PIL.Image.BICUBIC
        raise NotImplementedError(f"image processor resample={resample}; only bicubic (3) is mirrored")
    return PreprocessConfig(size=int(shortest), mean=tuple(image_processor.image_mean),
                            std=tuple(image_processor.image_std), interpolation="bicubic")


class PickScore(RewardModel):
    name = "pickscore"

    def __init__(self, model, processor, **kwargs):
        pre = processor_preprocess_config(processor.image_processor)
        image_processor = processor.image_processor

        def pil_transform(im):
            return image_processor(images=[im], return_tensors="pt")["pixel_values"][0]

        super().__init__(pre, pil_transform=pil_transform, **kwargs)
        self.model = model
        self.processor = processor
        self._finish_init()

    def _score(self, pixel_values, prompts):
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = {k: v.to(self.device_) for k, v in text.items()}
        image = _embedding(self.model.get_image_features(pixel_values=pixel_values)).float()
        txt = _embedding(self.model.get_text_features(**text)).float()
        image = image / image.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp().float() * (image * txt).sum(dim=-1)


@register_reward("pickscore")
def pickscore(model_name_or_path: str = PICKSCORE_MODEL, processor_name_or_path: str | None = None,
              model=None, processor=None, **kwargs) -> PickScore:
    """From a hub id or local folder; or pass ready `model` (CLIPModel) and `processor` (CLIPProcessor).
    The processor defaults to the model folder when it holds one, else PickScore's own (laion ViT-H-14)."""
    import os

    from transformers import AutoProcessor, CLIPModel

    if model is None:
        model = CLIPModel.from_pretrained(model_name_or_path)
    if processor is None:
        if processor_name_or_path is None:
            local_proc = os.path.isdir(model_name_or_path) and any(
                os.path.exists(os.path.join(model_name_or_path, f))
                for f in ("processor_config.json", "preprocessor_config.json"))
            processor_name_or_path = model_name_or_path if local_proc else PICKSCORE_PROCESSOR
        processor = AutoProcessor.from_pretrained(processor_name_or_path)
    return PickScore(model, processor, **kwargs)
