"""Hugging Face transformers built from small configs (never downloaded), against the dense
``torch.func`` reference: BERT, GPT-2 (its ``Conv1D`` projections), ViT and a Llama block
(RMSNorm, rotary embeddings, grouped-query attention).

Every layer takes the hook path, with Kronecker blocks for every projection: Linear,
``Conv1D``, LayerNorm, RMSNorm, token Embedding, ViT's embeddings (class token and position
table), and the position embeddings that BERT and GPT-2 look up once with a batch dimension
of 1 and broadcast (expanded to the batch during the hooked passes). No torch warning is
printed.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from torch import nn

from fimntk import engine
from tests import reference as ref
from tests import zoo
from tests.engine import _structured_helpers as H

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, N, BATCH = 23, 5, 6, 4


class Logits(nn.Module):
    """``(n, c)`` logits of a Hugging Face model (the last position's for a language model)."""

    def __init__(self, model: nn.Module, last: bool = False) -> None:
        super().__init__()
        self.model, self.last = model, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x).logits
        return out[:, -1] if self.last else out


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=SEQ, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return Logits(transformers.BertForSequenceClassification(cfg))


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=SEQ, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return Logits(transformers.GPT2LMHeadModel(cfg), last=True)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=4, patch_size=2, num_channels=2, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=12, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return Logits(transformers.ViTForImageClassification(cfg))


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=12, max_position_embeddings=SEQ, num_labels=3,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return Logits(transformers.LlamaForSequenceClassification(cfg))


def _tokens() -> torch.Tensor:
    return torch.randint(1, VOCAB, (N, SEQ), generator=torch.Generator().manual_seed(5))


def _images() -> torch.Tensor:
    return torch.randn(N, 2, 4, 4, generator=torch.Generator().manual_seed(5))


#: name: (model, inputs, layers on the torch.func path, tolerance: Llama's RMSNorm computes its
#: statistic in float32, so float64 results agree to float32 rounding there)
MODELS = {
    "bert": (_bert, _tokens, set(), 1e-9),
    "gpt2": (_gpt2, _tokens, set(), 1e-9),
    "vit": (_vit, _images, set(), 1e-9),
    "llama": (_llama, _tokens, set(), 1e-6),
}


def _built(name: str):
    make_model, make_x, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = make_model()
    model.model.config._attn_implementation = "eager"
    return zoo.build_model_loader(model, make_x(), batch_size=BATCH)


def _fim(name: str, rep: str):
    model, loader = _built(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mat = engine.FIM(model, loader, rep)
        if rep == "ekfac":
            mat.update_diag(loader)
    assert not [str(w.message) for w in caught], "torch warnings were printed"
    return model, loader, mat


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@pytest.mark.parametrize("name", list(MODELS))
def test_paths_and_kronecker_blocks(name):
    model, _, mat = _fim(name, "kfac")
    fallback = {k for k, v in mat.paths.items() if v == engine.generator.FALLBACK}
    assert fallback == MODELS[name][2]
    projections = {n for n, m in model.named_modules() if _is_projection(m)}
    assert projections and all(mat.kinds[n] == "kfac" for n in projections)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rep", ["dense", "diag", "blockdiag"])
def test_fisher_matches_the_reference(name, rep):
    model, loader, mat = _fim(name, rep)
    full = ref.fisher(model, loader)
    expected = {
        "dense": full,
        "diag": torch.diag(full.diagonal()),
        "blockdiag": full * ref.block_mask(model),
    }[rep]
    ref.assert_close(mat.to_torch(), expected, MODELS[name][3], f"{name} {rep}")


@pytest.mark.parametrize("name", list(MODELS))
def test_ntk_matches_the_reference(name):
    model, loader = _built(name)
    gram = engine.NTK(model, loader).to_torch()
    ref.assert_close(gram, ref.ntk(model, loader), MODELS[name][3], name)


@pytest.mark.parametrize("name", list(MODELS))
def test_implicit_products_match_the_reference(name):
    model, loader, mat = _fim(name, "implicit")
    full = ref.fisher(model, loader)
    v = engine.PVector.random(
        mat.layer_collection, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    x = v.get_flat_representation()
    tol = MODELS[name][3]
    ref.assert_close(mat.vTMv(v), x @ full @ x, tol, f"{name} vTMv")
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, tol, f"{name} mv")


def _conv1d_factors(model: nn.Module, loader, module: nn.Module):
    """``(A, G)`` of a ``Conv1D`` from the definitions (expand): as a Linear layer whose weight
    is stored transposed, ``A = (1/n) Σ_{i,t} ã ãᵀ``, ``G = (1/n) Σ_i (1/T) Σ_t J_tᵀ H_i J_t``."""
    a_tot, g_tot, n = 0, 0, 0
    for (x,) in loader:
        inp, jac, logits = H.layer_io(model, x, module, expand=True)
        h = ref.output_fisher(logits, "classif_logits")
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        j = jac.reshape(jac.shape[0], jac.shape[1], a.shape[1], -1)
        a_tot = a_tot + torch.einsum("ntp,ntr->pr", a, a)
        g_tot = g_tot + torch.einsum("nctq,ncd,ndts->qs", j, h, j) / a.shape[1]
        n += a.shape[0]
    return (a_tot / n)[None], (g_tot / n)[None]


@pytest.mark.parametrize("name", list(MODELS))
def test_kfac_factors_match_their_definition(name, monkeypatch):
    monkeypatch.setattr(H, "layer_io", partial(H.layer_io, expand=True))  # per example
    model, loader, mat = _fim(name, "kfac")
    modules = dict(model.named_modules())
    # some G factors are tiny (1e-9: ViT's q/k projections seen through the class token only),
    # where float64 rounding of the two sums is 1e-8 of them
    tol = max(MODELS[name][3], 1e-7)
    for layer, (a, g) in mat.factors.items():
        module = modules[layer]
        if type(module).__name__ == "Conv1D":
            a_ref, g_ref = _conv1d_factors(model, loader, module)
        else:
            a_ref, g_ref = H.kfac_factors(model, loader, module)
        ref.assert_close(a, a_ref, tol, f"{name} A of {layer}")
        ref.assert_close(g, g_ref, tol, f"{name} G of {layer}")


@pytest.mark.parametrize("name", list(MODELS))
def test_ekfac_after_update_diag_has_the_exact_trace(name):
    """EKFAC's eigenvalues re-estimated on the same data make the trace exact (George et al.)."""
    model, loader, mat = _fim(name, "ekfac")
    ref.assert_close(mat.trace(), ref.fisher(model, loader).trace(), MODELS[name][3], name)
