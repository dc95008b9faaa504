"""NdClipModel: shapes, loss, heads, pooling, gradient checkpointing, construction from pretrained towers."""

import math

import pytest
import torch
from conftest import CAPTIONS, random_images
from ndlinear import NdLinear
from transformers import AutoModel

from configuration_ndclip import NdClipConfig
from modeling_ndclip import NdClipModel, NdClipProjection
from ndclip.tiny_towers import tiny_config, tiny_text_config, tiny_vision_config


def test_output_shapes_and_symmetry(make_model, batch):
    model = make_model()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits_per_image.shape == (4, 4)
    torch.testing.assert_close(out.logits_per_image, out.logits_per_text.t())
    assert out.image_embeds.shape == out.text_embeds.shape == (4, model.config.projection_dim)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(4))
    assert out.vision_model_output.last_hidden_state.shape[0] == 4
    assert out.text_model_output.last_hidden_state.shape[:2] == batch["input_ids"].shape


def test_features_follow_clip_convention(make_model, batch):
    model = make_model()
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text_features = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        out = model(**batch)
    assert image_features.shape == text_features.shape == (4, model.config.projection_dim)
    torch.testing.assert_close(torch.nn.functional.normalize(image_features, dim=-1), out.image_embeds)
    torch.testing.assert_close(torch.nn.functional.normalize(text_features, dim=-1), out.text_embeds)


def test_loss_matches_hand_computation(make_model, batch):
    model = make_model()
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    logits = out.logits_per_text.double()
    n = logits.shape[0]
    text_to_image = -sum(logits[i, i] - torch.logsumexp(logits[i], dim=0) for i in range(n)) / n
    image_to_text = -sum(logits[i, i] - torch.logsumexp(logits[:, i], dim=0) for i in range(n)) / n
    assert out.loss.item() == pytest.approx(((text_to_image + image_to_text) / 2).item(), rel=1e-5)
    expected_scale = math.exp(model.config.logit_scale_init_value)
    cosine = out.text_embeds @ out.image_embeds.t()
    torch.testing.assert_close(out.logits_per_text, expected_scale * cosine)


# ----- the sigmoid (SigLIP) loss -------------------------------------------------------------------------------------


def test_a_sigmoid_model_has_a_learned_bias_in_its_logits_and_starts_as_siglip(make_model, batch, processor):
    model = make_model(contrastive_loss="sigmoid")
    assert model.config.logit_scale_init_value == pytest.approx(math.log(10))  # SigLIP's temperature
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10.0
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)
        out = model(**batch, return_loss=True)
    cosine = out.text_embeds @ out.image_embeds.t()
    torch.testing.assert_close(out.logits_per_text, 10.0 * cosine - 1.5)
    assert out.logit_bias.item() == -1.5
    signs = 2 * torch.eye(4) - 1
    expected = -torch.nn.functional.logsigmoid(signs * out.logits_per_text).sum() / 4
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(model.logits_to_probabilities(out.logits_per_image), torch.sigmoid(out.logits_per_image))

    # Two captions per image (image-major): each is a positive pair of its image.
    texts = processor(text=[c for c in CAPTIONS[:4] for _ in range(2)], return_tensors="pt")
    with torch.no_grad():
        out = model(**texts, pixel_values=batch["pixel_values"], return_loss=True)
    signs = 2 * torch.eye(4).repeat_interleave(2, dim=0) - 1
    expected = -torch.nn.functional.logsigmoid(signs * out.logits_per_text).sum() / 4
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_softmax_model_is_unchanged_and_its_probabilities_sum_to_one(make_model, batch):
    model = make_model()
    assert model.config.contrastive_loss == "softmax" and model.logit_bias is None
    assert "logit_bias" not in model.state_dict()
    with torch.no_grad():
        out = model(**batch)
    assert out.logit_bias is None and len(out.to_tuple()) == 7, "a softmax model's tuple output keeps its fields"
    probabilities = model.logits_to_probabilities(out.logits_per_image)
    torch.testing.assert_close(probabilities, out.logits_per_image.softmax(dim=-1))


def test_contrastive_loss_choices_and_the_temperature_given():
    assert NdClipConfig(contrastive_loss="sigmoid", logit_scale_init_value=2.0).logit_scale_init_value == 2.0
    assert NdClipConfig().logit_scale_init_value == pytest.approx(math.log(1 / 0.07))
    with pytest.raises(ValueError, match=r"unknown `contrastive_loss` 'hinge': choose one of 'softmax', 'sigmoid'"):
        NdClipConfig(contrastive_loss="hinge")


def test_logit_scale_is_clamped_at_ln_100(make_model, batch):
    model = make_model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        out = model(**batch)
    cosine = out.text_embeds @ out.image_embeds.t()
    torch.testing.assert_close(out.logits_per_text, 100.0 * cosine)


def test_heads_are_ndlinear_and_much_smaller_than_linear(make_model):
    model = make_model()
    assert isinstance(model.visual_projection.ndlinear, NdLinear)
    assert isinstance(model.text_projection.ndlinear, NdLinear)
    # At the default size: 768 -> 256, as the grids 24 x 32 -> 16 x 16 (one small linear map per axis).
    config = NdClipConfig()
    nd = NdClipProjection(768, 256, "ndlinear", config.vision_input_grid, config.projection_grid)
    linear = NdClipProjection(768, 256, "linear", config.vision_input_grid, config.projection_grid)
    assert sum(p.numel() for p in nd.parameters()) == 928
    assert sum(p.numel() for p in linear.parameters()) == 196_864


def test_linear_baseline_head(make_model, batch):
    model = make_model(projection_type="linear")
    assert isinstance(model.visual_projection.linear, torch.nn.Linear)
    assert not hasattr(model.visual_projection, "ndlinear")
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert out.logits_per_image.shape == (4, 4) and torch.isfinite(out.loss)


def test_ndlinear_head_is_a_kronecker_factored_linear_map():
    """The head applies one linear map per grid axis: equal to a (much larger) dense map built from the factors."""
    torch.manual_seed(0)
    head = NdClipProjection(12, 6, "ndlinear", [3, 4], [2, 3])
    x = torch.randn(5, 12)
    first, second = head.ndlinear.align_layers
    grid = x.view(5, 3, 4)
    # Exact form: bias of the first axis passes through the second layer, then the second bias is added.
    step = torch.einsum("bij,ki->bkj", grid, first.weight) + first.bias[None, :, None]
    expected = torch.einsum("bkj,lj->bkl", step, second.weight) + second.bias[None, None, :]
    torch.testing.assert_close(head(x), expected.reshape(5, 6))


def test_mean_pooling_ignores_padding(make_model, processor):
    model = make_model(text_pooling="mean")
    short = processor(text=["a dog runs"], return_tensors="pt")
    padded = processor.tokenizer(["a dog runs"], padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        a = model.get_text_features(**short).pooler_output
        b = model.get_text_features(**padded).pooler_output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cls_pooling_differs_from_mean(make_model, batch):
    with torch.no_grad():
        mean = make_model(text_pooling="mean").get_text_features(batch["input_ids"], batch["attention_mask"])
        cls = make_model(text_pooling="cls").get_text_features(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(mean.pooler_output, cls.pooler_output)


def test_forward_tolerates_tokenizer_and_pipeline_extras(make_model, batch):
    model = make_model()
    with torch.no_grad():
        plain = model(**batch).logits_per_image
        extra = model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]), some_pipeline_key=1)
    torch.testing.assert_close(plain, extra.logits_per_image)


def test_one_modality_alone(make_model, batch):
    model = make_model()
    with torch.no_grad():
        images_only = model(pixel_values=batch["pixel_values"])
        text_only = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert images_only.image_embeds.shape[0] == 4 and images_only.logits_per_image is None
    assert text_only.text_embeds.shape[0] == 4 and text_only.image_embeds is None


def test_return_dict_false_gives_a_tuple(make_model, batch):
    model = make_model()
    with torch.no_grad():
        out = model(**batch, return_loss=True, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0


def test_get_features_return_tuples_when_return_dict_is_false(make_model, batch):
    """As transformers' `CLIPModel`: `return_dict=False` (argument or config) gives `to_tuple()` of the output,
    `(last_hidden_state, projected pooler_output)` here."""
    model = make_model()
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        image_dict = model.get_image_features(pixel_values=batch["pixel_values"])
        text_dict = model.get_text_features(**text)
        image_tuple = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=False)
        text_tuple = model.get_text_features(**text, return_dict=False)
    for as_dict, as_tuple in ((image_dict, image_tuple), (text_dict, text_tuple)):
        assert type(as_tuple) is tuple and len(as_tuple) == 2
        torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(as_tuple[1], as_dict.pooler_output, rtol=0, atol=0)


def test_config_return_dict_false_gives_tuples_everywhere(make_model, batch):
    model = make_model()
    model.config.return_dict = False
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert type(model(**batch)) is tuple
        assert type(model.get_image_features(pixel_values=batch["pixel_values"])) is tuple
        assert type(model.get_text_features(**text)) is tuple
        # An explicit argument wins over the config, as in transformers.
        assert model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output.dim() == 2
        assert model(**batch, return_dict=True).logits_per_image.shape == (4, 4)


def test_gradient_checkpointing_gives_same_loss_and_gradients(processor, batch):
    from ndclip.tiny_towers import tiny_config

    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        config = tiny_config(len(processor.tokenizer))
        config.text_config.dropout = config.text_config.attention_dropout = 0.0
        model = NdClipModel(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.vision_model.modules())
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.text_model.modules())
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    torch.testing.assert_close(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) > 20
    for name in grads_plain:
        torch.testing.assert_close(grads_plain[name], grads_ckpt[name], msg=name)


def zero_init_config(vocab_size: int, **overrides):
    """transformers' `_config_zero_init`: every init scale (heads' `initializer_factor`, the towers'
    `initializer_range`) near zero, so a parameter that its model's init reaches has mean 0 (weights, biases) or 1
    (norm weights), and one that it misses keeps torch's default init and shows up."""
    config = tiny_config(vocab_size, initializer_factor=1e-10, **overrides)
    for sub_config in (config.vision_config, config.text_config):
        sub_config.initializer_range = 1e-10
    return config


@pytest.mark.parametrize("projection_type", ["ndlinear", "linear"])
def test_every_parameter_is_initialised_by_the_model(processor, projection_type):
    torch.manual_seed(0)
    model = NdClipModel(zero_init_config(len(processor.tokenizer), projection_type=projection_type))
    for name, param in model.named_parameters():
        if name == "logit_scale":
            assert param.item() == pytest.approx(model.config.logit_scale_init_value), name
        else:
            assert ((param.mean() * 1e9).round() / 1e9).item() in (0.0, 1.0), name


def head_linears(model: NdClipModel) -> list[torch.nn.Linear]:
    heads = (model.visual_projection, model.text_projection)
    return [layer for head in heads for layer in head.modules() if isinstance(layer, torch.nn.Linear)]


def assert_heads_follow_documented_init(model: NdClipModel, tolerance: float) -> None:
    """Each head `nn.Linear` is normal with std `in_features ** -0.5 * initializer_factor`, with a zero bias: the
    weights divided by their documented std, pooled over all head layers, have mean 0 and std 1."""
    layers = head_linears(model)
    assert layers
    scaled = torch.cat(
        [layer.weight.flatten() / (layer.in_features**-0.5 * model.config.initializer_factor) for layer in layers]
    )
    assert torch.isfinite(scaled).all()
    assert abs(scaled.mean().item()) < tolerance, scaled.mean().item()
    assert abs(scaled.std().item() - 1.0) < tolerance, scaled.std().item()
    for layer in layers:
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


@pytest.mark.parametrize("projection_type", ["ndlinear", "linear"])
def test_fresh_heads_follow_the_documented_init(make_model, projection_type):
    # initializer_factor 3: torch's default init (uniform, std in_features ** -0.5 / sqrt(3)) is 5x off. Projection
    # 256 (16 x 16) gives the NdLinear heads a few hundred weights to estimate the mean and std from.
    model = make_model(projection_type=projection_type, projection_dim=256, initializer_factor=3.0)
    assert_heads_follow_documented_init(model, tolerance=0.2)


def test_towers_have_no_pooler(make_model):
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    assert not any("pooler" in n for n in names)


def test_from_vision_text_pretrained_keeps_tower_weights(tmp_path, processor, batch):
    torch.manual_seed(1)
    vision = AutoModel.from_config(tiny_vision_config())  # with its pooler, as a Hub ViT checkpoint may have
    text = AutoModel.from_config(tiny_text_config(len(processor.tokenizer)))
    vision.save_pretrained(tmp_path / "vision")
    text.save_pretrained(tmp_path / "text")

    model = NdClipModel.from_vision_text_pretrained(
        str(tmp_path / "vision"), str(tmp_path / "text"), projection_dim=16, text_pooling="cls"
    )
    assert model.config.projection_dim == 16 and model.config.text_pooling == "cls"
    for name, tensor in vision.state_dict().items():
        if not name.startswith("pooler"):
            torch.testing.assert_close(model.vision_model.state_dict()[name], tensor, msg=name)
    for name, tensor in text.state_dict().items():
        torch.testing.assert_close(model.text_model.state_dict()[name], tensor, msg=name)
    assert isinstance(model.visual_projection.ndlinear, NdLinear)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**batch, return_loss=True).loss)


def test_sdpa_attention_matches_eager(processor, batch):
    from ndclip.tiny_towers import tiny_config

    config = tiny_config(len(processor.tokenizer))
    torch.manual_seed(0)
    eager = NdClipModel(config).eval()
    eager.set_attn_implementation("eager")
    sdpa = NdClipModel(tiny_config(len(processor.tokenizer))).eval()
    sdpa.load_state_dict(eager.state_dict())
    sdpa.set_attn_implementation("sdpa")
    assert sdpa.config.vision_config._attn_implementation == "sdpa"
    with torch.no_grad():
        expected, actual = eager(**batch).logits_per_image, sdpa(**batch).logits_per_image
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# ----- bad input --------------------------------------------------------------------------------------------------


def test_grid_that_does_not_fit_names_the_numbers():
    with pytest.raises(ValueError, match=r"projection_grid.*\[16, 15\].*240.*256"):
        NdClipConfig(projection_grid=[16, 15])
    with pytest.raises(ValueError, match=r"vision_input_grid.*\[20, 32\].*640.*768"):
        NdClipConfig(vision_input_grid=[20, 32])
    with pytest.raises(ValueError, match=r"text_input_grid.*3 axes.*projection_grid.*2"):
        NdClipConfig(text_input_grid=[8, 8, 12])


def test_unknown_pooling_or_head_is_named():
    with pytest.raises(ValueError, match=r"text_pooling.*'max'.*'cls', 'mean'"):
        NdClipConfig(text_pooling="max")
    with pytest.raises(ValueError, match=r"vision_pooling.*'avg'"):
        NdClipConfig(vision_pooling="avg")
    with pytest.raises(ValueError, match=r"projection_type.*'mlp'"):
        NdClipConfig(projection_type="mlp")


def test_forward_without_text_or_images(make_model):
    with pytest.raises(ValueError, match="neither `input_ids`.*nor `pixel_values`"):
        make_model()()


def test_wrong_number_of_channels_is_named(make_model):
    model = make_model()
    with pytest.raises(ValueError, match=r"`pixel_values` has 1 channels.*expects 3.*RGB"):
        model(pixel_values=torch.randn(2, 1, 30, 30))
    with pytest.raises(ValueError, match=r"`pixel_values` must be a 4-D batch"):
        model(pixel_values=torch.randn(3, 30, 30))


def test_loss_needs_both_modalities_and_as_many_captions_for_every_image(make_model, batch):
    model = make_model()
    with pytest.raises(ValueError, match="needs both texts"):
        model(pixel_values=batch["pixel_values"], return_loss=True)
    text = {"input_ids": batch["input_ids"][:3], "attention_mask": batch["attention_mask"][:3]}
    with pytest.raises(ValueError, match="a batch of 3 texts and 2 images: the loss needs the same number of captions"):
        model(**text, pixel_values=batch["pixel_values"][:2], return_loss=True)


def test_processor_converts_non_rgb_images(processor, make_model):
    model = make_model()
    for mode in ("L", "RGBA", "CMYK"):
        pixels = processor(images=random_images(2, mode=mode), return_tensors="pt")["pixel_values"]
        assert pixels.shape == (2, 3, 30, 30), mode
        with torch.no_grad():
            assert model(pixel_values=pixels).image_embeds.shape == (2, 16)


def test_captions_fixture_is_used(processor):
    ids = processor(text=CAPTIONS, return_tensors="pt")["input_ids"]
    assert (ids == processor.tokenizer.unk_token_id).sum() == 0  # the tokenizer was trained on these captions


def test_forward_from_precomputed_tower_features_equals_the_full_forward(make_model, batch):
    """Frozen towers train from cached pooled features: the heads and loss must see exactly what the towers give."""
    model = make_model()
    with torch.no_grad():
        full = model(**batch, return_loss=True)
        image_features = model._encode_image(batch["pixel_values"]).pooler_output
        text_features = model._encode_text(batch["input_ids"], batch["attention_mask"]).pooler_output
        cached = model(image_tower_features=image_features, text_tower_features=text_features, return_loss=True)
    torch.testing.assert_close(cached.logits_per_image, full.logits_per_image)
    torch.testing.assert_close(cached.loss, full.loss)
    with pytest.raises(ValueError, match="either `pixel_values` or `image_tower_features`"):
        model(pixel_values=batch["pixel_values"], image_tower_features=image_features)
