"""Token-wise and layer-wise decompositions of influence scores, and their rendering.

Ground truth: explicit parameter gradients from autograd on a float64 tiny GPT-2 (Conv1D layers),
per example on the *unpadded* sequence. The part of a layer's weight gradient that comes from
token t, ``g_t a_tᵀ``, is obtained independently by letting gradient flow through that layer's
output at position t only (a forward hook on that one layer; forward values are unchanged). With
the identity strategy the score is then ``⟨∇_W f(q), ∇_W L(z)⟩`` summed over layers, so every
decomposition has an explicit reference. Tolerances: float64 summation order (rtol 1e-9).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import infl_plugin as ip
from infl_plugin.results.artifacts import AttributionResult
from infl_plugin.report.markdown import escape_markdown, mark_tokens_markdown, top_token_positions, views_markdown
from infl_plugin.report.token_report import (clip_token, layer_figure, layer_groups, layer_heatmap_figure,
                                      strip_common_prefix, token_figure, token_heatmap_figure)
from infl_plugin.results.token_views import TokenViews, decode_tokens, result_token_views, token_views

from reference import layer_matrix_grad

RTOL = 1e-9
VOCAB, PAD = 23, 0
MODULES = ["transformer.h.*.attn.c_attn", "transformer.h.*.mlp.c_*"]


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=PAD, eos_token_id=PAD)
    return GPT2LMHeadModel(config).double().eval()


def sequences(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (3 + (5 * i) % 6,), generator=g).tolist() for i in range(n)]


def collate(items: list) -> dict[str, torch.Tensor]:
    """Lists of ids (or dicts with ``input_ids``) → right-padded batch (mask 0 on padding)."""
    items = [it["input_ids"] if isinstance(it, dict) else it for it in items]
    width = max(map(len, items))
    ids = torch.full((len(items), width), PAD)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for n, seq in enumerate(items):
        ids[n, : len(seq)] = torch.tensor(seq)
        mask[n, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sequence_loss(net, seq: list[int]) -> torch.Tensor:
    """Σ_t cross-entropy of one unpadded sequence (CausalLMTask's per-example loss)."""
    ids = torch.tensor([seq])
    logits = net(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")


def layer_grads(net, modules, loss_fn) -> list[torch.Tensor]:
    """``[d_out, d_in+1]`` gradient matrices of ``loss_fn()`` for each module."""
    params = [p for m in modules for p in (m.weight, m.bias)]
    grads = torch.autograd.grad(loss_fn(), params)
    return [layer_matrix_grad(m, grads[2 * i], grads[2 * i + 1]) for i, m in enumerate(modules)]


def token_layer_grad(net, module, position: int, loss_fn) -> torch.Tensor:
    """The token-``position`` part ``g_t a_tᵀ`` of ``module``'s gradient matrix (gradient flows through y_t only)."""

    def only_position(mod, inputs, output):
        keep = torch.zeros_like(output)
        keep[:, position] = 1
        return output.detach() + keep * (output - output.detach())

    handle = module.register_forward_hook(only_position)
    try:
        return layer_grads(net, [module], loss_fn)[0]
    finally:
        handle.remove()


def scores_by_layer(attributor, pq, batch) -> torch.Tensor:
    """``[L, Q, B, T]`` whether the attributor returns a stacked tensor or a per-layer dict."""
    raw = attributor.token_scores(pq, batch)
    return torch.stack([raw[n] for n in attributor.layer_names]) if isinstance(raw, dict) else raw


@pytest.fixture(scope="module")
def setup():
    net = model()
    task = ip.CausalLMTask()
    config = ip.InfluenceConfig(strategy="identity", modules=MODULES, accumulation_dtype="float64")
    train, queries = sequences(5, seed=1), sequences(2, seed=2)
    factors = ip.fit_factors(net, task, [collate(train)], config)
    attributor = ip.Attributor(net, task, factors, config)
    pq = attributor.precondition([collate(queries)])
    modules = [dict(net.named_modules())[name] for name in attributor.layer_names]
    return net, task, attributor, pq, train, queries, modules


def test_token_scores_sum_to_sequence_scores_which_match_explicit_gradients(setup):
    net, task, attributor, pq, train, queries, modules = setup
    batch = collate(train)
    tokens = scores_by_layer(attributor, pq, batch)  # [L, Q, B, T]
    pairwise = attributor.pairwise_scores(pq, [batch], per_layer=True)  # [L, Q, N]
    torch.testing.assert_close(tokens.sum(-1), pairwise, rtol=RTOL, atol=0)
    torch.testing.assert_close(tokens.sum((0, -1)), attributor.pairwise_scores(pq, [batch]), rtol=RTOL, atol=0)
    assert (tokens[..., batch["attention_mask"] == 0] == 0).all()  # padding scores exactly 0
    # explicit: Σ_l <∇_W f(q), ∇_W L(z)> per layer, each sequence unpadded
    q_grads = [layer_grads(net, modules, lambda q=q: sequence_loss(net, q)) for q in queries]
    for n, seq in enumerate(train):
        z = layer_grads(net, modules, lambda: sequence_loss(net, seq))
        expected = torch.tensor([[(qg[l] * z[l]).sum() for qg in q_grads] for l in range(len(modules))])
        torch.testing.assert_close(pairwise[:, :, n], expected, rtol=1e-8, atol=1e-12)


def test_each_token_score_matches_its_explicit_gradient_part(setup):
    net, task, attributor, pq, train, queries, modules = setup
    n = 3
    seq = train[n]
    tokens = scores_by_layer(attributor, pq, collate(train))[:, :, n]  # [L, Q, T]
    q_grads = [layer_grads(net, modules, lambda q=q: sequence_loss(net, q)) for q in queries]
    for l, module in enumerate(modules):
        for t in range(len(seq)):
            part = token_layer_grad(net, module, t, lambda: sequence_loss(net, seq))
            expected = torch.stack([(qg[l] * part).sum() for qg in q_grads])
            torch.testing.assert_close(tokens[l, :, t], expected, rtol=1e-8, atol=1e-12)


def test_token_views_decompose_exactly_and_render(setup):
    net, task, attributor, pq, train, queries, modules = setup
    totals = attributor.pairwise_scores(pq, [collate(train)])  # [Q, N]
    picked = [4, 0, 2]
    views = token_views(attributor, pq, 1, [train[i] for i in picked], picked, collate, top_tokens=3)
    assert isinstance(views, TokenViews) and views.indices == picked
    for i, index in enumerate(picked):
        torch.testing.assert_close(views.per_token(i).sum(), totals[1, index], rtol=RTOL, atol=0)
        assert views.scores[i] == pytest.approx(float(totals[1, index]), rel=RTOL)
    per_layer = views.per_layer()  # [L, K]
    assert per_layer.shape == (len(modules), 3)
    torch.testing.assert_close(per_layer.sum(0), totals[1, picked], rtol=RTOL, atol=0)
    assert views_markdown(views).count("training example") == 3 and "⟨" in views_markdown(views)  # ids shown without tokenizer
    assert views.labels == ["#1", "#2", "#3"] and views.top_tokens == 3
    assert token_figure(views, "t").axes and layer_figure(views, "l").axes


def test_result_token_views_show_each_querys_top_helpful_then_harmful(setup):
    """The views of an attribution: per query, its top helpful then top harmful candidates (dataset
    positions = candidate position + 100 here), with totals equal to the attribution's scores."""
    net, task, attributor, pq, train, queries, modules = setup
    scores = attributor.pairwise_scores(pq, [collate(train)])  # [Q, N]
    helpful_scores, hp = scores.topk(3, dim=1)
    harmful_scores, hn = scores.topk(3, dim=1, largest=False)
    result = AttributionResult(
        step=1, reason="manual", scores=scores, candidate_indices=torch.arange(100, 105),
        query_indices=torch.arange(2), measurements=torch.zeros(2), helpful_indices=hp + 100,
        helpful_scores=helpful_scores, harmful_indices=hn + 100, harmful_scores=harmful_scores,
        layer_names=attributor.layer_names, layer_shares=torch.zeros(2, len(modules)),
        tail_exponents=torch.zeros(2), strategy="identity", fisher="empirical", config={})
    views = result_token_views(attributor, pq, result, lambda i: train[i - 100], collate, sequences=2,
                               top_tokens=4, token_queries=1)
    assert list(views) == [0]  # token_queries=1: the first query only
    v = views[0]
    assert v.indices == (hp[0, :2] + 100).tolist() + (hn[0, :2] + 100).tolist()
    assert v.labels == ["helpful #1", "helpful #2", "harmful #1", "harmful #2"] and v.top_tokens == 4
    expected = torch.cat([helpful_scores[0, :2], harmful_scores[0, :2]]).tolist()
    assert v.scores == pytest.approx(expected, rel=RTOL)
    assert "**helpful #1** training example" in views_markdown(v) and "**harmful #2** training example" in views_markdown(v)
    assert result_token_views(attributor, pq, result, lambda i: train[i - 100], collate, sequences=0) == {}


def test_markdown_marks_the_largest_tokens_and_escapes_markdown():
    tokens = ["The", " *with*", " statement", "\n", " |x|", "<pad>"]
    scores = torch.tensor([0.1, 3.0, -2.0, 0.05, -0.5, 9.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0])
    text = mark_tokens_markdown(tokens, scores, top=3, mask=mask, heading="seq")
    first = text.splitlines()[2]
    assert first.startswith("> The ")
    assert r"**\*with\***¹" in first  # helpful: bold, rank 1, markdown escaped
    assert "*statement*²" in first  # harmful: italic
    assert r"*\|x\|*³" in first and "pad" not in first  # padding is not shown
    assert "↵" in first
    assert text.count("\n| ") == 1 + 3  # header + 3 marked tokens (separator row starts with "|---")
    assert top_token_positions(scores, 2, mask) == [1, 2]
    assert escape_markdown("a_b*c") == r"a\_b\*c"


def test_layer_groups_and_figures():
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.11.mlp.c_proj", "lm_head"]
    assert layer_groups(names) == ["block 0", "block 0", "block 11", "lm_head"]
    fig = layer_heatmap_figure(torch.randn(4, 3), names, ["a", "b", "c"], max_rows=2)  # grouped to 3 rows
    assert len(fig.axes[0].get_yticklabels()) == 3
    fig = token_heatmap_figure([["a", "b"], ["c"]], [torch.tensor([1.0, -1.0]), torch.tensor([0.0])], ["x", "y"])
    assert fig.axes
    assert strip_common_prefix(names[:3]) == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.11.mlp.c_proj"]


def test_heatmap_cells_mark_cut_tokens_and_have_a_colour_legend():
    assert clip_token(" namespace", 7) == "namesp…" and clip_token(" with", 7) == "with"
    assert clip_token(" ", 7) == "␣" and clip_token("a\n", 7) == "a↵"
    fig = token_heatmap_figure([[" namespace", " x"]], [torch.tensor([2.0, -1.0])], ["#1"])
    cells, legend = fig.axes
    assert "names…" in [t.get_text() for t in cells.texts]  # cut to the default 6 characters
    assert "red = helpful" in legend.get_xlabel() and "blue = harmful" in legend.get_xlabel()


def test_decode_tokens_with_a_tokenizer():
    class Bytes:
        def decode(self, ids, **kwargs):
            return bytes(ids).decode("latin-1")

    assert decode_tokens(Bytes(), [104, 105]) == ["h", "i"]
    assert decode_tokens(None, [5]) == ["⟨5⟩"]
