"""NdCLIP configuration: two towers (vision, text) and the NdLinear projection heads that join them."""

import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

PROJECTION_TYPES = ("ndlinear", "linear")
POOLING_TYPES = ("cls", "mean")
CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
# The initial log temperature each loss starts from when `logit_scale_init_value` is not given: CLIP's 1 / 0.07 for
# the softmax loss, SigLIP's 10 for the sigmoid loss (with its bias at -10: the many negative pairs start near their
# target, so the first steps are not spent pushing them all down).
LOGIT_SCALE_INIT = {"softmax": math.log(1 / 0.07), "sigmoid": math.log(10.0)}
# Written into a sigmoid model's config.json: `pipeline("zero-shot-image-classification", model=folder_or_repo,
# trust_remote_code=True)` then runs this pipeline (modeling_ndclip.py), whose scores are the model's own
# probabilities (sigmoid). transformers' stock pipeline applies a sigmoid only to SigLIP's model types, a softmax to
# everything else, which is right for a softmax model: its config.json stays as it was.
SIGMOID_CUSTOM_PIPELINES = {
    "zero-shot-image-classification": {
        "impl": "modeling_ndclip.NdClipZeroShotImageClassificationPipeline",
        "pt": ["AutoModelForZeroShotImageClassification"],
        "type": "multimodal",
    }
}
# Written into every config.json, so that the Hub (and any folder) resolves the Auto classes to these files.
AUTO_MAP = {
    "AutoConfig": "configuration_ndclip.NdClipConfig",
    "AutoModel": "modeling_ndclip.NdClipModel",
    "AutoModelForZeroShotImageClassification": "modeling_ndclip.NdClipModel",
}


def factor_grid(size: int) -> list[int]:
    """The two-factor grid `[a, b]` with `a * b == size` and `a <= b` as close to square as possible.

    768 -> [24, 32], 256 -> [16, 16], 32 -> [4, 8]. A prime size gives `[1, size]`, which still works but
    gives NdLinear nothing to factorise: pass explicit grids in that case.
    """
    if size < 1:
        raise ValueError(f"cannot factor {size} into a grid: it must be a positive integer")
    a = math.isqrt(size)
    while size % a:
        a -= 1
    return [a, size // a]


def tower_width(config: PreTrainedConfig) -> int:
    """The width of a tower's `last_hidden_state`: `hidden_size` (ViT, BERT, DistilBERT via its attribute map),
    or the last stage of a hierarchical vision model (`hidden_sizes[-1]`, e.g. ConvNeXt)."""
    width = getattr(config, "hidden_size", None)
    if width is None and getattr(config, "hidden_sizes", None):
        width = config.hidden_sizes[-1]
    if width is None:
        raise ValueError(
            f"cannot tell the output width of a `{config.model_type}` tower: its config has neither `hidden_size` "
            "nor `hidden_sizes`"
        )
    return int(width)


class NdClipConfig(PreTrainedConfig):
    r"""
    Configuration of an [`NdClipModel`]: a CLIP-style dual encoder whose projection heads are `NdLinear` layers.

    Everything needed to rebuild the architecture lives here, so `config.json` alone is enough.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Full config of the image tower, with its own `model_type`. Defaults to `ViTConfig()`, which is the
            architecture of `google/vit-base-patch16-224` (hidden 768, 12 layers, image 224, patch 16). Any
            `AutoModel` vision tower whose output has a `last_hidden_state` works.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Full config of the text tower, with its own `model_type`. Defaults to `DistilBertConfig()`, the
            architecture of `distilbert-base-uncased` (dim 768, 6 layers, vocabulary 30522).
        projection_dim (`int`, *optional*, defaults to 256):
            Size of the shared image-text embedding space.
        projection_type (`str`, *optional*, defaults to `"ndlinear"`):
            `"ndlinear"`: each head is an `ndlinear.NdLinear` that views the tower width as a grid and maps it to a
            grid of `projection_dim` cells, one small linear layer per grid axis. `"linear"`: a plain `nn.Linear`
            (with bias) from tower width to `projection_dim`, the baseline every comparison needs.
        vision_input_grid (`list[int]`, *optional*):
            The grid the image tower's width is viewed as, e.g. `[24, 32]` for 768. Its product must equal the
            tower width. Defaults to the most square two-factor grid of the width. Only used with `"ndlinear"`.
        text_input_grid (`list[int]`, *optional*):
            Same as `vision_input_grid`, for the text tower.
        projection_grid (`list[int]`, *optional*):
            The grid of the shared embedding, e.g. `[16, 16]` for 256. Its product must equal `projection_dim` and it
            must have as many axes as the input grids. Defaults to the most square two-factor grid. `config.json`
            stores the resolved grid, so a new `projection_dim` for a saved model needs `projection_grid` too (`None`
            for the default): `from_pretrained(path, projection_dim=36, projection_grid=None,
            ignore_mismatched_sizes=True)`.
        vision_pooling (`str`, *optional*, defaults to `"cls"`):
            How one image vector is taken from the tower's `last_hidden_state`: `"cls"` (first token) or `"mean"`
            (mean over all tokens). NdCLIP pools itself because `google/vit-base-patch16-224`'s pooler is untrained;
            its CLS token is the one its classifier was trained on, hence the default.
        text_pooling (`str`, *optional*, defaults to `"mean"`):
            `"cls"` or `"mean"` (mean over real tokens, using the attention mask). DistilBERT has no pooler and its
            `[CLS]` was never trained as a sentence summary (no next-sentence objective), hence mean pooling.
        contrastive_loss (`str`, *optional*, defaults to `"softmax"`):
            The loss the model is trained with, and so how its logits read as probabilities. `"softmax"`: CLIP's
            symmetric cross-entropy; the logits are `exp(logit_scale) * cos` and a softmax over the labels gives
            probabilities that sum to one. `"sigmoid"`: SigLIP's pairwise sigmoid loss; the model has a learned scalar
            `logit_bias`, its logits are `exp(logit_scale) * cos + logit_bias`, and `sigmoid(logit)` is the probability
            that a text matches an image, independently for each pair (they need not sum to one).
            `NdClipModel.logits_to_probabilities` applies the right one.
        logit_bias_init_value (`float`, *optional*, defaults to -10.0):
            Initial value of `logit_bias` (sigmoid models only), as in the SigLIP paper.
        logit_scale_init_value (`float`, *optional*):
            Initial value of the learned log temperature `logit_scale`. Defaults to the loss's own: ln(1/0.07) = 2.6592
            for `"softmax"`, as in CLIP; ln(10) = 2.3026 for `"sigmoid"`, as in SigLIP. `config.json` stores the value
            used.
        logit_scale_max_value (`float`, *optional*, defaults to ln(100) = 4.6052):
            `logit_scale` is clamped to this value when used, so logits never exceed 100 x cosine similarity.
        initializer_factor (`float`, *optional*, defaults to 1.0):
            Multiplies the standard deviation used to initialise the projection heads: each of a head's linear layers
            (one per grid axis for NdLinear) is initialised normal with std `in_features ** -0.5 * initializer_factor`
            and a zero bias.

    Example:

    ```python
    >>> from configuration_ndclip import NdClipConfig
    >>> config = NdClipConfig(projection_dim=256)
    >>> config.vision_input_grid, config.text_input_grid, config.projection_grid
    ([24, 32], [24, 32], [16, 16])
    ```
    """

    model_type = "ndclip"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="distilbert"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 256
    projection_type: str = "ndlinear"
    vision_input_grid: list[int] | None = None
    text_input_grid: list[int] | None = None
    projection_grid: list[int] | None = None
    vision_pooling: str = "cls"
    text_pooling: str = "mean"
    contrastive_loss: str = "softmax"
    logit_bias_init_value: float = -10.0
    logit_scale_init_value: float | None = None
    logit_scale_max_value: float = math.log(100.0)
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        self.check_head_fields()

    def check_head_fields(self) -> None:
        """Check the loss, head and pooling choices, fill in what follows from the loss (its initial temperature, the
        pipeline of a sigmoid model) and the default grids, and check that the grids fit `projection_dim` and the
        tower widths.

        The model calls this again before it builds its heads: `from_pretrained(..., projection_dim=...)` sets fields
        after the config is built, and a grid stored for the old size must not silently keep the old head.
        """
        self._check_choice("contrastive_loss", self.contrastive_loss, CONTRASTIVE_LOSSES)
        if self.logit_scale_init_value is None:
            self.logit_scale_init_value = LOGIT_SCALE_INIT[self.contrastive_loss]
        if self.contrastive_loss == "sigmoid":
            self.custom_pipelines = {**SIGMOID_CUSTOM_PIPELINES, **(getattr(self, "custom_pipelines", None) or {})}
        self._check_choice("projection_type", self.projection_type, PROJECTION_TYPES)
        self._check_choice("vision_pooling", self.vision_pooling, POOLING_TYPES)
        self._check_choice("text_pooling", self.text_pooling, POOLING_TYPES)
        if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ValueError(f"`projection_dim` must be a positive integer, got {self.projection_dim!r}")
        self.projection_grid = self._resolve_grid("projection_grid", self.projection_grid, self.projection_dim)
        self.vision_input_grid = self._resolve_grid(
            "vision_input_grid", self.vision_input_grid, tower_width(self.vision_config)
        )
        self.text_input_grid = self._resolve_grid(
            "text_input_grid", self.text_input_grid, tower_width(self.text_config)
        )
        for name in ("vision_input_grid", "text_input_grid"):
            grid = getattr(self, name)
            if len(grid) != len(self.projection_grid):
                raise ValueError(
                    f"`{name}` {grid} has {len(grid)} axes but `projection_grid` {self.projection_grid} has "
                    f"{len(self.projection_grid)}: NdLinear maps each input axis to one output axis, so they must match"
                )

    @staticmethod
    def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise ValueError(f"unknown `{name}` {value!r}: choose one of {', '.join(map(repr, choices))}")

    @staticmethod
    def _resolve_grid(name: str, grid: list[int] | None, size: int) -> list[int]:
        if grid is None:
            return factor_grid(size)
        grid = [int(axis) for axis in grid]
        if math.prod(grid) != size or min(grid) < 1:
            raise ValueError(
                f"`{name}` {grid} has {math.prod(grid)} cells ({' x '.join(map(str, grid))}) but must have {size} "
                f"to match {'`projection_dim`' if name == 'projection_grid' else 'the tower width'} ({size})"
            )
        return grid

    @classmethod
    def from_vision_text_configs(
        cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs
    ) -> "NdClipConfig":
        """Build an NdCLIP config around two existing tower configs; `kwargs` set the NdCLIP fields."""
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)


NdClipConfig.register_for_auto_class()  # save_pretrained copies this file next to config.json
# Where this file is imported (this repository, a training script), `AutoConfig` knows `ndclip` without remote code.
AutoConfig.register("ndclip", NdClipConfig, exist_ok=True)

__all__ = ["NdClipConfig"]
