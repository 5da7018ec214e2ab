"""Partial statistics (``fimntk.engine.partials``): shards computed apart and added equal the
matrix over all examples, and the dense ones equal the torch.func reference."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from fimntk import engine
from fimntk.engine import partials
from tests import reference

BOUNDS = [0, 7, 13, 20]
REPRESENTATIONS = ["dense", "diag", "blockdiag", "quasidiag", "kfac", "mixed", "lowrank"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data() -> TensorDataset:
    torch.manual_seed(1)
    return TensorDataset(torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,)))


def _shards(dataset: TensorDataset) -> list[DataLoader]:
    return [
        DataLoader(Subset(dataset, range(a, b)), batch_size=4)
        for a, b in itertools.pairwise(BOUNDS)
    ]


def _through_file(part: partials.Partial, tmp_path: Path, i: int) -> partials.Partial:
    path = tmp_path / f"part{i}.safetensors"
    partials.save_partial(part, path)
    return partials.load_partial(path)


@pytest.mark.parametrize("rep", REPRESENTATIONS)
def test_shards_add_to_the_whole(rep: str, tmp_path: Path) -> None:
    model, data = _model(), _data()
    whole = engine.FIM(model, DataLoader(data, batch_size=5), rep)
    parts = [
        _through_file(
            partials.partial_of(engine.FIM(model, loader, rep), len(loader.dataset)), tmp_path, i
        )
        for i, loader in enumerate(_shards(data))
    ]
    total = partials.add_partials(parts)
    assert total.count == 20
    sharded = partials.finalize(total, torch.float64)
    assert type(sharded) is type(whole)
    torch.testing.assert_close(sharded.to_torch(), whole.to_torch(), rtol=1e-10, atol=1e-12)


def test_dense_sharded_equals_the_reference() -> None:
    model, data = _model(), _data()
    parts = [
        partials.partial_of(engine.FIM(model, loader, "dense"), len(loader.dataset))
        for loader in _shards(data)
    ]
    sharded = partials.finalize(partials.add_partials(parts), torch.float64)
    dense = reference.fisher(model, DataLoader(data, batch_size=20), "classif_logits")
    torch.testing.assert_close(sharded.to_torch(), dense, rtol=1e-10, atol=1e-12)


def test_a_wrong_count_is_caught_by_the_reference() -> None:
    """A partial that forgot its count (means added as sums) is off by the shard sizes."""
    model, data = _model(), _data()
    parts = [partials.partial_of(engine.FIM(model, loader, "diag"), 1) for loader in _shards(data)]
    total = partials.add_partials(parts)
    wrong = partials.finalize(total, torch.float64)
    right = engine.FIM(model, DataLoader(data, batch_size=20), "diag")
    assert not torch.allclose(wrong.get_diag(), right.get_diag(), rtol=1e-3)


def test_centred_empirical_fisher_from_shards() -> None:
    model, data = _model(), _data()
    whole = engine.EmpiricalFIM(model, DataLoader(data, batch_size=5), "dense", centering=True)
    parts = []
    for loader in _shards(data):
        rep = engine.EmpiricalFIM(model, loader, "dense")
        mean = rep.generator.get_mean_gradient(loader)
        parts.append(partials.partial_of(rep, len(loader.dataset), {"mean_gradient": mean}))
    sharded = partials.finalize(partials.add_partials(parts), torch.float64)
    torch.testing.assert_close(sharded.to_torch(), whole.to_torch(), rtol=1e-10, atol=1e-12)


def test_ekfac_in_two_rounds(tmp_path: Path) -> None:
    model, data = _model(), _data()
    whole = engine.FIM(model, DataLoader(data, batch_size=5), "ekfac")
    whole.update_diag(DataLoader(data, batch_size=5))
    round1 = partials.add_partials(
        [
            partials.partial_of(engine.FIM(model, loader, "kfac"), len(loader.dataset))
            for loader in _shards(data)
        ]
    )
    kfac = partials.finalize(round1, torch.float64)
    assert isinstance(kfac, engine.PMatKFAC)
    groups = partials.spread_by_cost(partials.eigen_costs(kfac), 2)
    assert sorted(n for g in groups for n in g) == sorted(kfac.factors)
    bases: dict = {}
    for group in groups:
        bases |= partials.eigenbases(kfac, group)
    basis = partials.ekfac_from(kfac, bases)
    round2 = []
    for i, loader in enumerate(_shards(data)):
        generator = engine.FIM(model, loader, "implicit").generator
        shard = partials.ekfac_from(kfac, bases).update_diag(loader, generator)
        round2.append(_through_file(partials.partial_of(shard, len(loader.dataset)), tmp_path, i))
    sharded = partials.finalize(partials.add_partials(round2), torch.float64)
    assert isinstance(sharded, engine.PMatEKFAC) and sharded.diag_updated
    assert basis is not sharded
    torch.testing.assert_close(sharded.to_torch(), whole.to_torch(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sharded.trace(), whole.trace(), rtol=1e-10, atol=0)


def test_ntk_tiles_mirrored() -> None:
    model, data = _model(), _data()
    whole = reference.ntk(model, DataLoader(data, batch_size=20))
    tiles = {}
    factors = [partials.gram_factors(model, loader) for loader in _shards(data)]
    for a, b in partials.tile_pairs(3):
        tiles[(a, b)] = partials.gram_tile(model, factors[a], None if a == b else factors[b])
    assert len(tiles) == 6
    torch.testing.assert_close(partials.gram_from_tiles(tiles, BOUNDS), whole)
    del tiles[(0, 2)]
    with pytest.raises(engine.InvalidInputError, match="partial set"):
        partials.gram_from_tiles(tiles, BOUNDS)


def test_hutchinson_probes_add_over_shards() -> None:
    model, data = _model(), _data()
    whole = engine.FIM(model, DataLoader(data, batch_size=5), "implicit")
    expected = engine.estimators.hutchinson_trace(whole, n_samples=6, seed=3)
    total = sum(
        len(loader.dataset)
        * partials.probe_samples(engine.FIM(model, loader, "implicit"), "hutchinson_trace", 6, 3)
        for loader in _shards(data)
    )
    mean, stderr = partials.probe_estimate(total / 20)
    torch.testing.assert_close(mean, expected.estimate, rtol=1e-10, atol=0)
    torch.testing.assert_close(stderr, expected.stderr, rtol=1e-8, atol=0)


def test_packed_triangles_round_trip() -> None:
    m = torch.randn(2, 5, 5, dtype=torch.float64)
    m = m + m.transpose(-1, -2)
    packed = partials.pack_symmetric(m)
    assert packed.shape == (2, 15)
    assert torch.equal(partials.unpack_symmetric(packed, 5), m)


def test_seeds_differ_by_round_and_shard() -> None:
    seeds = {partials.derive_seed(7, r, s) for r in (1, 2) for s in range(4)}
    assert len(seeds) == 8
    assert partials.derive_seed(7, 1, 0) == partials.derive_seed(7, 1, 0)


def test_a_matrix_that_is_no_sum_is_refused() -> None:
    model, data = _model(), _data()
    implicit = engine.FIM(model, DataLoader(data, batch_size=5), "implicit")
    with pytest.raises(engine.InvalidInputError, match="one shard"):
        partials.partial_of(implicit, 20)


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 5])
def test_tile_groups_cover_the_upper_triangle_once(shards: int) -> None:
    groups = partials.tile_groups(shards)
    tiles = [t for g in groups for t in g]
    assert sorted(tiles) == partials.tile_pairs(shards)
    work = [sum(1 if a == b else 2 for a, b in g) for g in groups]
    assert set(work) <= {1, 2} and work.count(1) == shards % 2  # a lone diagonal tile is lighter


def test_ntk_tiles_of_a_layer_on_the_torch_func_path() -> None:
    """PReLU has no hook kernel: its per-example gradients travel as factors instead."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 2)).double()
    data = _data()
    factors = [partials.gram_factors(model, loader) for loader in _shards(data)]
    assert any(".j." in key for key in factors[0])
    tiles = {
        (a, b): partials.gram_tile(model, factors[a], None if a == b else factors[b])
        for a, b in partials.tile_pairs(3)
    }
    whole = reference.ntk(model, DataLoader(data, batch_size=20))
    torch.testing.assert_close(partials.gram_from_tiles(tiles, BOUNDS), whole)
