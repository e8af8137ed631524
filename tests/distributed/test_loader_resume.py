"""Loader partition and resume across simulated ranks (loaders built with rank=0/1 explicitly, no process group).

Covers: disjoint and complete coverage over 2 ranks x 2 workers with equal batch counts; exact resume mid-epoch
at the same and at a different world size / number of workers (consumed + remaining = the epoch, no duplicate).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import tiledbsoma

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "data"))
from soma_test_atlas import write_test_atlas  # noqa: E402

from scldm_scale.config.data import SomaDataConfig  # noqa: E402
from scldm_scale.data import build_loader  # noqa: E402


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> str:
    return write_test_atlas(str(tmp_path_factory.mktemp("atlas") / "resume"), n_cells=700, n_genes=30)


def _cfg(uri: str, **kw) -> SomaDataConfig:
    base = dict(
        atlas_uri=uri,
        micro_batch_size=16,
        shuffle_chunk_cells=16,
        shuffle_buffer_cells=64,
        seed=11,
        label_columns=["dataset_id"],
    )
    base.update(kw)
    return SomaDataConfig(**base)


def _epoch_cells(uri: str) -> list[int]:
    with tiledbsoma.Experiment.open(uri) as exp:
        t = exp.obs.read(value_filter="split == 'train'", column_names=["soma_joinid"]).concat()
    return sorted(t.column("soma_joinid").to_pylist())


def _real(batch) -> list[int]:
    return batch["soma_joinid"][~batch["is_padding"]].tolist()


def _loaders(uri, world, workers, **kw):
    return [
        build_loader(_cfg(uri, num_workers=workers, **kw), rank=r, world_size=world) for r in range(world)
    ]


def _consume(loaders, k):
    """Every rank takes k batches (lockstep); returns the real cells and the iterators (kept open)."""
    its = [iter(ld) for ld in loaders]
    cells = [c for it in its for _ in range(k) for c in _real(next(it))]
    return cells, its


def _drain(loaders):
    per_rank = [[_real(b) for b in ld] for ld in loaders]
    assert len({len(p) for p in per_rank}) == 1, "ranks yield different batch counts"
    return [c for p in per_rank for b in p for c in b]


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_two_ranks_two_workers_disjoint_complete_equal(atlas, processes):
    loaders = _loaders(atlas, 2, 2, worker_processes=processes)
    per_rank = [[b for b in ld] for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0]) == loaders[0].num_batches
    cells = [[c for b in p for c in _real(b)] for p in per_rank]
    assert not set(cells[0]) & set(cells[1])
    assert sorted(cells[0] + cells[1]) == _epoch_cells(atlas)
    assert all(len(b["soma_joinid"]) == 16 for p in per_rank for b in p)
    # the same layout gives the same order again
    again = [c for b in _loaders(atlas, 2, 2, worker_processes=not processes)[0] for c in _real(b)]
    assert again == cells[0], "threads and processes give the same order"


@pytest.mark.parametrize(
    "before,after",
    [((2, 0), (2, 0)), ((2, 2), (3, 0)), ((2, 0), (1, 2)), ((1, 1), (2, 1)), ((2, 2, True), (1, 2))],
    ids=["same-world", "2x2-to-3x0", "2x0-to-1x2", "1x1-to-2x1", "2x2-processes-to-1x2-threads"],
)
def test_exact_resume_mid_epoch(atlas, before, after):
    epoch = _epoch_cells(atlas)
    loaders = _loaders(atlas, *before[:2], worker_processes=len(before) > 2)
    consumed, its = _consume(loaders, 5)
    states = [ld.state_dict() for ld in loaders]
    assert all(s == states[0] for s in states), "ranks must agree on the state"
    state = json.loads(json.dumps(states[0]))
    assert state["cells_consumed_in_epoch"] == len(consumed)
    for it in its:
        it.close()
    resumed = _loaders(atlas, *after)
    for ld in resumed:
        ld.load_state_dict(state)
        ld.set_epoch(0)  # the trainer's usual call must not restart the resumed epoch
    rest = _drain(resumed)
    assert len(set(consumed)) == len(consumed) and not set(consumed) & set(rest)
    assert len(rest) == len(set(rest))
    assert sorted(consumed + rest) == epoch
    # the next pass is the next epoch, complete again
    nxt = _drain(resumed)
    assert sorted(nxt) == epoch and resumed[0].epoch == 1


def test_chained_resume_with_tiny_memory_budget(atlas, monkeypatch):
    """Blocks larger than the memory allowance are read in parts; two resumes in a row stay exact."""
    monkeypatch.setattr("scldm_scale.data.budget.BYTES_PER_CELL", 10**6)  # 1 MiB then holds ~1 cell
    epoch = _epoch_cells(atlas)
    kw = dict(shuffle_buffer_cells=256, memory_budget_mb=1)
    gen1 = _loaders(atlas, 2, 0, **kw)
    spec = gen1[0].dataset.spec
    assert spec.unit_plan(spec.order(0), 1)[0] == 16  # one batch per load unit: blocks of 256 are split
    first, its = _consume(gen1, 3)
    state = gen1[0].state_dict()
    loaders = _loaders(atlas, 3, 0, **kw)
    for ld in loaders:
        ld.load_state_dict(state)
    second, its = _consume(loaders, 2)
    state2 = loaders[1].state_dict()
    final = _loaders(atlas, 1, 0, **kw)
    final[0].load_state_dict(state2)
    rest = _drain(final)
    everything = first + second + rest
    assert len(everything) == len(set(everything)) and sorted(everything) == epoch


def test_drop_remainder_resume_never_repeats(atlas):
    loaders = _loaders(atlas, 3, 0, remainder="drop")
    consumed, _ = _consume(loaders, 2)
    state = loaders[0].state_dict()
    resumed = _loaders(atlas, 2, 0, remainder="drop")
    for ld in resumed:
        ld.load_state_dict(state)
    rest = _drain(resumed)
    allc = consumed + rest
    assert len(allc) == len(set(allc)) and set(allc) <= set(_epoch_cells(atlas))
    assert len(_epoch_cells(atlas)) - len(allc) < 2 * 16  # only the last partial round is dropped
    assert all(not ld.state_dict()["pieces"] or ld.state_dict()["complete"] for ld in resumed)


def test_state_saved_after_the_last_batch_resumes_into_the_next_epoch(atlas):
    """The trainer's loop: `yield from loader`, then `set_epoch(epoch + 1)`; no epoch is run twice."""
    (loader,) = _loaders(atlas, 1, 0)
    batches = list(loader)
    state = loader.state_dict()
    assert state["complete"] and state["cells_consumed_in_epoch"] == len(_epoch_cells(atlas))
    (resumed,) = _loaders(atlas, 1, 0)
    resumed.load_state_dict(state)
    assert list(resumed) == []  # epoch 0 is over
    resumed.set_epoch(1)
    (fresh,) = _loaders(atlas, 1, 0)
    fresh.set_epoch(1)
    assert [_real(b) for b in resumed] == [_real(b) for b in fresh] != [_real(b) for b in batches]


def test_a_resumed_epoch_yields_the_uninterrupted_batches_padding_included(atlas):
    """Same world size: after a mid-epoch resume every batch, the padded last one too, equals the batch of an
    uninterrupted pass (so losses after a restart equal an uninterrupted run's), into the next epoch."""

    def batches(loaders, epochs):
        out = []
        for epoch in range(epochs):
            for ld in loaders:
                ld.set_epoch(epoch)
            out += [[b["soma_joinid"].tolist() for b in step] for step in zip(*loaders)]
        return out

    whole = batches(_loaders(atlas, 2, 1), 2)
    first = _loaders(atlas, 2, 1)
    its = [iter(ld) for ld in first]
    head = [[next(it)["soma_joinid"].tolist() for it in its] for _ in range(3)]
    resumed = _loaders(atlas, 2, 1)
    for ld in resumed:
        ld.load_state_dict(first[0].state_dict())
    tail = [[b["soma_joinid"].tolist() for b in step] for step in zip(*resumed)]
    for ld in resumed:
        ld.set_epoch(1)
    tail += [[b["soma_joinid"].tolist() for b in step] for step in zip(*resumed)]
    assert any(len(set(sum(step, []))) < 32 for step in whole)  # the epoch does end in a padded batch
    assert head + tail == whole
