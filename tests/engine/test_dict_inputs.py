"""Loaders yielding dictionaries (``input_ids``, ``attention_mask``, ``labels``), as a Hugging
Face tokenizer and collator give them, with the default ``function``; padded positions do not
count in KFAC's sequence statistics.

References: the dense ``torch.func`` Fisher of the same model called on the same tensors
packed into one (so that :mod:`tests.reference` can read it), and KFAC factors from their
definition over the real positions only:
``A = (1/n) Σ_i Σ_{t real} ã ãᵀ``, ``G = (1/P) Σ_i Σ_{t real} J_tᵀ H_i J_t`` with ``P`` the number
of real positions (expand), and for reduce ``â_i`` the mean over the real positions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimntk import engine
from tests import reference as ref
from tests.engine import _structured_helpers as H

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, N, BATCH = 19, 6, 6, 3


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=SEQ, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    model.config._attn_implementation = "eager"
    return model


class Packed(nn.Module):
    """The same model on ``(n, T, 2)``: token ids and attention mask packed in one tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x[..., 0], attention_mask=x[..., 1]).logits


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (N, SEQ), generator=g)
    lengths = torch.tensor([6, 3, 4, 6, 2, 5])
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "labels": torch.randint(0, 3, (N,), generator=g),
    }


def _loaders():
    d = _data()
    dicts = [{k: v[s : s + BATCH] for k, v in d.items()} for s in range(0, N, BATCH)]
    packed = torch.stack([d["input_ids"], d["attention_mask"]], dim=-1)
    tensors = [(packed[s : s + BATCH],) for s in range(0, N, BATCH)]
    return dicts, tensors


@pytest.mark.parametrize("rep", ["dense", "diag"])
def test_dict_batches_with_the_default_function(rep):
    model = _bert()
    dicts, tensors = _loaders()
    mat = engine.FIM(model, dicts, rep)
    full = ref.fisher(Packed(model), tensors)
    expected = full if rep == "dense" else torch.diag(full.diagonal())
    ref.assert_close(mat.to_torch(), expected, 1e-9, rep)


def test_empirical_fisher_reads_the_labels_of_a_dict_batch():
    model = _bert()
    dicts, tensors = _loaders()
    mat = engine.EmpiricalFIM(model, dicts, "dense")
    labelled = [(t, d["labels"]) for (t,), d in zip(tensors, dicts)]
    ref.assert_close(
        mat.to_torch(), ref.empirical_fisher(Packed(model), labelled), 1e-9, "empirical"
    )


def _masked_factors(model: nn.Module, tensors, module: nn.Module, approx: str):
    a_tot, g_tot, n, positions = 0, 0, 0, 0
    for (x,) in tensors:
        inp, jac, logits = H.layer_io(Packed(model), x, module)
        h = ref.output_fisher(logits, "classif_logits")
        m = x[..., 1].double()  # (n, T)
        a = torch.cat([inp, torch.ones_like(inp[..., :1])], dim=-1) * m[..., None]
        j = jac * m[:, None, :, None]  # (n, c, T, q)
        if approx == "reduce":
            a = a.sum(1, keepdim=True) / m.sum(1)[:, None, None]
            j = j.sum(2, keepdim=True)
            positions += x.shape[0]
        else:
            positions += int(m.sum())
        a_tot = a_tot + torch.einsum("ntp,ntr->pr", a, a)
        g_tot = g_tot + torch.einsum("nctq,ncd,ndts->qs", j, h, j)
        n += x.shape[0]
    return (a_tot / n)[None], (g_tot / positions)[None]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_padded_positions_do_not_count_in_kfac(approx):
    model = _bert()
    dicts, tensors = _loaders()
    mat = engine.FIM(model, dicts, "kfac", kfac_approx=approx)
    modules = dict(model.named_modules())
    sequence_layers = [n for n in mat.factors if n.startswith("bert.encoder")]
    assert sequence_layers
    for layer in sequence_layers:
        a, g = mat.factors[layer]
        a_ref, g_ref = _masked_factors(model, tensors, modules[layer], approx)
        ref.assert_close(a, a_ref, 1e-9, f"A of {layer}")
        ref.assert_close(g, g_ref, 1e-9, f"G of {layer}")
    unmasked = engine.FIM(Packed(model), tensors, "kfac", kfac_approx=approx)
    a_all = unmasked.factors["model." + sequence_layers[0]][0]
    assert (a_all - mat.factors[sequence_layers[0]][0]).abs().max() > 1e-3  # the test bites


def test_a_dict_without_a_mask_counts_every_position():
    model = _bert()
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(4))
    full = {"input_ids": ids}  # no padding, no mask
    mat = engine.FIM(model, [full], "kfac")
    layer = next(n for n in mat.factors if n.startswith("bert.encoder"))
    ones = torch.ones_like(full["input_ids"])
    a_ref, _ = _masked_factors(
        model,
        [(torch.stack([full["input_ids"], ones], -1),)],
        dict(model.named_modules())[layer],
        "expand",
    )
    ref.assert_close(mat.factors[layer][0], a_ref, 1e-9, "A")
