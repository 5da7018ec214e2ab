"""The Jacobian generator against dense ``torch.func.jacrev`` references (tests/reference.py).

One test id per zoo model. float64 unless the test is about float32; tolerances are relative to
the largest entry of the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from fimntk import engine
from fimntk.engine.generator import FALLBACK, HOOKS
from tests import reference as ref
from tests import zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CASES = pytest.mark.parametrize("case", zoo.CASES, ids=zoo.CASE_IDS)
VARIANTS = ["classif_logits", "classif_binary_logits", "regression"]
SIGMA = 0.7


def expected_paths(case: zoo.Case, model) -> dict[str, str]:
    fallback = zoo.FALLBACK_LAYERS.get(case.name, set())
    return {name: FALLBACK if name in fallback else HOOKS for name in ref.layer_offsets(model)}


@CASES
def test_jacobian_matches_reference(case):
    model, loader = zoo.build(case)
    jac = engine.Jacobian(model).get_jacobian(loader)
    expected = ref.jacobian(model, loader).permute(1, 0, 2)  # (c, n, d)
    assert jac.shape == (case.c, 13, sum(p.numel() for p in model.parameters()))
    assert jac.dtype == torch.float64
    ref.assert_close(jac, expected, 1e-10, case.name)


@CASES
def test_paths_say_which_layer_took_the_fallback(case):
    model, loader = zoo.build(case)
    expected = expected_paths(case, model)
    gen = engine.Jacobian(model)
    gen.get_jacobian(loader)
    assert gen.paths == expected
    assert engine.FIM(model, loader, "dense").paths == expected
    assert engine.FIM(model, loader, "diag").paths == expected
    assert engine.NTK(model, loader).paths == expected


def test_builtin_layers_and_attention_take_hooks_custom_and_shared_take_torch_func():
    """The issue's rule over the whole zoo, by module type."""
    builtin = {
        "Linear",
        "Conv1d",
        "Conv2d",
        "ConvTranspose2d",
        "Embedding",
        "BatchNorm2d",
        "GroupNorm",
        "LayerNorm",
        "MultiheadAttention",
        "NonDynamicallyQuantizableLinear",  # attention's out_proj
    }
    by_type: dict[str, set[str]] = {}
    for case in zoo.CASES:
        model, loader = zoo.build(case)
        modules = dict(model.named_modules())
        for name, path in engine.FIM(model, loader, "diag").paths.items():
            shared = case.name == "shared_twice" and name == "shared"
            key = "shared" if shared else type(modules[name]).__name__
            by_type.setdefault(key, set()).add(path)
    for t in builtin:
        assert by_type[t] == {HOOKS}, (t, by_type[t])
    assert by_type["Scale"] == {FALLBACK}
    assert by_type["shared"] == {FALLBACK}


def test_inplace_relu_after_conv_and_linear():
    torch.manual_seed(0)
    x = torch.randn(11, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    model, loader = zoo.build_model_loader(zoo.inplace_relu_cnn(), x)
    gen = engine.Jacobian(model)
    jac = gen.get_jacobian(loader)
    ref.assert_close(jac, ref.jacobian(model, loader).permute(1, 0, 2), 1e-10, "in-place ReLU")
    assert set(gen.paths.values()) == {HOOKS}
    ref.assert_close(
        engine.FIM(model, loader, "dense").to_torch(),
        ref.fisher(model, loader),
        1e-10,
        "in-place ReLU FIM",
    )


@pytest.mark.parametrize(
    "model_cls, inputs, fallback",
    [
        (zoo.TiedWeights, lambda g: torch.randint(0, 7, (9, 3), generator=g), {"emb", "lin"}),
        (zoo.WeightUsedOutside, lambda g: torch.randn(9, 4, generator=g), {"lin"}),
    ],
    ids=["tied_weights", "weight_used_outside"],
)
def test_weights_shared_beyond_one_module_take_torch_func(model_cls, inputs, fallback):
    torch.manual_seed(0)
    model, loader = zoo.build_model_loader(model_cls(), inputs(torch.Generator().manual_seed(1)))
    gen = engine.Jacobian(model)
    jac = gen.get_jacobian(loader)
    ref.assert_close(jac, ref.jacobian(model, loader).permute(1, 0, 2), 1e-10, "jacobian")
    assert {n for n, p in gen.paths.items() if p == FALLBACK} == fallback
    ref.assert_close(
        engine.FIM(model, loader, "dense").to_torch(), ref.fisher(model, loader), 1e-10, "FIM"
    )


@pytest.mark.parametrize("variant", VARIANTS)
@CASES
def test_fim_variants_match_reference(case, variant):
    model, loader = zoo.build_variant(case, variant)
    fim = engine.FIM(model, loader, "dense", variant=variant, sigma=SIGMA)
    expected = ref.fisher(model, loader, variant, sigma=SIGMA)
    assert fim.to_torch().dtype == torch.float64
    ref.assert_close(fim.to_torch(), expected, 1e-10, f"{case.name} {variant}")


@CASES
def test_float32_matches_float64_reference(case):
    """float32 against a float64 reference: 1e-4 relative, far below a factor n = 13 (or 2)."""
    model32, loader32 = zoo.build(case, dtype=torch.float32)
    model64, loader64 = zoo.build(case, dtype=torch.float64)
    fim = engine.FIM(model32, loader32, "dense").to_torch()
    jac = engine.Jacobian(model32).get_jacobian(loader32)
    assert fim.dtype == torch.float32 and jac.dtype == torch.float32
    expected = ref.fisher(model64, loader64)
    ref.assert_close(fim, expected, 1e-4, "float32 FIM")
    ref.assert_close(jac, ref.jacobian(model64, loader64).permute(1, 0, 2), 1e-4, "float32 J")
    for wrong in (expected * 13, expected / 13, expected * 2):  # the tolerance is meaningful
        with pytest.raises(AssertionError):
            ref.assert_close(fim, wrong, 1e-4)


@CASES
def test_drop_last_loader_divides_by_examples_seen(case):
    model, loader = zoo.build(case, n=13, batch_size=5)
    dropped = DataLoader(loader.dataset, batch_size=5, drop_last=True)  # sees 10 of 13
    first10 = DataLoader(Subset(loader.dataset, range(10)), batch_size=4)
    expected = ref.fisher(model, first10)
    for rep in ("dense", "diag", "blockdiag"):
        fim = engine.FIM(model, dropped, rep)
        assert fim.generator.n_examples == 10
        ref.assert_close(fim.get_diag(), expected.diagonal(), 1e-10, f"drop_last {rep}")
    ref.assert_close(engine.FIM(model, dropped, "dense").to_torch(), expected, 1e-10, "dense")
    assert engine.NTK(model, dropped).shape == (case.c, 10, case.c, 10)


@CASES
def test_batching_does_not_change_the_fisher(case):
    """F is a mean over examples: batch sizes and a duplicated dataset leave it unchanged."""
    model, loader = zoo.build(case, n=12, batch_size=12)
    x, y = loader.dataset.tensors
    expected = engine.FIM(model, loader, "dense").to_torch()
    for bs in (1, 5):
        other = DataLoader(loader.dataset, batch_size=bs)
        ref.assert_close(engine.FIM(model, other, "dense").to_torch(), expected, 1e-10, f"bs={bs}")
    twice = DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=7)
    ref.assert_close(engine.FIM(model, twice, "dense").to_torch(), expected, 1e-10, "twice")


def test_loader_of_bare_tensors_and_function_argument():
    case = zoo.CASES[0]
    model, loader = zoo.build(case)
    expected = ref.fisher(model, loader)
    bare = [b[0] for b in loader]
    ref.assert_close(engine.FIM(model, bare, "dense").to_torch(), expected, 1e-10, "bare")
    calls = []

    def function(x, y):
        calls.append(y.shape[0])
        return model(x)

    fim = engine.FIM(model, loader, "dense", function=function)
    ref.assert_close(fim.to_torch(), expected, 1e-10, "function=")
    assert sum(calls) >= 13


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "torch.device"])
def test_device_cpu(device):
    case = zoo.CASES[zoo.CASE_IDS.index("custom")]
    model, loader = zoo.build(case)
    fim = engine.FIM(model, loader, "dense", device=device)
    assert fim.to_torch().device.type == "cpu"
    ref.assert_close(fim.to_torch(), ref.fisher(model, loader), 1e-10, "device=cpu")
    gen = engine.Jacobian(model, device=device)
    assert gen.device == torch.device("cpu")
    ref.assert_close(
        gen.get_jacobian(loader),
        ref.jacobian(model, loader).permute(1, 0, 2),
        1e-10,
        "Jacobian device=cpu",
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "case",
    [zoo.CASES[zoo.CASE_IDS.index(n)] for n in ("cnn_bn", "custom")],
    ids=["cnn_bn", "custom"],
)
def test_cuda_matches_cpu_reference(case):
    model, loader = zoo.build(case)
    expected = ref.fisher(model, loader)
    fim = engine.FIM(model.to("cuda"), loader, "dense", device="cuda")  # batches moved by device=
    assert fim.to_torch().device.type == "cuda"
    ref.assert_close(fim.to_torch(), expected, 1e-10, "cuda")


@pytest.mark.parametrize("case", zoo.EXTRA_CASES, ids=zoo.EXTRA_CASE_IDS)
def test_more_layer_configurations(case):
    """Bias-free, affine-free, padding modes, 1-d/3-d, subclasses, frozen parts, keyword calls."""
    model, loader = zoo.build(case, n=7, batch_size=3)
    gen = engine.Jacobian(model)
    jac = gen.get_jacobian(loader)
    ref.assert_close(jac, ref.jacobian(model, loader).permute(1, 0, 2), 1e-10, "jacobian")
    assert gen.paths == expected_paths(case, model)
    full = ref.fisher(model, loader)
    ref.assert_close(engine.FIM(model, loader, "dense").to_torch(), full, 1e-10, "dense")
    ref.assert_close(engine.FIM(model, loader, "diag").get_diag(), full.diagonal(), 1e-10, "diag")
    ref.assert_close(engine.NTK(model, loader).to_torch(), ref.ntk(model, loader), 1e-10, "NTK")


def test_float_inputs_are_cast_to_the_model_dtype():
    model, loader = zoo.build(zoo.CASES[0])
    x, y = loader.dataset.tensors
    x32 = x.float()
    as32 = DataLoader(TensorDataset(x32, y), batch_size=5)
    as64 = DataLoader(TensorDataset(x32.double(), y), batch_size=5)
    fim = engine.FIM(model, as32, "dense").to_torch()
    assert fim.dtype == torch.float64
    ref.assert_close(fim, ref.fisher(model, as64), 1e-10, "float32 inputs, float64 model")


def test_progress_reports_examples_seen():
    model, loader = zoo.build(zoo.CASES[0])
    seen = []
    engine.FIM(
        model, loader, "dense", progress=lambda done, total, stage: seen.append((done, total))
    )
    assert [d for d, _ in seen] == [5, 10, 13]
    assert {t for _, t in seen} == {13}
