"""Reporting and artifacts: analysis helpers against closed forms, TensorBoard and artifact round trips."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import infl_plugin as ip
from infl_plugin.results.artifacts import AttributionResult, read_artifacts, write_artifact
from infl_plugin.report.history import InfluenceHistory, jaccard
from infl_plugin.report.markdown import escape_markdown, markdown_cell, views_markdown
from infl_plugin.report.protocol import Reporter
from infl_plugin.report.renderers import ImageRenderer, Rendered, TextRenderer, make_renderer
from infl_plugin.report.tensorboard import TensorBoardReporter
from infl_plugin.scoring.analysis import (
    ccdf, depth_bins, layer_shares, signed_log_scores, tail_exponent,
)
from infl_plugin.report.token_report import TokenReporter
from infl_plugin.results.views import TokenViews
from tensorboard.plugin_util import markdown_to_safe_html


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
    result.num_train = 200  # N of the mean training loss (more than the 50 candidates scored)
    writer = SummaryWriter(str(tmp_path))
    TensorBoardReporter(writer, renderer="image", image_shape=[8, 8], scalar_ranks=2).log(
        result, _Source(), extra_texts={"custom/note": "hello"})
    writer.close()
    acc = _events(tmp_path)
    tags = acc.Tags()
    for q in range(result.num_queries):
        markdown = _text(acc, f"influence/query_{q:03d}")
        assert "| rank | index | score | share | Δ loss if ×2 | label |" in markdown
        rows = _table_rows(markdown)
        assert len(rows) == 2 * result.top_k  # helpful table then harmful table, k rows each
        assert [int(r[1]) for r in rows[: result.top_k]] == result.helpful_indices[q].tolist()
        assert [int(r[1]) for r in rows[result.top_k:]] == result.harmful_indices[q].tolist()
        np.testing.assert_allclose([float(r[2]) for r in rows[: result.top_k]], result.helpful_scores[q],
                                   rtol=5e-3)  # printed to 3 significant digits
        total = float(result.scores[q].abs().sum())
        np.testing.assert_allclose([float(r[3].rstrip("%")) for r in rows[: result.top_k]],
                                   100 * result.helpful_scores[q] / total, atol=0.006)  # printed to 0.01 %
        np.testing.assert_allclose([float(r[4]) for r in rows], -torch.cat([result.helpful_scores[q],
                                   result.harmful_scores[q]]) / 200, rtol=5e-3)  # printed to 3 digits
        assert rows[0][5] == str(int(result.helpful_indices[q, 0]) % 10)  # the label column
        assert f"dataset index {int(result.query_indices[q])}" in markdown
        assert f"loss {float(result.measurements[q]):.4g}" in markdown and "N = 200 training examples" in markdown
        assert f"influence_examples/query_{q:03d}" in tags["images"]
        assert f"influence_over_training/query_{q:03d}" in tags["images"]
        hist = acc.Histograms(f"influence_score_log10/query_{q:03d}")[-1]
        assert hist.step == result.step and hist.histogram_value.num == result.num_candidates
        np.testing.assert_allclose(hist.histogram_value.sum, signed_log_scores(result.scores[q]).sum(), rtol=1e-6)
        tracked = {t for t in tags["scalars"] if t.startswith(f"influence_tracked/query_{q:03d}/")}
        expected = set(result.helpful_indices[q, :2].tolist() + result.harmful_indices[q, :2].tolist())
        assert tracked == {f"influence_tracked/query_{q:03d}/example_{i:05d}" for i in expected}
        index = int(result.helpful_indices[q, 0])
        value = acc.Scalars(f"influence_tracked/query_{q:03d}/example_{index:05d}")[-1].value
        assert value == pytest.approx(100 * float(result.helpful_scores[q, 0]) / total, rel=1e-5)  # share in %
    assert {"influence_plots/score_ccdf", "influence_plots/layer_shares", "influence_plots/layer_depth",
            "influence_examples/self_influence"} <= set(tags["images"])
    self_rows = _table_rows(_text(acc, "influence/self_influence"))
    assert [int(r[1]) for r in self_rows] == result.self_top()[1].tolist()
    assert "hello" in _text(acc, "custom/note")
    assert acc.Scalars("influence_stats/num_candidates")[-1].value == result.num_candidates
    assert not [t for t in tags["scalars"] if t.startswith("influence_stats/topk_jaccard")]  # no previous attribution


def test_markdown_special_characters_render_literally():
    """Rendered with TensorBoard's own Markdown-to-HTML: no emphasis, code, tag or broken cell appears."""
    nasty = "with __enter__() and *__slots__* | a `tick` <b>bold</b> & #1 [x](y)\\nnew\nline"

    class Source:
        def query_example(self, index):
            return nasty

        def candidate_example(self, index):
            return {"text": nasty, "label": 1}

    result = _result(k=2)
    reporter = TensorBoardReporter(renderer="text", table_chars=500)
    html = markdown_to_safe_html(reporter.top_table(result, Source(), 0, "helpful"))
    cells = re.findall(r"<td[^>]*>(.*?)</td>", html)
    assert len(cells) == 2 * 6  # six cells per row: the pipe did not split a cell
    example = cells[5]
    assert example == ("with __enter__() and *__slots__* | a `tick` &lt;b&gt;bold&lt;/b&gt; &amp; #1 [x](y)\\nnew line"
                       " (label 1)")
    for tag in ("<strong>", "<em>", "<code>", "<b>", "<a "):
        assert tag not in html
    heading = markdown_to_safe_html(reporter.query_heading(result, 0, reporter.render(Source(), "query", 0)))
    assert "__enter__()" in heading and "<strong>Query 0</strong>" in heading and "<em>" not in heading
    assert markdown_cell("a" * 10 + "_b", 8) == "aaaaaaa…"  # cut before escaping: no dangling backslash
    assert escape_markdown("x<y") == "x&lt;y"


def test_tracked_examples_and_overlap_follow_fixed_examples(tmp_path):
    """A second attribution logs the share of every example tracked so far (from the full score
    matrix, not ranks), and the top-k Jaccard overlap with the first attribution."""
    first, second = _result(step=10, seed=1, k=3), _result(step=20, seed=2, k=3)
    writer = SummaryWriter(str(tmp_path))
    reporter = TensorBoardReporter(writer, scalar_ranks=1)
    reporter.log(first, None)
    reporter.log(second, None)
    writer.close()
    acc = _events(tmp_path)
    position = {int(i): n for n, i in enumerate(second.candidate_indices.tolist())}
    for q in range(first.num_queries):
        ids = {int(first.helpful_indices[q, 0]), int(first.harmful_indices[q, 0]),
               int(second.helpful_indices[q, 0]), int(second.harmful_indices[q, 0])}
        tags = {t for t in acc.Tags()["scalars"] if t.startswith(f"influence_tracked/query_{q:03d}/")}
        assert tags == {f"influence_tracked/query_{q:03d}/example_{i:05d}" for i in ids}
        for i in (int(first.helpful_indices[q, 0]), int(first.harmful_indices[q, 0])):  # tracked since step 10
            events = acc.Scalars(f"influence_tracked/query_{q:03d}/example_{i:05d}")
            assert [e.step for e in events] == [10, 20]
            share = 100 * float(second.scores[q, position[i]]) / float(second.scores[q].abs().sum())
            assert events[1].value == pytest.approx(share, rel=1e-5)
        top = lambda r: set(r.helpful_indices[q].tolist() + r.harmful_indices[q].tolist())  # noqa: E731
        a, b = top(first), top(second)
        overlap = acc.Scalars(f"influence_stats/topk_jaccard/query_{q:03d}")
        assert [e.step for e in overlap] == [20]
        assert overlap[0].value == pytest.approx(len(a & b) / len(a | b))


def _views(indices: list[int], labels: list[str]) -> TokenViews:
    """Hand-made views: sequence i has 4 tokens (the last one padding) over layers "a" and "b"."""
    base = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.5, 0.0, -0.25, 0.0]])  # [L=2, T=4]
    token_scores = [base * (i + 1) for i in range(len(indices))]
    sequence_scores = [torch.zeros(2) for _ in indices]
    return TokenViews(indices=indices, scores=[float(t.sum()) for t in token_scores],
                      tokens=[["The", " cat", " sat", "<pad>"] for _ in indices],
                      masks=[torch.tensor([True, True, True, False]) for _ in indices], token_scores=token_scores,
                      sequence_scores=sequence_scores, layer_names=["a", "b"], labels=labels, top_tokens=2)


def test_token_reporter_renders_the_results_token_views_without_a_model(tmp_path):
    """A pure sink: the text and both figures come from ``result.token_views`` alone (no source, no
    session, no model); ``max_queries`` still limits the queries; the artifact ignores the views."""
    result = _result(k=4)
    result.candidate_mode = "stream"
    labels = ["helpful #1", "helpful #2", "harmful #1", "harmful #2"]
    result.token_views = {q: _views([100 + q, 101, 102, 103], labels) for q in (0, 1)}
    writer = SummaryWriter(str(tmp_path))
    TokenReporter(writer, max_queries=1).log(result, None)
    writer.close()
    acc = _events(tmp_path)
    text = _text(acc, "influence_tokens/query_000")
    assert text.startswith("**Query 0** (dataset index 0): the 2 most helpful and most harmful training sequences, "
                           "their 2 most influential tokens marked (**bold** = helpful, *italic* = harmful, "
                           "superscript = rank).")
    assert "the tables' scores were streamed while training" in text and text.endswith("\n\n" + views_markdown(result.token_views[0]))
    images = acc.Tags()["images"]
    assert {"influence_token_heatmaps/query_000", "influence_layers/query_000"} <= set(images)
    assert acc.Images("influence_token_heatmaps/query_000")[-1].step == result.step
    assert "influence_layers/query_001" not in images  # max_queries=1
    assert not [t for t in acc.Tags()["tensors"] if t.startswith("influence_tokens/query_001")]
    bare = tmp_path / "bare"
    plain = write_artifact(bare, _result(k=4))
    with_views = write_artifact(tmp_path / "views", result)
    with np.load(with_views) as written, np.load(plain) as reference:
        assert written.files == reference.files
    assert "token_views" not in read_artifacts(tmp_path / "views", as_dataframe=False)[0]


def test_history_bounds_and_jaccard():
    history = InfluenceHistory(max_tracked=2)
    values = {1: (1.0, 10.0), 2: (2.0, 20.0), 3: (3.0, 30.0)}
    history.update("q", 5, {1: "helpful", 2: "harmful", 3: "helpful"}, values.get)
    tracked = history.update("q", 6, {3: "helpful"}, values.get)
    assert list(tracked) == [1, 2] and tracked[1].steps == [5, 6] and tracked[2].shares == [20.0, 20.0]
    assert history.overlap("q", [1, 2]) is None and history.overlap("q", [2, 3]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0


def test_depth_bins_and_signed_log_scores():
    shares = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.0, 0.0, 0.0, 0.5]])  # [Q=2, L=5]
    binned, ranges = depth_bins(shares, 2)
    assert ranges == [(0, 2), (2, 5)]  # contiguous, bottom to top
    torch.testing.assert_close(binned, torch.tensor([[0.3, 0.7], [0.5, 0.5]]))
    assert depth_bins(shares, 10)[0].shape == (2, 5)  # never more bins than layers
    values = torch.tensor([-10.0, -1.0, 0.0, 1.0, 99.0, float("nan")])  # median |s| of the non-zero = 5.5
    np.testing.assert_allclose(signed_log_scores(values), np.sign([-10, -1, 0, 1, 99]) *
                               np.log10(1 + np.abs([-10, -1, 0, 1, 99]) / 5.5))


def test_a_reporter_is_any_object_with_log():
    assert isinstance(TensorBoardReporter(None), Reporter)
    with pytest.raises(ValueError, match=r"TensorBoardReporter.table_chars must be an integer >= 1, got 0"):
        TensorBoardReporter(None, table_chars=0)

    class Printer:
        def log(self, result, source=None, step=None):
            pass

    assert isinstance(Printer(), Reporter) and not isinstance(object(), Reporter)


def test_demo_report_counts_planted_mislabels_by_self_influence_rank():
    example = Path(__file__).resolve().parents[1] / "examples" / "lightning"
    sys.path.insert(0, str(example))
    try:
        from digits import mislabel_report
    finally:
        sys.path.remove(str(example))
    result = _result(n=200)
    result.self_scores = torch.arange(200, 0, -1.0)  # candidate 100 + r has self-influence rank r (0-based)
    planted = [100 + r for r in (0, 1, 5, 15, 150)]
    text = mislabel_report(result, planted, "runs/x")
    assert ("2 in the top 1 % (2 examples), 3 in the top 5 % (10 examples), 4 in the top 10 % (20 examples)"
            in text)
    assert "tensorboard --logdir runs/x" in text and "influence/self_influence" in text


@pytest.mark.slow
def test_predicted_change_matches_reweighting_and_retraining():
    """Ground truth for the "Δ loss if ×2" column, on the convex problem of test_leave_one_out
    (exact Hessian, Newton to 1e-10): weight a training example w in the mean objective, retrain,
    compare the query's loss change with ``(w - 1) · predicted_change = -(w - 1) · score / N``.

    w = 1.01 checks the first-order convention and N (measured ratio 0.996-0.9995, so 1 %); w = 2
    is what the table reports, a first-order estimate: measured ratios 0.76-0.98 (the most
    influential examples have the largest second-order term), so same sign and within 30 %.
    """
    from test_leave_one_out import N_TRAIN, Problem, exact_reference

    problem = Problem()
    scores = exact_reference(problem)  # [Q, N]
    result = _result()
    result.scores, result.num_train = scores, N_TRAIN
    base = problem.query_losses(problem.theta)[0]
    chosen = scores[0].abs().argsort(descending=True)[:2].tolist() + [58, 251]  # most influential + typical
    for z in chosen:
        predicted = float(result.predicted_change(scores[0, z]))
        for weight, rtol in ((1.01, 0.01), (2.0, 0.3)):
            weights = torch.ones(N_TRAIN, dtype=torch.float64)
            weights[z] = weight
            theta, _ = problem.newton(problem.theta.clone(), weights)
            actual = float(problem.query_losses(theta)[0] - base)
            assert actual == pytest.approx((weight - 1) * predicted, rel=rtol), (z, weight)
