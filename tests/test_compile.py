"""``torch.compile(fullgraph=True)`` traces TeRA layers without graph breaks, and the compiled
layer gives the eager layer's output and gradients (every strategy and diagonal placement)."""

import pytest

torch = pytest.importorskip("torch")

from tera_tn import TeRASpec  # noqa: E402
from tera_tn.torch import TeRALinear  # noqa: E402


def _layer(diag: str, strategy: str) -> TeRALinear:
    torch.manual_seed(0)
    # 40 × 48 at order 4 pads the rows: the sliced paths are traced too
    spec = TeRASpec.from_shape(40, 48, order=4, diag=diag)
    return TeRALinear(torch.nn.Linear(48, 40), spec, strategy=strategy, scale_init="ones")


def _run(fn, layer: TeRALinear, x: torch.Tensor):
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    y = fn(x)
    y.square().sum().backward()
    return y.detach(), x.grad, layer.tera_lambda["default"].grad.clone()


@pytest.mark.parametrize("diag", ["rank", "mode", "both"])
@pytest.mark.parametrize("strategy", ["materialize", "dense", "factored", "auto"])
def test_fullgraph_compile_matches_eager(diag, strategy):
    torch._dynamo.reset()
    layer = _layer(diag, strategy)
    x = torch.randn(16, 48)
    want = _run(layer, layer, x)
    # fullgraph=True turns any graph break into an error
    got = _run(torch.compile(layer, fullgraph=True, backend="eager"), layer, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inductor_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    layer = _layer("rank", "auto")
    x = torch.randn(64, 48)
    want = _run(layer, layer, x)
    got = _run(torch.compile(layer, fullgraph=True), layer, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_peft_model_compiles_fullgraph():
    peft = pytest.importorskip("peft")
    from tera_tn.peft import TeraConfig

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(48, 40)
            self.b = torch.nn.Linear(40, 48)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = peft.get_peft_model(Two(), TeraConfig(target_modules=["a", "b"], scale_init="ones"))
    x = torch.randn(8, 48)

    def run(fn):
        model.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want = run(model)
    got = run(torch.compile(model, fullgraph=True, backend="eager"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
