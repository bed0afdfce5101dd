"""Reporting and artifacts: analysis helpers against closed forms, TensorBoard and artifact round trips."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import infl_plugin as ip
from infl_plugin.artifacts import AttributionResult, read_artifacts, write_artifact
from infl_plugin.reporting import (
    ImageRenderer, Rendered, TensorBoardReporter, TextRenderer, ccdf, layer_shares, make_renderer, tail_exponent,
)
from infl_plugin.session import DatasetSource, InfluenceSession, make_loader


def _result(step: int = 7, q: int = 3, n: int = 50, k: int = 4, seed: int = 0) -> AttributionResult:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(q, n, generator=g) * torch.rand(q, n, generator=g).pow(-1.0)
    candidate_indices = torch.arange(100, 100 + n)
    helpful_scores, hp = scores.topk(k, dim=1)
    harmful_scores, hn = scores.topk(k, dim=1, largest=False)
    return AttributionResult(
        step=step, reason="manual", scores=scores, candidate_indices=candidate_indices,
        query_indices=torch.arange(q) * 2, measurements=torch.rand(q, generator=g),
        helpful_indices=candidate_indices[hp], helpful_scores=helpful_scores,
        harmful_indices=candidate_indices[hn], harmful_scores=harmful_scores,
        layer_names=["a", "b"], layer_shares=layer_shares(torch.rand(2, q, generator=g)),
        tail_exponents=torch.tensor([tail_exponent(s) for s in scores]), strategy="ekfac", fisher="empirical",
        config=ip.InfluenceConfig().to_dict(), duration_s=0.5, self_scores=torch.rand(n, generator=g),
    )


class _Source:
    """Examples are 8×8 images whose pixels encode the index; labels are index % 10."""

    def query_example(self, index):
        return torch.full((64,), float(index)) + torch.arange(64.0), index % 10

    def candidate_example(self, index):
        return torch.full((64,), float(index)) + torch.arange(64.0), index % 10


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> str:
    event = acc.Tensors(f"{tag}/text_summary")[-1]
    return event.tensor_proto.string_val[0].decode()


def _table_rows(markdown: str) -> list[list[str]]:
    """Data rows of every markdown table (header and separator rows dropped)."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    return [c for c in cells if c and c[0] not in ("rank", "field") and not set(c[0]) <= set("-:")]


# ------------------------------------------------------------------------------------- analysis
def test_tail_exponent_recovers_pareto_alpha():
    # Exact Pareto(α) samples by inverse CDF: P(X > s) = s^-α for s ≥ 1; the Hill estimator's
    # standard error is α/√k (k = 2,000 tail points → 2.2 %), so 10 % is a > 4σ tolerance.
    rng = np.random.default_rng(0)
    for alpha in (0.8, 1.5, 3.0):
        x = (1.0 - rng.random(20000)) ** (-1.0 / alpha)
        assert tail_exponent(torch.tensor(x)) == pytest.approx(alpha, rel=0.1)
    assert math.isnan(tail_exponent(torch.ones(5)))


def test_ccdf_matches_counting():
    values = torch.tensor([3.0, -1.0, 0.0, 2.0, float("nan"), -2.0])
    x, p = ccdf(values)
    kept = np.array([3.0, 1.0, 2.0, 2.0])  # |values|, finite and non-zero
    np.testing.assert_allclose(x, np.sort(kept))
    np.testing.assert_allclose(p, [(kept >= s).mean() for s in x])


def test_layer_shares_rows_sum_to_one():
    sums = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # [L=2, Q=2]; query 1 has no influence at all
    shares = layer_shares(sums)
    torch.testing.assert_close(shares, torch.tensor([[0.25, 0.75], [0.0, 0.0]]))


# ------------------------------------------------------------------------------------- renderers
def test_renderers():
    image = ImageRenderer([8, 8])((torch.arange(64.0), 3))
    assert image.image.shape == (8, 8) and image.text == "label 3"
    assert image.image.min() == 0 and image.image.max() == 1
    assert make_renderer("auto")((torch.arange(64.0), torch.tensor(2))).image.shape == (8, 8)
    assert make_renderer("auto")(torch.arange(5)).image is None
    assert TextRenderer()({"text": "a|b", "label": 1}).text == "a|b (label 1)"
    assert make_renderer(lambda e: f"<{e}>")(5) == Rendered("<5>")
    with pytest.raises(ValueError, match=r"renderer must be one of \['auto', 'image', 'text', 'repr'\]"):
        make_renderer("pixels")


# ------------------------------------------------------------------------------------- TensorBoard
def test_reporter_logs_every_view(tmp_path):
    result = _result(k=4)
    writer = SummaryWriter(str(tmp_path))
    TensorBoardReporter(writer, renderer="image", image_shape=[8, 8], scalar_ranks=2).log(
        result, _Source(), extra_texts={"custom/note": "hello"})
    writer.close()
    acc = _events(tmp_path)
    tags = acc.Tags()
    for q in range(result.num_queries):
        markdown = _text(acc, f"influence/query_{q:03d}")
        rows = _table_rows(markdown)
        assert len(rows) == 2 * result.top_k  # helpful table then harmful table, k rows each
        assert [int(r[1]) for r in rows[: result.top_k]] == result.helpful_indices[q].tolist()
        assert [int(r[1]) for r in rows[result.top_k:]] == result.harmful_indices[q].tolist()
        np.testing.assert_allclose([float(r[2]) for r in rows[: result.top_k]], result.helpful_scores[q], rtol=1e-3)
        assert f"label {int(result.helpful_indices[q, 0]) % 10}" in rows[0][4]
        assert f"dataset index {int(result.query_indices[q])}" in markdown
        assert f"influence_examples/query_{q:03d}" in tags["images"]
        assert f"influence_scores/query_{q:03d}" in tags["histograms"]
        hist = acc.Histograms(f"influence_scores/query_{q:03d}")[-1]
        assert hist.step == result.step and hist.histogram_value.num == result.num_candidates
        helpful_1 = acc.Scalars(f"influence_top/query_{q:03d}/helpful_1")[-1]
        assert helpful_1.value == pytest.approx(float(result.helpful_scores[q, 0]), rel=1e-6)
        assert f"influence_top/query_{q:03d}/harmful_2" in tags["scalars"]
        assert "influence_top/query_{:03d}/helpful_3".format(q) not in tags["scalars"]
    assert {"influence_plots/score_ccdf", "influence_plots/layer_shares"} <= set(tags["images"])
    self_rows = _table_rows(_text(acc, "influence/self_influence"))
    assert [int(r[1]) for r in self_rows] == result.self_top()[1].tolist()
    assert "hello" in _text(acc, "custom/note")
    assert acc.Scalars("influence_stats/num_candidates")[-1].value == result.num_candidates


def test_reporter_without_writer_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray default SummaryWriter would create ./runs here
    assert TensorBoardReporter(None).log(_result(), _Source()) is None
    assert list(tmp_path.iterdir()) == []


def test_reporter_subclass_extension_point(tmp_path):
    class WithExtra(TensorBoardReporter):
        def log_extra(self, result, source, step):
            self.add_markdown(self.tag("influence", "extra"), f"extra at {step}", step)

    writer = SummaryWriter(str(tmp_path))
    WithExtra(writer).log(_result(step=3), None)
    writer.close()
    assert _text(_events(tmp_path), "influence/extra") == "extra at 3"


# ------------------------------------------------------------------------------------- artifacts
def test_artifacts_round_trip_atomically(tmp_path):
    first, second = _result(step=20, seed=1), _result(step=5, seed=2)
    for result in (first, second):
        write_artifact(tmp_path / "version_0", result)
    assert not list(tmp_path.rglob("*.tmp"))
    frame = read_artifacts(tmp_path)
    assert frame["step"].tolist() == [5, 20]
    row = frame.iloc[1]
    np.testing.assert_array_equal(row["scores"], first.scores.numpy())
    np.testing.assert_array_equal(row["helpful_indices"], first.helpful_indices.numpy())
    assert row["config"] == first.config and row["layer_names"] == ["a", "b"]
    rows = read_artifacts(tmp_path, as_dataframe=False)
    assert isinstance(rows, list) and rows[0]["reason"] == "manual"
    with pytest.raises(FileNotFoundError):
        read_artifacts(tmp_path / "missing")


# ------------------------------------------------------------------------------------- session
def test_session_scores_match_dense_attributor(tmp_path):
    """Session results equal a dense score matrix computed with the same factors, and the session's
    passes neither feed the tracker nor touch parameter gradients."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    data = TensorDataset(x, y)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    task = ip.ClassificationTask()
    session = InfluenceSession(model, task, ip.InfluenceConfig(), top_k=3, self_influence=True, progress=False)
    session.set_data(make_loader(data, 16, indices=[1, 7]), make_loader(data, 16), query_dataset=data,
                     candidate_dataset=data, query_indices=[1, 7])
    session.artifact_dir = str(tmp_path)
    for xb, yb in DataLoader(data, batch_size=8):
        nn.functional.cross_entropy(model(xb), yb).backward()
        session.after_backward((xb, yb))
    grads = [p.grad.clone() for p in model.parameters()]
    totals = {n: s.a_sum.clone() for n, s in session.tracker.statistics.totals.items()}
    result = session.attribute(step=5)
    session.close()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(totals[n], s.a_sum) for n, s in session.tracker.statistics.totals.items())

    attributor = ip.Attributor(model, task, session.last_factors)
    queries = DataLoader(torch.utils.data.Subset(data, [1, 7]), batch_size=2)
    dense = attributor.pairwise_scores(queries, DataLoader(data, batch_size=40), per_layer=True)  # [L, Q, N]
    torch.testing.assert_close(result.scores, dense.sum(0).float(), rtol=1e-4, atol=1e-6)
    order = dense.sum(0).argsort(dim=1, descending=True)
    assert torch.equal(result.helpful_indices, order[:, :3]) and torch.equal(result.harmful_indices, order[:, -3:].flip(1))
    shares = dense.abs().sum(-1).T
    torch.testing.assert_close(result.layer_shares, (shares / shares.sum(1, keepdim=True)).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.self_scores, attributor.self_scores(DataLoader(data, batch_size=40)).float(),
                               rtol=1e-4, atol=1e-6)
    assert result.query_indices.tolist() == [1, 7]
    assert read_artifacts(tmp_path)["step"].tolist() == [5]
    assert session.should_attribute(5, "every_n_steps") is False  # one attribution per step


@pytest.mark.parametrize("strict", [False, True])
def test_a_failing_reporter_warns_or_raises_as_configured(tmp_path, strict):
    """Reporting is a side task of training: it warns (the artifact is still written) unless strict."""
    class Broken:
        def log(self, result, source, step):
            raise OSError("disk full")

    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    data = TensorDataset(x, y)
    model = nn.Linear(4, 2)
    session = InfluenceSession(model, ip.ClassificationTask(), ip.InfluenceConfig(strategy="kfac"), top_k=2,
                               progress=False, strict=strict)
    session.set_data(make_loader(data, 8, indices=[0]), make_loader(data, 8))
    session.reporter, session.artifact_dir = Broken(), str(tmp_path)
    nn.functional.cross_entropy(model(x), y).backward()
    session.after_backward((x, y))
    if strict:
        with pytest.raises(OSError, match="disk full"):
            session.attribute(step=1)
    else:
        with pytest.warns(UserWarning, match=r"writing the report of step 1 failed: OSError: disk full"):
            session.attribute(step=1)
        assert read_artifacts(tmp_path)["step"].tolist() == [1]
    session.close()


def test_session_dataset_source():
    source = DatasetSource([10, 11], None)
    assert source.query_example(1) == 11 and source.candidate_example(0) is None
