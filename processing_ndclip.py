"""NdCLIP processor: the vision tower's image processor and the text tower's tokenizer behind one call."""

from transformers import AutoImageProcessor, AutoTokenizer
from transformers.processing_utils import ProcessorMixin


class NdClipProcessor(ProcessorMixin):
    r"""
    Prepares images and texts for [`NdClipModel`] in one call.

    `processor(text=..., images=..., return_tensors="pt")` returns one batch with `input_ids`, `attention_mask` and
    `pixel_values`; either part alone works too. Texts are padded to the longest in the batch (not to a fixed
    length) and truncated to the tokenizer's `model_max_length`. Images are converted to RGB first, so grayscale,
    RGBA and CMYK pictures work; the setting is stored in the image processor itself, so the
    `zero-shot-image-classification` pipeline (which loads the image processor alone) converts them too.

    Args:
        image_processor: the vision tower's image processor (e.g. `ViTImageProcessor` of
            `google/vit-base-patch16-224`).
        tokenizer: the text tower's tokenizer (e.g. the `distilbert-base-uncased` tokenizer).
    """

    text_kwargs = {"padding": True, "truncation": True}
    images_kwargs = {"do_convert_rgb": True}

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        if image_processor is None or tokenizer is None:
            raise ValueError("NdClipProcessor needs both an `image_processor` and a `tokenizer`")
        image_processor.do_convert_rgb = True
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_towers(cls, vision_name_or_path: str, text_name_or_path: str, **kwargs) -> "NdClipProcessor":
        """The processor for an NdCLIP built with `NdClipModel.from_vision_text_pretrained` from the same towers:
        the image processor of the vision tower and the tokenizer of the text tower (Hub ids or folders)."""
        image_processor = AutoImageProcessor.from_pretrained(vision_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(text_name_or_path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer)


NdClipProcessor.register_for_auto_class()  # save_pretrained copies this file and maps AutoProcessor to it

__all__ = ["NdClipProcessor"]
