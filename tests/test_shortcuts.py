"""Shortcuts around binary Linears: the shortcut maps, forward and backward against hand-computed references, the
gate that keeps a trained model's function, exact finalize, checkpoints and the bit account."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from surge_hf import (
    BinaryLinear,
    ShortcutLinear,
    SurgeConfig,
    SurgeLinear,
    SurgeViTConfig,
    SurgeViTForImageClassification,
    add_shortcuts,
    binarize,
    finalize,
    summary,
)
from surge_hf.shortcuts import shortcut

FULL_PRECISION = SurgeConfig(binarize_weights=False, binarize_activations=False, compensator="ste",
                             target_modules=["fc"])


def vit_config() -> ViTConfig:
    return ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
                     patch_size=4, num_channels=3, num_labels=3)


def randomise(module: ShortcutLinear, seed: int = 0) -> None:
    """Non-trivial gate, norm, slope and shifts (the initial values make several terms vanish)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (module.gate, module.prelu_slope, module.shift_in, module.shift_out, module.norm.weight,
                      module.norm.bias):
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))


def test_shortcut_repeats_for_expansion_and_averages_for_contraction():
    x = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    assert torch.equal(shortcut(x, "identity", 1), x)
    assert torch.equal(shortcut(x, "repeat", 2), torch.tensor([[1.0, 2.0, 3.0, 5.0, 1.0, 2.0, 3.0, 5.0]]))
    assert torch.equal(shortcut(x, "average", 2), torch.tensor([[1.5, 4.0]]))
    layers = {(4, 12): ("repeat", 3), (12, 4): ("average", 3), (4, 4): ("identity", 1)}
    for (n, m), kind in layers.items():
        wrapped = ShortcutLinear(SurgeLinear(n, m, surge_config=SurgeConfig()))
        assert (wrapped.shortcut_kind, wrapped.shortcut_factor) == kind


def test_width_without_integer_ratio_is_an_error():
    with pytest.raises(ValueError, match=r"A shortcut from 4 to 6 features needs one width to be a multiple"):
        ShortcutLinear(SurgeLinear(4, 6, surge_config=SurgeConfig()))


@pytest.mark.parametrize(("n", "m"), [(6, 6), (6, 12), (12, 6)])
def test_forward_matches_the_formula(n, m):
    torch.manual_seed(0)
    layer = ShortcutLinear(SurgeLinear(n, m, surge_config=SurgeConfig(compensator="ste")))
    randomise(layer)
    x = torch.randn(2, 3, n)
    z = layer.layer(x)
    s = x if n == m else (torch.cat([x, x], -1) if m > n else (x[..., 0::2] + x[..., 1::2]) / 2)
    v = z + layer.gate * (F.layer_norm(z, (m,), layer.norm.weight, layer.norm.bias) + s - z)
    t = v - layer.shift_in
    expected = torch.where(t > 0, t, layer.prelu_slope * t) + layer.shift_out
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n", "m"), [(4, 4), (4, 8), (8, 4)])
def test_backward_matches_finite_differences(n, m):
    """gradcheck in float64 with a full-precision inner layer (sign has no useful finite differences)."""
    torch.manual_seed(0)
    layer = ShortcutLinear(SurgeLinear(n, m, surge_config=FULL_PRECISION)).double()
    randomise(layer, seed=1)
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    params = [layer.gate, layer.prelu_slope, layer.shift_in, layer.shift_out, layer.norm.weight, layer.layer.weight]

    def function(inputs, *values):
        return torch.func.functional_call(layer, dict(zip(["gate", "prelu_slope", "shift_in", "shift_out",
                                                           "norm.weight", "layer.weight"], values)), (inputs,))

    assert torch.autograd.gradcheck(function, (x, *[p.detach().requires_grad_() for p in params]))


def test_gradient_reaches_the_binary_layer_and_its_auxiliary_weight():
    torch.manual_seed(0)
    layer = ShortcutLinear(SurgeLinear(8, 16, surge_config=SurgeConfig(compensator="surge")))
    x = torch.randn(4, 8, requires_grad=True)
    layer(x).square().sum().backward()
    for grad in (layer.layer.weight.grad, layer.layer.aux_weight.grad, layer.gate.grad, x.grad):
        assert grad is not None and grad.abs().sum() > 0


def test_gate_zero_keeps_the_function_of_a_trained_binary_model_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    recipe = SurgeConfig(target_modules=["0", "2"])
    plain = binarize(model, recipe)
    with torch.no_grad():
        plain[0].input_threshold.uniform_(-0.5, 0.5)
    x = torch.randn(5, 8)
    expected_train, expected_eval = plain.train()(x), plain.eval()(x)
    wrapped = add_shortcuts(plain, recipe.replace(shortcuts=True, shortcut_gate_init=0.0))
    assert isinstance(wrapped[0], ShortcutLinear) and isinstance(wrapped[2], ShortcutLinear)
    assert torch.equal(wrapped.train()(x), expected_train)
    assert torch.equal(wrapped.eval()(x), expected_eval)


def test_plain_vit_checkpoint_keeps_its_function_and_weights_at_step_zero(tmp_path):
    torch.manual_seed(0)
    ViTForImageClassification(vit_config()).save_pretrained(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    without = SurgeViTForImageClassification.from_pretrained(tmp_path, surge=SurgeConfig()).eval()
    with_shortcuts = SurgeViTForImageClassification.from_pretrained(
        tmp_path, surge=SurgeConfig(shortcuts=True, shortcut_gate_init=0.0)).eval()
    q_proj = with_shortcuts.vit.layers[0].attention.q_proj
    assert isinstance(q_proj, ShortcutLinear) and with_shortcuts.config.surge_config.shortcuts
    assert torch.equal(q_proj.layer.weight, without.vit.layers[0].attention.q_proj.weight)
    assert torch.equal(with_shortcuts(pixel_values=x).logits, without(pixel_values=x).logits)


def trained_shortcut_vit() -> SurgeViTForImageClassification:
    torch.manual_seed(0)
    config = SurgeViTConfig.from_vit_config(vit_config(), surge_config=SurgeConfig(shortcuts=True))
    model = SurgeViTForImageClassification(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        model(pixel_values=torch.randn(4, 3, 8, 8), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_fresh_model_starts_from_the_initial_values():
    recipe = SurgeConfig(shortcuts=True, shortcut_gate_init=0.25)
    config = SurgeViTConfig.from_vit_config(vit_config(), surge_config=recipe)
    fc1 = SurgeViTForImageClassification(config).vit.layers[0].mlp.fc1
    assert (fc1.shortcut_kind, fc1.shortcut_factor) == ("repeat", 2)
    assert torch.equal(fc1.gate, torch.full((32,), 0.25))
    assert torch.equal(fc1.prelu_slope, torch.ones(32)) and not fc1.shift_in.any() and not fc1.shift_out.any()


def test_finalize_is_exact_and_both_checkpoint_forms_reload(tmp_path):
    model = trained_shortcut_vit()
    x = torch.randn(3, 3, 8, 8)
    expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path / "train")
    model.save_pretrained(tmp_path / "packed", packed=True)
    reloaded = SurgeViTForImageClassification.from_pretrained(tmp_path / "train").eval()
    assert torch.equal(reloaded(pixel_values=x).logits, expected)
    packed = AutoModelForImageClassification.from_pretrained(tmp_path / "packed").eval()
    assert packed.is_packed and isinstance(packed.vit.layers[0].mlp.fc2.layer, BinaryLinear)
    assert torch.equal(packed(pixel_values=x).logits, expected)
    finalize(model)
    assert isinstance(model.vit.layers[0].attention.q_proj.layer, BinaryLinear)
    assert torch.equal(model(pixel_values=x).logits, expected)


def test_summary_counts_shortcut_norm_and_rprelu_in_full_precision():
    model = trained_shortcut_vit().finalize()
    rows = {row.name: row for row in summary(model).layers}
    fc2 = "vit.layers.0.mlp.fc2"
    assert rows[fc2].kind == "ShortcutLinear" and rows[fc2].full_precision_params == 4 * 16  # gate, slope, 2 shifts
    assert rows[f"{fc2}.norm"].full_precision_params == 2 * 16
    assert rows[f"{fc2}.layer"].binary_params == 32 * 16


def test_bad_shortcut_settings_fail_clearly():
    with pytest.raises(ValueError, match=r"SurgeConfig.shortcuts='yes' must be True or False"):
        SurgeConfig(shortcuts="yes")
    with pytest.raises(ValueError, match=r"SurgeConfig.shortcut_gate_init=nan must be a finite number"):
        SurgeConfig(shortcut_gate_init=float("nan"))
    convolutions = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"shortcuts=True needs binarized Linear layers"):
        binarize(convolutions, SurgeConfig(target_modules=["0"], shortcuts=True))
    model = binarize(nn.Sequential(nn.Linear(4, 4)), SurgeConfig(target_modules=["0"], shortcuts=True))
    with pytest.raises(ValueError, match=r"already has shortcuts"):
        add_shortcuts(model, SurgeConfig(shortcuts=True))
