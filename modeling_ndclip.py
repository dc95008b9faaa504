"""NdCLIP: a CLIP-style image-text dual encoder whose projection heads are `NdLinear` layers.

Everything the forward pass needs is in this file: the pooling of each tower's `last_hidden_state`, the projection
heads, the contrastive loss and the model itself. It is copied next to `config.json` by `save_pretrained`, so that
`AutoModel.from_pretrained(repo, trust_remote_code=True)` can load it from the Hub.
"""

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from ndlinear import NdLinear
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel, ZeroShotImageClassificationPipeline
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

try:  # loaded from the Hub, the model files are one package
    from .configuration_ndclip import CONTRASTIVE_LOSSES, NdClipConfig, tower_width
except ImportError:  # imported as top-level modules in this repository
    from configuration_ndclip import CONTRASTIVE_LOSSES, NdClipConfig, tower_width

logger = logging.get_logger(__name__)


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy where row i's correct column is i (the matching pair sits on the diagonal)."""
    return nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def caption_image_index(num_texts: int, num_images: int, device=None) -> torch.Tensor:
    """The image each text belongs to in a batch of `captions_per_image` captions per image, image-major (the
    captions of image 0 first): text j is a caption of image `j // captions_per_image`."""
    if num_images < 1 or num_texts % num_images:
        raise ValueError(
            f"a batch of {num_texts} texts and {num_images} images: the loss needs the same number of captions "
            "(1 or more) for every image, image-major (the captions of image 0 first)"
        )
    return torch.arange(num_texts, device=device) // (num_texts // num_images)


def ndclip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss: the mean of the text->image and image->text cross-entropies.

    `logits_per_text` is `[texts, images]`; with several captions per image (texts = N x images, image-major), text
    -> image stays one-positive (the caption's own image), and image -> text is a cross-entropy against a target
    spread uniformly over the image's N captions. Every caption of an image is a positive, none is a negative of its
    own image: the image is asked to rank all of them above every other image's captions and alike among themselves
    (the floor of the loss is the target's entropy, ln N, at equal probabilities; a caption scored above its siblings
    is pulled back towards them, one below is pulled up). With one caption per image it is exactly CLIP's loss."""
    num_texts, num_images = logits_per_text.shape
    owner = caption_image_index(num_texts, num_images, logits_per_text.device)
    text_to_image = nn.functional.cross_entropy(logits_per_text, owner)
    if num_texts == num_images:
        return (text_to_image + contrastive_loss(logits_per_text.t())) / 2.0
    positives = owner[None, :] == torch.arange(num_images, device=owner.device)[:, None]
    target = positives.to(logits_per_text.dtype) / (num_texts // num_images)
    image_to_text = nn.functional.cross_entropy(logits_per_text.t(), target)
    return (text_to_image + image_to_text) / 2.0


def sigmoid_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, text) pair is a binary decision, positive when the text is a
    caption of the image (with several captions per image, each of them), negative otherwise; the logits already hold
    the learned bias. As in the SigLIP paper (and open_clip's `SigLipLoss`), the sum over all pairs divided by the
    number of images."""
    num_texts, num_images = logits_per_text.shape
    owner = caption_image_index(num_texts, num_images, logits_per_text.device)
    signs = 2.0 * (owner[:, None] == torch.arange(num_images, device=owner.device)[None, :]).to(logits_per_text) - 1
    return -nn.functional.logsigmoid(signs * logits_per_text).sum() / num_images


def pair_loss(logits_per_text: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """The loss `kind` (`config.contrastive_loss`) of a batch's `[texts, images]` logits (the bias included for
    `"sigmoid"`), captions image-major."""
    if kind == "sigmoid":
        return sigmoid_loss(logits_per_text)
    if kind == "softmax":
        return ndclip_loss(logits_per_text)
    raise ValueError(f"unknown contrastive loss {kind!r}: choose one of {', '.join(map(repr, CONTRASTIVE_LOSSES))}")


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per example from a tower's `last_hidden_state`.

    `hidden` is `[batch, tokens, width]`, or a `[batch, width, height, width]` feature map of a convolutional
    tower, which is read as `height * width` tokens. `"cls"` takes the first token; `"mean"` averages the tokens
    that `attention_mask` marks as real (all of them when there is no mask).
    """
    if hidden.dim() == 4:
        if pooling == "cls":
            raise ValueError(
                "pooling 'cls' needs a sequence of tokens, but this tower returns a feature map of shape "
                f"{tuple(hidden.shape)}: set `vision_pooling='mean'`"
            )
        hidden = hidden.flatten(2).transpose(1, 2)
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class NdClipProjection(nn.Module):
    """Maps a tower's pooled vector (`[batch, width]`) into the shared space (`[batch, projection_dim]`).

    With `projection_type="ndlinear"` the vector is viewed as a grid (`input_grid`, e.g. 24 x 32) and
    `ndlinear.NdLinear` applies one small linear layer per axis to reach `output_grid` (e.g. 16 x 16): 928
    parameters instead of the 196,864 of a 768 -> 256 `nn.Linear`. With `"linear"` it is that `nn.Linear`.
    The submodule is named after the type (`ndlinear` / `linear`), so checkpoint keys say which head they hold.
    """

    def __init__(self, width: int, projection_dim: int, projection_type: str, input_grid, output_grid):
        super().__init__()
        self.input_grid = tuple(input_grid)
        if projection_type == "ndlinear":
            self.ndlinear = NdLinear(tuple(input_grid), tuple(output_grid))
        else:
            self.linear = nn.Linear(width, projection_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "linear"):
            return self.linear(pooled)
        return self.ndlinear(pooled.reshape(pooled.shape[0], *self.input_grid)).flatten(1)


def build_tower(config, pretrained_name_or_path: str | None = None, **kwargs) -> PreTrainedModel:
    """An `AutoModel` tower, from its config or from pretrained weights, without its pooler.

    NdCLIP pools `last_hidden_state` itself, so a pooler (ViT's is untrained in `google/vit-base-patch16-224`)
    would be dead weight: it would stay in the checkpoint, and DDP would fail on its unused parameters.
    """
    model_class = AutoModel._model_mapping[type(config)]
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    if pretrained_name_or_path is None:
        return AutoModel.from_config(config, **kwargs)
    return AutoModel.from_pretrained(pretrained_name_or_path, config=config, **kwargs)


@dataclass
class NdClipOutput(ModelOutput):
    """
    Output of [`NdClipModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, returned when `return_loss=True`):
            The contrastive loss of `config.contrastive_loss` over the batch (see `pair_loss`).
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of each image with each text (`logit_scale.exp() * cos`, plus `logit_bias` for
            a sigmoid model): `model.logits_to_probabilities` turns them into probabilities.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`):
            L2-normalised text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised image embeddings.
        logit_scale (`torch.FloatTensor` scalar):
            The temperature the logits were scaled by, `exp(min(logit_scale, ln 100))`. Returned so that a training
            loop can compute the loss over a batch gathered from several processes with the very scale the model
            used (under FSDP the parameter itself is only reachable inside `forward`).
        text_model_output (`BaseModelOutputWithPooling`):
            The text tower's output; its `pooler_output` is the pooled, unprojected vector.
        vision_model_output (`BaseModelOutputWithPooling`):
            The vision tower's output; its `pooler_output` is the pooled, unprojected vector.
        logit_bias (`torch.FloatTensor` scalar, sigmoid models only):
            The bias added to the logits, returned for the same reason as `logit_scale`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    logit_bias: torch.FloatTensor | None = None  # last, so that a softmax model's tuple output keeps its positions

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


class NdClipPreTrainedModel(PreTrainedModel):
    config_class = NdClipConfig
    base_model_prefix = "ndclip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module):
        """Heads: each `nn.Linear` normal with std `in_features ** -0.5 * initializer_factor` (per axis for NdLinear,
        so a head keeps the scale of its input), zero bias; `logit_scale` at `logit_scale_init_value`.

        transformers calls this once per module, leaves first, and hands the towers' modules to the towers' own
        `_init_weights` (they are `PreTrainedModel`s): so every `nn.Linear` that reaches this method is a head layer.
        The heads are initialised at their `nn.Linear`s, not at `NdClipProjection`, because transformers skips a
        module without parameters of its own (as `NdClipProjection` is) in custom code. The `init` functions leave
        loaded weights alone, so `from_pretrained` initialises exactly the missing or resized ones."""
        if isinstance(module, nn.Linear):
            std = module.in_features**-0.5 * self.config.initializer_factor
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        elif isinstance(module, NdClipModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, self.config.logit_bias_init_value)


class NdClipModel(NdClipPreTrainedModel):
    """
    NdCLIP: a vision tower and a text tower (any `AutoModel` with a `last_hidden_state`), each pooled and projected
    by an NdLinear head into a shared, L2-normalised embedding space, trained with CLIP's softmax loss or SigLIP's
    sigmoid loss (`config.contrastive_loss`).

    Use `get_image_features` / `get_text_features` for embeddings, `forward` for similarity logits (and the loss
    with `return_loss=True`), and `from_vision_text_pretrained` to start from pretrained towers.
    """

    def __init__(
        self,
        config: NdClipConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.config.check_head_fields()  # again: `from_pretrained` kwargs are set after the config was checked
        self.vision_model = vision_model if vision_model is not None else build_tower(config.vision_config)
        self.text_model = text_model if text_model is not None else build_tower(config.text_config)
        # The towers read the shared sub-configs, so attention-implementation switches reach them.
        self.config.vision_config._attn_implementation = self.vision_model.config._attn_implementation
        self.config.text_config._attn_implementation = self.text_model.config._attn_implementation
        self.vision_model.config = self.config.vision_config
        self.text_model.config = self.config.text_config

        self.visual_projection = NdClipProjection(
            tower_width(config.vision_config),
            config.projection_dim,
            config.projection_type,
            config.vision_input_grid,
            config.projection_grid,
        )
        self.text_projection = NdClipProjection(
            tower_width(config.text_config),
            config.projection_dim,
            config.projection_type,
            config.text_input_grid,
            config.projection_grid,
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        # SigLIP's learned bias: a sigmoid model's only extra weight (a softmax model's checkpoints stay as they were).
        bias = config.contrastive_loss == "sigmoid"
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value)) if bias else None
        # Which optional inputs the text tower takes (BERT takes token_type_ids, DistilBERT does not).
        self._text_tower_args = set(inspect.signature(self.text_model.forward).parameters)
        self.post_init()

    # ----- towers -----------------------------------------------------------------------------------------------

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        expected = getattr(self.config.vision_config, "num_channels", None)
        if pixel_values.dim() != 4:
            raise ValueError(
                "`pixel_values` must be a 4-D batch [batch, channels, height, width], got shape "
                f"{tuple(pixel_values.shape)}"
            )
        if expected is not None and pixel_values.shape[1] != expected:
            target = "RGB" if expected == 3 else f"{expected} channels"
            raise ValueError(
                f"`pixel_values` has {pixel_values.shape[1]} channels (shape {tuple(pixel_values.shape)}) but the "
                f"vision tower expects {expected}: convert images to {target} (the NdCLIP processor does this) before "
                "calling the model"
            )

    def _encode_image(self, pixel_values: torch.Tensor, **tower_kwargs) -> BaseModelOutputWithPooling:
        """Run the vision tower and pool; `pooler_output` holds the pooled, unprojected vector."""
        self._check_pixel_values(pixel_values)
        outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **tower_kwargs)
        pooled = pool_hidden_states(outputs.last_hidden_state, None, self.config.vision_pooling)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=pooled,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def _encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **tower_kwargs,
    ) -> BaseModelOutputWithPooling:
        optional = {"token_type_ids": token_type_ids, "position_ids": position_ids}
        extra = {k: v for k, v in optional.items() if v is not None and k in self._text_tower_args}
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra, **tower_kwargs
        )
        pooled = pool_hidden_states(outputs.last_hidden_state, attention_mask, self.config.text_pooling)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=pooled,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    # ----- the public API, as in transformers' CLIPModel ------------------------------------------------------

    def get_image_features(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """The vision tower's output with `pooler_output` replaced by the projected (unnormalised) image
        embedding of shape `[batch, projection_dim]`, as `CLIPModel.get_image_features` does in transformers 5
        (a tuple of the fields that are set when `return_dict` or else `config.return_dict` is False)."""
        outputs = self._encode_image(pixel_values, **_tower_kwargs(kwargs))
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return self._as_dict_or_tuple(outputs, return_dict)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """The text tower's output with `pooler_output` replaced by the projected (unnormalised) text embedding
        of shape `[batch, projection_dim]` (a tuple as in `get_image_features` when `return_dict` is False).
        Tokenizer extras (`token_type_ids`) are accepted."""
        outputs = self._encode_text(
            input_ids,
            attention_mask,
            token_type_ids=kwargs.pop("token_type_ids", None),
            position_ids=kwargs.pop("position_ids", None),
            **_tower_kwargs(kwargs),
        )
        outputs.pooler_output = self.text_projection(outputs.pooler_output)
        return self._as_dict_or_tuple(outputs, return_dict)

    def _as_dict_or_tuple(self, output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        """The output as is, or as a tuple when `return_dict` (or, when it is None, `config.return_dict`) is False."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def clamped_logit_scale(self) -> torch.Tensor:
        """`exp(logit_scale)` with `logit_scale` clamped at `config.logit_scale_max_value` (ln 100)."""
        return self.logit_scale.clamp(max=self.config.logit_scale_max_value).exp()

    def logits_to_probabilities(self, logits_per_image: torch.Tensor) -> torch.Tensor:
        """Probabilities from `logits_per_image` (dim -1 = the texts or labels): a softmax over the labels for a
        softmax model (they sum to one), an independent sigmoid per (image, text) pair for a sigmoid model (each is
        the probability that the text matches the image)."""
        if self.config.contrastive_loss == "sigmoid":
            return torch.sigmoid(logits_per_image)
        return logits_per_image.softmax(dim=-1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        return_loss: bool = False,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_tower_features: torch.FloatTensor | None = None,
        text_tower_features: torch.FloatTensor | None = None,
        **kwargs,
    ) -> NdClipOutput | tuple:
        """
        Embed images and/or texts; with both, return the similarity logits (and the loss if `return_loss`).

        Args:
            input_ids, attention_mask (`torch.LongTensor` of shape `(text_batch, seq_len)`): tokenised texts.
            pixel_values (`torch.FloatTensor` of shape `(image_batch, channels, height, width)`): images as
                produced by the image processor.
            return_loss (`bool`): also return the contrastive loss of `config.contrastive_loss` (needs N texts per
                image, image-major: texts N*i ... N*i+N-1 are the captions of image i; N = 1 pairs image i with text i).
            token_type_ids, position_ids: passed to the text tower when it takes them (ignored by DistilBERT).
            output_attentions, output_hidden_states: passed to both towers.
            image_tower_features, text_tower_features (`torch.FloatTensor` of shape `(batch, tower_width)`): pooled
                tower outputs computed earlier (the `pooler_output` of `_encode_image` / `_encode_text`), used instead
                of running that tower; this is how frozen towers train from a feature cache.
            kwargs: other keys a tokenizer or pipeline adds are ignored (logged once).
        """
        if pixel_values is not None and image_tower_features is not None:
            raise ValueError("pass either `pixel_values` or `image_tower_features`, not both")
        if input_ids is not None and text_tower_features is not None:
            raise ValueError("pass either `input_ids` or `text_tower_features`, not both")
        if input_ids is None and pixel_values is None and image_tower_features is None and text_tower_features is None:
            raise ValueError(
                "NdClipModel.forward got neither `input_ids` (text) nor `pixel_values` (images): pass at least one"
            )
        if kwargs:
            logger.warning_once(f"NdClipModel.forward ignores the inputs {sorted(kwargs)}")
        tower_kwargs = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        tower_kwargs = {k: v for k, v in tower_kwargs.items() if v is not None}

        image_embeds = text_embeds = vision_outputs = text_outputs = None
        if pixel_values is not None:
            vision_outputs = self._encode_image(pixel_values, **tower_kwargs)
            image_tower_features = vision_outputs.pooler_output
        if image_tower_features is not None:
            image_embeds = nn.functional.normalize(self.visual_projection(image_tower_features), dim=-1)
        if input_ids is not None:
            text_outputs = self._encode_text(input_ids, attention_mask, token_type_ids, position_ids, **tower_kwargs)
            text_tower_features = text_outputs.pooler_output
        if text_tower_features is not None:
            text_embeds = nn.functional.normalize(self.text_projection(text_tower_features), dim=-1)

        logits_per_text = logits_per_image = loss = None
        logit_scale = self.clamped_logit_scale()
        # A tensor computed here, as `logit_scale` is: under FSDP the parameter is only materialised inside forward.
        logit_bias = self.logit_bias.clone() if self.logit_bias is not None else None
        if image_embeds is not None and text_embeds is not None:
            logits_per_text = logit_scale * text_embeds @ image_embeds.t()
            if logit_bias is not None:
                logits_per_text = logits_per_text + logit_bias
            logits_per_image = logits_per_text.t()
        if return_loss:
            if logits_per_text is None:
                raise ValueError("`return_loss=True` needs both texts (`input_ids`) and images (`pixel_values`)")
            loss = pair_loss(logits_per_text, self.config.contrastive_loss)

        output = NdClipOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            logit_scale=logit_scale,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            logit_bias=logit_bias,
        )
        return self._as_dict_or_tuple(output, return_dict)

    # ----- construction from pretrained towers ---------------------------------------------------------------

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_name_or_path: str, text_name_or_path: str, **kwargs
    ) -> "NdClipModel":
        """Build an NdCLIP from two pretrained towers (Hub ids or local folders), with freshly initialised heads.

        `kwargs` prefixed `vision_` / `text_` go to that tower's `from_pretrained` (e.g. `vision_revision`,
        `text_attn_implementation`); the rest set NdCLIP config fields (`projection_dim`, `projection_type`,
        `text_pooling`, ...). A tower's pooler is not loaded (NdCLIP pools itself).
        """
        tower_kwargs = {"vision": {}, "text": {}}
        for key in list(kwargs):
            for side in tower_kwargs:
                if key.startswith(side + "_") and key not in NdClipConfig.__dataclass_fields__:
                    tower_kwargs[side][key[len(side) + 1 :]] = kwargs.pop(key)
        vision_config = AutoConfig.from_pretrained(vision_name_or_path, **tower_kwargs["vision"])
        text_config = AutoConfig.from_pretrained(text_name_or_path, **tower_kwargs["text"])
        vision_model = build_tower(vision_config, vision_name_or_path, **tower_kwargs["vision"])
        text_model = build_tower(text_config, text_name_or_path, **tower_kwargs["text"])
        config = NdClipConfig.from_vision_text_configs(vision_model.config, text_model.config, **kwargs)
        return cls(config, vision_model=vision_model, text_model=text_model)

    # ----- small switches for common needs (as open_clip's lock_*_tower) -------------------------------------

    def lock_image_tower(self) -> None:
        """Freeze the vision tower (LiT-style training of the rest)."""
        self.vision_model.requires_grad_(False)

    def lock_text_tower(self) -> None:
        """Freeze the text tower."""
        self.text_model.requires_grad_(False)

    def head_parameter_counts(self) -> dict[str, int]:
        """Parameters of each projection head, and of a plain linear head of the same shape for comparison."""
        counts = {
            "visual_projection": sum(p.numel() for p in self.visual_projection.parameters()),
            "text_projection": sum(p.numel() for p in self.text_projection.parameters()),
        }
        p = self.config.projection_dim
        counts["linear_equivalent"] = sum(
            tower_width(c) * p + p for c in (self.config.vision_config, self.config.text_config)
        )
        return counts


class NdClipZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """transformers' zero-shot image classification pipeline, with the model's own probabilities
    (`NdClipModel.logits_to_probabilities`): a sigmoid per label for a model trained with the sigmoid loss, which the
    stock pipeline gives only to SigLIP's model types. A sigmoid model's config.json names it in `custom_pipelines`,
    so that `pipeline("zero-shot-image-classification", model=..., trust_remote_code=True)` runs it."""

    def postprocess(self, model_outputs):
        if getattr(self.model.config, "contrastive_loss", "softmax") != "sigmoid":
            return super().postprocess(model_outputs)
        candidate_labels = model_outputs.pop("candidate_labels")
        scores = self.model.logits_to_probabilities(model_outputs["logits"][0]).reshape(-1).tolist()
        ranked = sorted(zip(scores, candidate_labels), key=lambda pair: -pair[0])
        return [{"score": score, "label": label} for score, label in ranked]


def _tower_kwargs(kwargs: dict) -> dict:
    """The keyword arguments of `get_*_features` that the towers understand."""
    return {k: kwargs[k] for k in ("output_attentions", "output_hidden_states") if kwargs.get(k) is not None}


NdClipModel.register_for_auto_class("AutoModel")  # save_pretrained copies this file (and the config's)
AutoModel.register(NdClipConfig, NdClipModel, exist_ok=True)  # `AutoModel` without remote code where imported

__all__ = [
    "NdClipModel", "NdClipPreTrainedModel", "NdClipOutput", "ndclip_loss", "contrastive_loss", "sigmoid_loss",
    "pair_loss", "caption_image_index", "NdClipZeroShotImageClassificationPipeline",
]  # fmt: skip
