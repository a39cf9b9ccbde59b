"""Stratified timesteps (an option; uniform is the default): a low-discrepancy sequence over the run."""

from __future__ import annotations

import pytest
import torch

from lib_ti.config import TrainConfig
from lib_ti.errors import TIError
from lib_ti.trainer import stratified_timesteps


def test_stratified_timesteps_cover_the_levels_evenly_where_independent_draws_clump():
    levels = 1000
    t = stratified_timesteps(levels, 0, 1000, seed=0)
    assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < levels
    deciles = torch.bincount(t // 100, minlength=10)
    assert int(deciles.min()) >= 98 and int(deciles.max()) <= 102
    drawn = torch.randint(0, levels, (1000,), generator=torch.Generator().manual_seed(0))
    assert int(torch.bincount(drawn // 100, minlength=10).max()) > 102  # what uniform draws do by chance


def test_the_sequence_depends_only_on_the_seed_and_the_samples_index():
    whole = stratified_timesteps(1000, 0, 24, seed=3)
    in_batches = torch.cat([stratified_timesteps(1000, first, 4, seed=3) for first in range(0, 24, 4)])
    assert torch.equal(whole, in_batches)  # batch size and resume points do not change the sequence
    assert torch.equal(stratified_timesteps(1000, 5, 3, seed=3), whole[5:8])
    assert not torch.equal(stratified_timesteps(1000, 0, 24, seed=4), whole)


def test_a_bad_timesteps_value_names_the_choices():
    with pytest.raises(TIError, match="timesteps"):
        TrainConfig(timesteps="cosine")  # type: ignore[arg-type]


def test_a_stratified_run_trains_and_differs_from_a_uniform_one(tiny_model, images, tmp_path):
    from lib_ti.engines.standalone import StandaloneEngine
    from lib_ti.formats.embeddings import load_embedding
    from lib_ti.trainer import train

    engine = StandaloneEngine.load(tiny_model("sd1"))
    vectors = {}
    for mode in ("uniform", "stratified"):
        cfg = TrainConfig(name="tok", init_text="a photo", data_dir=str(images), width=64, height=64,
                          steps=3, save_every=0, preview_every=0, output_dir=str(tmp_path / mode), timesteps=mode)
        vectors[mode] = load_embedding(train(engine, cfg).final_path).vectors
    assert all(torch.isfinite(v).all() for v in vectors["stratified"].values())
    assert any(not torch.equal(vectors["uniform"][k], vectors["stratified"][k]) for k in vectors["uniform"])
