"""Refined query solves (`InfluenceConfig.refine_steps`) against a dense damped Gauss-Newton solve.

The reference is built independently of `infl_plugin.scoring.refine`: the Jacobian of the model output in
the tracked parameters (``torch.func.jacrev``, parameters laid out as the layers' ``[d_out, d_in]``
matrices), explicit output-space Hessians, ``G = (1/N) Σ_n J_nᵀ H_n J_n``, the per-layer damping on
the diagonal, and ``torch.linalg.solve``. Everything runs in float64.

Tolerances: one product ``G v`` is the same sum computed in another order, so it matches to
1e-10 (relative). Conjugate gradient run for more steps than there are unknowns (the MLPs: 43 and
26) has converged in exact arithmetic; in float64 the lost orthogonality leaves a residual near
1e-12 relative and the error is at most the condition number of ``M⁻¹ (G + Λ)`` times that, so 1e-6
(relative, in norm) is a safe bound that still fails for any wrong matrix (EK-FAC alone is off by
1e-1 to 1). The language model has 156 unknowns; its error falls to 5.5e-7 by step 80 (measured),
so 90 steps are run and checked at 1e-5 (a margin against round-off on other machines).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

import infl_plugin as ip
from infl_plugin.run.data import AttributionData, DatasetSource
from infl_plugin.run.job import AttributionJob
from infl_plugin.config.options import AttributionOptions
from infl_plugin.scoring.refine import GaussNewton, evenly_spaced_batches

DTYPE = torch.float64


# ----------------------------------------------------------------------------- problems
def classification():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    x, y = torch.randn(24, 4, dtype=DTYPE), torch.randint(0, 3, (24,))
    train = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    queries = [(torch.randn(3, 4, dtype=DTYPE), torch.tensor([0, 1, 2]))]
    return model, ip.ClassificationTask(), train, queries


def regression():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x, y = torch.randn(18, 3, dtype=DTYPE), torch.randn(18, 2, dtype=DTYPE)
    train = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 18, 6)]
    queries = [(torch.randn(2, 3, dtype=DTYPE), torch.randn(2, 2, dtype=DTYPE))]
    return model, ip.RegressionTask(), train, queries


def causal_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(n_layer=1, n_embd=4, n_head=1, n_inner=8, n_positions=8, vocab_size=256, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(DTYPE).eval()
    ids = torch.randint(0, 256, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0  # padding: masked out of the loss and of G
    train = [{"input_ids": ids, "attention_mask": mask}]
    queries = [{"input_ids": torch.randint(0, 256, (2, 6))}]
    return model, ip.CausalLMTask(), train, queries


PROBLEMS = {"classification": classification, "regression": regression, "causal_lm": causal_lm}


def config(**over) -> ip.InfluenceConfig:
    return ip.InfluenceConfig(**{"accumulation_dtype": "float64", "fisher": "sampled", **over})


def fitted(name: str, **over):
    model, task, train, queries = PROBLEMS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unembedding note of the default layer selection
        factors = ip.fit_factors(model, task, train, config(**over))
        attributor = ip.Attributor(model, task, factors, config(**over), curvature_data=train)
    return model, task, train, queries, factors, attributor


# ----------------------------------------------------------------------------- dense reference
class Dense:
    """The tracked parameters as one flat vector in layer-matrix order, and the dense damped GGN."""

    def __init__(self, model: nn.Module, attributor: ip.Attributor) -> None:
        self.model, self.layers = model, attributor.layers
        self.shapes = [layer.shape for layer in self.layers]
        mats = []
        for layer in self.layers:
            w = layer.module.weight.detach()
            w = w.T if layer.kind == "Conv1D" else w
            mats.append(torch.cat([w, layer.module.bias.detach()[:, None]], 1).flatten())
        self.theta = torch.cat(mats)
        self.damping = torch.cat([torch.full((math.prod(s),), attributor.factors.layers[layer.name].damping, dtype=DTYPE)
                                  for layer, s in zip(self.layers, self.shapes)])

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for layer, (d_out, d_in) in zip(self.layers, self.shapes):
            m = theta[offset: offset + d_out * d_in].view(d_out, d_in)
            offset += d_out * d_in
            out[f"{layer.name}.weight"] = m[:, :-1].T if layer.kind == "Conv1D" else m[:, :-1]
            out[f"{layer.name}.bias"] = m[:, -1]
        return out

    def output(self, theta: torch.Tensor, batch) -> torch.Tensor:
        """``[B, O]``: logits / predictions, for token batches every position's logits flattened."""
        if isinstance(batch, dict):
            kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with sdpa_kernel([SDPBackend.MATH]):  # differentiable under vmap without a slow fallback
                return functional_call(self.model, self.params(theta), (), kwargs).logits.flatten(1)
        return functional_call(self.model, self.params(theta), (batch[0],)).flatten(1)

    def hessians(self, batch) -> torch.Tensor:
        """``[B, O, O]`` Hessians of each example's loss in its output."""
        out = self.output(self.theta, batch)
        if not isinstance(batch, dict):
            if out.shape[1] == 3:  # classification: softmax cross-entropy
                p = torch.softmax(out, -1)
                return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            return torch.eye(out.shape[1], dtype=DTYPE).expand(out.shape[0], -1, -1)  # ½‖pred − y‖²
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        b, t = ids.shape
        p = torch.softmax(out.view(b, t, -1), -1)
        valid = torch.zeros(b, t, dtype=DTYPE)
        valid[:, :-1] = (mask[:, 1:] == 1).to(DTYPE)  # the token at t predicts t + 1
        blocks = (torch.diag_embed(p) - p[..., :, None] * p[..., None, :]) * valid[..., None, None]
        return torch.stack([torch.block_diag(*blocks[n]) for n in range(b)])

    def ggn(self, batches) -> torch.Tensor:
        total, count = 0.0, 0
        for batch in batches:
            j = jacrev(self.output)(self.theta, batch)  # [B, O, P]
            total = total + torch.einsum("nop,noq,nqr->pr", j, self.hessians(batch), j)
            count += j.shape[0]
        return total / count

    def query_gradients(self, task: ip.Task, batch) -> torch.Tensor:
        """``[Q, P]`` gradients of each query's loss, written out per task."""
        def losses(theta):
            out = self.output(theta, batch)
            if isinstance(batch, dict):
                ids = batch["input_ids"]
                logits = out.view(ids.shape[0], ids.shape[1], -1)
                return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").sum(1)
            if isinstance(task, ip.ClassificationTask):
                return F.cross_entropy(out, batch[1], reduction="none")
            return 0.5 * (out - batch[1]).pow(2).sum(1)
        return jacrev(losses)(self.theta)

    def flat(self, pq: ip.PreconditionedQueries) -> torch.Tensor:
        return torch.cat([pq.layers[layer.name].full.flatten(1) for layer in self.layers], 1)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_gauss_newton_product_matches_dense(name):
    model, task, train, queries, factors, attributor = fitted(name)
    dense = Dense(model, attributor)
    g = dense.ggn(train)
    v = torch.randn(2, g.shape[0], dtype=DTYPE)
    vectors, offset = {}, 0
    for layer, (d_out, d_in) in zip(dense.layers, dense.shapes):
        vectors[layer.name] = v[:, offset: offset + d_out * d_in].reshape(2, d_out, d_in)
        offset += d_out * d_in
    product = GaussNewton(model, task, attributor.layers, train)(vectors)
    flat = torch.cat([product[layer.name].flatten(1) for layer in dense.layers], 1)
    assert relative(flat, v @ g) < 1e-10
    # no autograd graph through the untracked parameters (embeddings, norms): it kept every
    # product's activations alive, gigabytes per call on a small GPT-2
    assert not any(t.requires_grad for t in product.values())


@pytest.mark.parametrize("name,steps", [("classification", 60), ("regression", 40), ("causal_lm", 90)])
def test_converged_refinement_is_the_damped_ggn_solve(name, steps):
    model, task, train, queries, factors, _ = fitted(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refined = ip.Attributor(model, task, factors, config(refine_steps=steps), curvature_data=train)
        plain = ip.Attributor(model, task, factors, config())
    dense = Dense(model, refined)
    assert name == "causal_lm" or sum(math.prod(s) for s in dense.shapes) < steps  # converged
    g = dense.query_gradients(task, queries[0])
    exact = torch.linalg.solve(dense.ggn(train) + torch.diag(dense.damping), g.T).T
    assert relative(dense.flat(refined.precondition(queries)), exact) < (1e-5 if name == "causal_lm" else 1e-6)
    assert relative(dense.flat(plain.precondition(queries)), exact) > 1e-2  # EK-FAC alone is not exact


def test_few_steps_close_the_gap_monotonically():
    model, task, train, queries, factors, attributor = fitted("classification")
    dense = Dense(model, attributor)
    exact = torch.linalg.solve(dense.ggn(train) + torch.diag(dense.damping), dense.query_gradients(task, queries[0]).T).T
    errors = []
    for steps in (0, 5, 20):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = ip.Attributor(model, task, factors, config(refine_steps=steps), curvature_data=train)
        errors.append(relative(dense.flat(a.precondition(queries)), exact))
    assert errors[0] > errors[1] > errors[2]


def test_zero_steps_is_todays_ekfac_bit_for_bit():
    model, task, train, queries, factors, _ = fitted("classification")
    today = ip.Attributor(model, task, factors, config()).pairwise_scores(queries, train)
    zero = ip.Attributor(model, task, factors, config(refine_steps=0), curvature_data=train)
    assert torch.equal(zero.pairwise_scores(queries, train), today)
    assert torch.equal(zero.pairwise_scores(zero.precondition(queries, curvature_batches=train), train), today)
    low = ip.Attributor(model, task, factors, config(query_rank=2)).pairwise_scores(queries, train)
    zero_low = ip.Attributor(model, task, factors, config(query_rank=2, refine_steps=0), curvature_data=train)
    assert torch.equal(zero_low.pairwise_scores(queries, train), low)


def test_rank_r_queries_are_truncated_after_refinement():
    model, task, train, queries, factors, _ = fitted("classification")
    full = ip.Attributor(model, task, factors, config(refine_steps=30), curvature_data=train).precondition(queries)
    low = ip.Attributor(model, task, factors, config(refine_steps=30, query_rank=2), curvature_data=train)
    low_q = low.precondition(queries)
    for name, layer in full.layers.items():
        u, s, vh = torch.linalg.svd(layer.full)
        best = (u[..., :2] * s[..., None, :2]) @ vh[..., :2, :]
        rebuilt = low_q.layers[name].u @ low_q.layers[name].v.transpose(-1, -2)
        assert relative(rebuilt, best) < 1e-8


def test_refinement_changes_scores_and_job_passes_candidates():
    model, task, train, queries, factors, _ = fitted("classification")
    cfg = config(refine_steps=5)
    candidates = DataLoader(TensorDataset(torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])),
                            batch_size=8, shuffle=False)
    expected = ip.Attributor(model, task, factors, cfg, curvature_data=train).pairwise_scores(queries, train)
    plain = ip.Attributor(model, task, factors, config()).pairwise_scores(queries, train)
    assert not torch.allclose(expected, plain)
    data = AttributionData(queries, candidates, DatasetSource(None, None), None, None)
    result = AttributionJob(model, task, cfg, AttributionOptions(progress=False)).run(factors, data, 0, "manual")
    torch.testing.assert_close(result.scores, expected.float(), rtol=1e-5, atol=1e-6)


def test_without_curvature_data_warns_and_keeps_ekfac():
    model, task, train, queries, factors, _ = fitted("classification")
    today = ip.Attributor(model, task, factors, config()).pairwise_scores(queries, train)
    with pytest.warns(UserWarning, match="refine_steps"):
        scores = ip.Attributor(model, task, factors, config(refine_steps=3)).pairwise_scores(queries, train)
    assert torch.equal(scores, today)


def test_evenly_spaced_batches_from_loaders():
    data = TensorDataset(torch.arange(20.0)[:, None])
    loader = DataLoader(data, batch_size=2, shuffle=False)
    chosen = evenly_spaced_batches(loader, 4)
    assert [float(b[0][0, 0]) for b in chosen] == [0.0, 6.0, 12.0, 18.0]
    assert [float(b[0][0, 0]) for b in evenly_spaced_batches(list(loader), 4)] == [0.0, 6.0, 12.0, 18.0]
    assert len(evenly_spaced_batches(iter(list(loader)), 30)) == 10


@pytest.mark.parametrize("field,value", [("refine_steps", -1), ("refine_steps", 1.5), ("refine_steps", True),
                                         ("refine_steps", "3"), ("refine_batches", 0), ("refine_batches", None)])
def test_invalid_refine_fields_fail_at_construction(field, value):
    with pytest.raises(ip.ConfigurationError, match=f"InfluenceConfig.{field} must be an integer"):
        ip.InfluenceConfig(**{field: value})


def test_refine_fields_from_yaml():
    merged = OmegaConf.merge(OmegaConf.structured(ip.InfluenceConfig), OmegaConf.create("refine_steps: 5\nrefine_batches: 3"))
    cfg = OmegaConf.to_object(merged)
    assert (cfg.refine_steps, cfg.refine_batches) == (5, 3)
    assert ip.InfluenceConfig().refine_steps == 0
