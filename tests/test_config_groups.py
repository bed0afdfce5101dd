"""`InfluenceConfig` in groups, every earlier spelling kept; a resumed run refuses only changes that
shape the saved statistics, naming them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import infl_plugin as ip
from infl_plugin.config import SHAPES_STATISTICS, ScoringSettings, resolve_config
from infl_plugin.config.groups import GROUP_FIELDS
from infl_plugin.results.artifacts import write_artifact

from models import loader


def test_groups_partition_the_fields_and_are_views():
    names = [f.name for f in dataclasses.fields(ip.InfluenceConfig)]
    grouped = [n for group in GROUP_FIELDS.values() for n in group]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    config = ip.InfluenceConfig(strategy="kfac", damping=0.01, query_rank=4, stream_every=2, update_every=3)
    assert config.curvature.strategy == "kfac" and config.scoring.damping == 0.01 and config.scoring.query_rank == 4
    assert config.tracking.update_every == 3 and config.streaming.stream_every == 2
    assert config.scoring == ScoringSettings(damping=0.01, query_rank=4, refine_steps=0, refine_batches=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scoring.damping = 1.0  # a view: set the field on the configuration itself
    assert set(SHAPES_STATISTICS) <= set(names) and "damping" not in SHAPES_STATISTICS


def test_flat_and_grouped_spellings_build_the_same_configuration():
    flat = ip.InfluenceConfig(strategy="ekfac", damping=0.01, stream_refresh_every=None, update_every=4)
    grouped = ip.InfluenceConfig(curvature={"strategy": "ekfac"}, scoring=ScoringSettings(damping=0.01),
                                 streaming={"stream_refresh_every": None}, tracking={"update_every": 4})
    assert grouped == flat and grouped.damping == 0.01 and grouped.to_dict() == flat.to_dict()
    assert ip.InfluenceConfig.from_dict({"scoring": {"damping": 0.01}, "strategy": "ekfac", "update_every": 4,
                                         "stream_refresh_every": None}) == flat
    assert list(flat.to_dict()) == [f.name for f in dataclasses.fields(ip.InfluenceConfig)]  # artifacts stay flat


@pytest.mark.parametrize("kwargs, match", [
    (dict(damping=0.1, scoring={"damping": 0.2}), "InfluenceConfig.damping is given twice"),
    (dict(scoring={"strategy": "kfac"}), r"InfluenceConfig.scoring has no field 'strategy'"),
    (dict(scoring=3), "InfluenceConfig.scoring must be a mapping"),
    (dict(scoring={"damping": -1.0}), "InfluenceConfig.damping must be None"),
    (dict(dampnig=1.0), r"has no field\(s\) \['dampnig'\]"),
])
def test_grouped_input_errors_name_the_field(kwargs, match):
    with pytest.raises(ip.ConfigurationError, match=match):
        ip.InfluenceConfig(**kwargs)


def test_yaml_blocks_flat_and_grouped_resolve_through_omegaconf():
    flat = OmegaConf.create("strategy: kfac\ndamping: 0.5\nmodules: ['0']\n")
    grouped = OmegaConf.create("curvature: {strategy: kfac, modules: ['0']}\nscoring: {damping: 0.5}\n")
    expected = ip.InfluenceConfig(strategy="kfac", damping=0.5, modules=["0"])
    assert resolve_config("InfluenceCallback", flat) == expected == resolve_config("InfluenceCallback", grouped)
    schema = OmegaConf.structured(ip.InfluenceConfig)  # the structured config stays flat
    merged = OmegaConf.merge(schema, flat)
    assert ip.InfluenceConfig(**OmegaConf.to_container(merged)) == expected


def test_saved_configs_of_earlier_artifacts_load(tmp_path):
    """An artifact's config is the flat dict; one written before a field existed lacks it and loads
    with that field's default."""
    config = ip.InfluenceConfig(strategy="kfac", damping=0.1)
    q, n = 2, 5
    result = ip.AttributionResult(
        step=1, reason="manual", scores=torch.zeros(q, n), candidate_indices=torch.arange(n),
        query_indices=torch.arange(q), measurements=torch.zeros(q), helpful_indices=torch.zeros(q, 1, dtype=torch.long),
        helpful_scores=torch.zeros(q, 1), harmful_indices=torch.zeros(q, 1, dtype=torch.long),
        harmful_scores=torch.zeros(q, 1), layer_names=["a"], layer_shares=torch.ones(q, 1),
        tail_exponents=torch.zeros(q), strategy="kfac", fisher="empirical", config=config.to_dict())
    write_artifact(tmp_path, result)
    (row,) = ip.read_artifacts(tmp_path, as_dataframe=False)
    assert ip.InfluenceConfig.from_dict(row["config"]) == config
    older = {k: v for k, v in row["config"].items() if k not in ("half_life_fraction", "refine_steps", "refine_batches")}
    assert ip.InfluenceConfig.from_dict(json.loads(json.dumps(older))) == config


# ------------------------------------------------------------------------------------ resume
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _items(n: int = 32) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, generator=g, dtype=torch.float64), torch.randint(0, 3, (), generator=g)) for _ in range(n)]


def _train(model: nn.Module, tracker, items: list, epochs: int = 1) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(epochs):
        for x, y in loader(items, 8):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            tracker.step((x, y), grad_scale=1.0 / len(y))
        tracker.refresh_eigenbasis()


BASE = dict(update_every=1, min_statistics_steps=1, accumulation_dtype="float64")


@pytest.mark.parametrize("changes", [dict(damping=0.5), dict(query_rank=2), dict(stream_refresh_every=5, stream_every=2),
                                     dict(min_statistics_steps=3, max_fit_batches=2, refine_steps=1)])
def test_a_resumed_tracker_accepts_changed_scoring_and_streaming_fields(changes):
    """The statistics continue exactly as if the run had not stopped; the new values apply."""
    items, model = _items(), _mlp()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), ip.InfluenceConfig(**BASE)) as whole:
        _train(model, whole, items, epochs=2)
        expected = whole.statistics.state_dict()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), ip.InfluenceConfig(**BASE)) as first:
        _train(model, first, items)
        state = first.state_dict()
    changed = ip.InfluenceConfig(**{**BASE, **changes})
    with ip.InfluenceTracker(model, ip.ClassificationTask(), changed) as resumed:
        resumed.load_state_dict(state)
        _train(model, resumed, items)
        got = resumed.statistics.state_dict()
        assert resumed.config == changed
    assert got.keys() == expected.keys()
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("changes, named", [(dict(strategy="kfac"), "strategy='ekfac' (now 'kfac')"),
                                            (dict(update_every=2), "update_every=1 (now 2)"),
                                            (dict(fisher="sampled", damping=0.5), "fisher='empirical' (now 'sampled')")])
def test_a_resumed_tracker_refuses_changes_that_shape_the_statistics_naming_them(changes, named):
    items, model = _items(), _mlp()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), ip.InfluenceConfig(**BASE)) as first:
        _train(model, first, items)
        state = first.state_dict()
    with ip.InfluenceTracker(model, ip.ClassificationTask(), ip.InfluenceConfig(**{**BASE, **changes})) as resumed:
        with pytest.raises(ValueError, match="another InfluenceConfig") as error:
            resumed.load_state_dict(state)
    assert named in str(error.value) and "damping=" not in str(error.value)


def test_a_resumed_session_accepts_a_changed_damping():
    """The adapters restore through the session: Lightning's and Hugging Face's resumes take this path."""
    items, model = _items(), _mlp()
    session = ip.InfluenceSession(model, ip.ClassificationTask(), ip.InfluenceConfig(**BASE), progress=False)
    session.attach()
    for x, y in loader(items, 8):
        F.cross_entropy(model(x), y).backward()
        session.after_backward((x, y))
    state = session.state_dict()
    session.close()
    resumed = ip.InfluenceSession(model, ip.ClassificationTask(), ip.InfluenceConfig(**BASE, damping=0.5),
                                  progress=False)
    resumed.load_state_dict(state)
    assert resumed.tracker.optimizer_steps == 4 and resumed.config.damping == 0.5
    refused = ip.InfluenceSession(model, ip.ClassificationTask(), ip.InfluenceConfig(**{**BASE, "update_every": 2}),
                                  progress=False)
    with pytest.raises(ValueError, match=r"update_every=1 \(now 2\)"):
        refused.load_state_dict(state)
