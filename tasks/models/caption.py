"""The recaption role: a transformers image-text-to-text model (a VLM) that writes one caption per image, loaded
once per process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tasks.models.classify import _cached, model_config, pretrained
from tasks.models.embedding import to_rgb
from tasks.models.load import model_dtype, revision, to_device
from tasks.models.resolve import ModelLoadError, ResolvedModel

if TYPE_CHECKING:
    from PIL import Image

def check_captioner(resolved: ResolvedModel) -> None:
    """Before any work, from the config alone: a model transformers loads as image-text-to-text (LLaVA,
    PaliGemma, Qwen2.5-VL, GLM-4.1V, ...); a dual encoder or a classifier is refused with the reason."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if resolved.placeholder:
        raise ModelLoadError("the recaption role has no placeholder: name an image-text-to-text model, or leave "
                             "--recaption-model out to skip the step")
    config = model_config(resolved)
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelLoadError(
            f"model {resolved.name!r} (type {config.model_type!r}, architectures "
            f"{getattr(config, 'architectures', None)}) is not an image-text-to-text model: the recaption role needs "
            "a vision-language model that generates text from an image (AutoModelForImageTextToText)")


@dataclass
class Captioner:
    """Batched greedy generation: images and one prompt in, one stripped string per image out."""

    model: Any
    processor: Any
    device: str
    dtype: Any
    identity: dict  # {"name": str, "revision": str | None}

    def prompt_text(self, prompt: str) -> str:
        """The model's own chat template around one image and the prompt; a processor without a template gets
        its image token before the prompt (PaliGemma's convention)."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{getattr(self.processor, 'image_token', '<image>')}{prompt}"

    def generate(self, images: list[Image.Image], prompt: str, max_new_tokens: int) -> list[str]:
        import torch

        if not images:
            return []
        text = self.prompt_text(prompt)
        inputs = self.processor(images=[to_rgb(image) for image in images], text=[text] * len(images),
                                return_tensors="pt", padding=True)
        inputs = {k: to_device(v, self.device, self.dtype) for k, v in inputs.items() if torch.is_tensor(v)}
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            out = out[:, inputs["input_ids"].shape[1]:]  # a decoder-only model gives the prompt back first
        return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def load_captioner(resolved: ResolvedModel, device: str | None = None) -> Captioner:
    """The captioner for ``resolved``, loaded once per process per ``(name, device)``: fp32 on CPU, half precision
    on CUDA (bf16 where supported), the PIL image processor (no torchvision), prompts padded on the left."""
    return _cached("recaption", resolved, device, _load)


def _load(resolved: ResolvedModel, device: str) -> Captioner:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = model_dtype(device)
    model, processor, where, local_only = pretrained(resolved, "recaption model", AutoModelForImageTextToText,
                                                     AutoProcessor, {"dtype": dtype}, {"backend": "pil"})
    processor.tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    identity = {"name": resolved.name, "revision": revision(where, resolved.source, local_only)}
    return Captioner(model.to(device).eval(), processor, device, dtype, identity)


def is_out_of_memory(error: BaseException) -> bool:
    """A batch too big for the device (CUDA's OutOfMemoryError, or a RuntimeError saying so; MemoryError on CPU)."""
    import torch

    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_device_memory(device: str) -> None:
    """What a failed batch left in the CUDA cache, released before the smaller retry."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
