"""add_tera on whole models: targeting, freezing, summary, sharing, merged plain model, config errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from tera_tn import TeRASpec  # noqa: E402
from tera_tn.torch import TeRALayersConfig, TeRALinear, add_tera, merge_and_unload, tera_layers  # noqa: E402


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.v_proj = nn.Linear(32, 32)
        self.up = nn.Linear(32, 48)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        h = self.norm(x)
        return x + self.q_proj(h) * torch.sigmoid(self.v_proj(h)) + self.up(h)[..., :32]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(32, 4))


def test_targets_by_names_freeze_and_summary():
    model = _model()
    summary = add_tera(model, TeRALayersConfig(target_modules=["q_proj", "v_proj"], order=4, seed=1))
    names = [name for name, _ in tera_layers(model)]
    assert names == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".tera_lambda." in n for n in trainable)
    assert summary.trainable == 4 * TeRASpec.from_shape(32, 32, order=4).num_trainable
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.groups == 1  # one shape group: all four layers are 32×32
    assert summary.shared_factors == TeRASpec.from_shape(32, 32, order=4).num_frozen
    text = str(summary)
    assert "0.q_proj" in text and "trainable" in text and "shape group" in text
    banks = {id(layer.tera_bank) for _, layer in tera_layers(model)}
    assert len(banks) == 1


def test_target_regex_and_explicit_spec_per_shape():
    model = _model()
    spec48 = TeRASpec((6, 8), (4, 8), ranks=(3, 4, 2, 4))
    add_tera(model, TeRALayersConfig(target_modules=r"\d\.(up|q_proj)", specs={(48, 32): spec48}, order=4))
    layers = dict(tera_layers(model))
    assert set(layers) == {"0.up", "0.q_proj", "1.up", "1.q_proj"}
    assert layers["0.up"].spec == spec48
    assert len(layers["0.up"].tera_bank.specs()) == 2


def test_training_changes_output_and_merged_plain_model_matches():
    model = _model()
    add_tera(model, TeRALayersConfig(target_modules=["q_proj", "v_proj", "up"], order=4, alpha=2.0))
    x = torch.randn(16, 32)
    with torch.no_grad():
        y0 = model(x)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - 1.0).pow(2).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        y1 = model(x)
    assert not torch.allclose(y0, y1)
    plain = merge_and_unload(model)
    assert not list(tera_layers(plain))
    assert all(type(m) is not TeRALinear for m in plain.modules())
    assert not any("tera" in n for n, _ in plain.named_parameters()) and not any("tera" in n for n, _ in plain.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y1, rtol=1e-5, atol=1e-5)


def test_add_tera_errors():
    with pytest.raises(ValueError, match=r"matched no nn.Linear; the model's Linear layers: 0.q_proj"):
        add_tera(_model(), TeRALayersConfig(target_modules=["k_proj"]))
    model = _model()
    add_tera(model, TeRALayersConfig(target_modules=["q_proj"], order=4))
    with pytest.raises(ValueError, match="already has TeRA layers"):
        add_tera(model, TeRALayersConfig(target_modules=["q_proj"], order=4))
    with pytest.raises(TypeError, match="TeRALayersConfig"):
        add_tera(_model(), {"target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="no TeRA spec for a 32×32 layer with order=12"):
        add_tera(_model(), TeRALayersConfig(target_modules=["q_proj"], order=12))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(diag="side"), "diag must be one of"),
        (dict(strategy="einsum"), "strategy must be one of"),
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(dropout=1.0), "dropout must be a probability"),
        (dict(target_modules="(["), "not a valid regular expression"),
        (dict(target_modules=[]), "non-empty list"),
        (dict(factor_init="sobol"), "factor_init must be one of"),
        (dict(factor_dtype="float16"), "factor_dtype must be one of"),
        (dict(specs={(8, 8): TeRASpec((4, 4), (2, 4))}), r"specs\[\(8, 8\)\] is for shape \(16, 8\)"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TeRALayersConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    cfg = TeRALayersConfig(target_modules=["q"], ranks=[2, 2, 2, 2], order=4)
    hash(cfg)
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]
