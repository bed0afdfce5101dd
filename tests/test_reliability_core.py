"""Reliability of the core: shared layers, frozen parameters, damaged files, bad inputs, defaults.

Numbers are checked against explicit per-example gradients (one ``torch.autograd.grad`` per
example) in float64; tolerances rtol 1e-9 cover summation order only.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import infl_plugin as ip
from infl_plugin.curvature.memory import estimate_memory

from models import ImageNet, collate, image_data, loader
from reference import dense_fisher

RTOL, ATOL = 1e-9, 1e-12


# --------------------------------------------------------------------------------- helpers
def trainable_gradients(layers, loss_fn, n: int) -> list[torch.Tensor]:
    """Per layer ``[n, d_out, d_in]``: example gradients of the *trainable* parameters only, laid out
    as ``[weight (flattened; Conv1D transposed) | bias column]``, each part present when trainable."""
    out = [[] for _ in layers]
    for i in range(n):
        params = [p for layer in layers for p in (layer.module.weight, layer.module.bias) if p is not None and p.requires_grad]
        grads = dict(zip(map(id, params), torch.autograd.grad(loss_fn(i), params)))
        for j, layer in enumerate(layers):
            m, parts = layer.module, []
            if m.weight.requires_grad:
                parts.append(grads[id(m.weight)].reshape(m.weight.shape[0], -1))
            if m.bias is not None and m.bias.requires_grad:
                parts.append(grads[id(m.bias)][:, None])
            out[j].append(torch.cat(parts, dim=1))
    return [torch.stack(g) for g in out]


def ekfac_reference(factors: ip.Factors, layer, grads: torch.Tensor) -> torch.Tensor:
    """``diag(Bᵀ F B)`` with ``B = Q_S ⊗ Q_A`` (row-major vec) and F the dense per-example Fisher."""
    f = factors.layers[layer.name]
    basis = torch.kron(f.q_s, f.q_a)
    return torch.diagonal(basis.T @ dense_fisher(grads) @ basis).reshape(layer.shape)


class SharedNet(nn.Module):
    """``shared`` (a Linear) applied twice per forward (once when ``twice`` is off) on tokens
    ``[B, T, 4]``, then a head → ``[B, 3]``."""

    def __init__(self, mismatched: bool = False) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.mismatched = mismatched
        self.twice = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        if self.twice and self.mismatched:  # second call sees every token as its own example: batch B·T
            h = torch.tanh(self.shared(h.reshape(-1, 1, h.shape[-1]))).reshape(h.shape)
        elif self.twice:
            h = torch.tanh(self.shared(h[:, :-1]))  # second call on fewer tokens
        return self.head(h.mean(1))


def shared_data(n: int = 10, tokens: int = 3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(tokens, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (), generator=g))
            for _ in range(n)]


def example_loss(model: nn.Module, item) -> torch.Tensor:
    return F.cross_entropy(model(item[0][None]), item[1][None])


# --------------------------------------------------------------------------------- item: shared layers
@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_eigenvalues_of_a_shared_layer_square_the_gradient_summed_over_calls(strategy):
    torch.manual_seed(0)
    model, items = SharedNet().double(), shared_data()
    config = ip.InfluenceConfig(strategy=strategy, accumulation_dtype="float64")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 4), config)
    layers = ip.select_layers(model)
    grads = trainable_gradients(layers, lambda i: example_loss(model, items[i]), len(items))
    for layer, g in zip(layers, grads):
        expected = ekfac_reference(factors, layer, g) if strategy == "ekfac" else g.pow(2).mean(0)
        torch.testing.assert_close(factors.layers[layer.name].eigenvalues, expected, rtol=RTOL, atol=ATOL)


def test_tracker_eigenvalues_of_a_shared_layer_during_training():
    """The training-loop path: covariances first (learning that ``shared`` is called twice), then
    eigenvalues in the refreshed basis, from the backward of a mean loss."""
    torch.manual_seed(0)
    model, items = SharedNet().double(), shared_data(12)
    config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64", update_every=1)
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        for phase in range(2):
            for batch in loader(items, 4):
                F.cross_entropy(model(batch[0]), batch[1]).backward()
                assert tracker.step(batch)
            if phase == 0:
                tracker.refresh_eigenbasis()
        factors = tracker.factors()
    grads = trainable_gradients(tracker.layers, lambda i: example_loss(model, items[i]), len(items))
    for layer, g in zip(tracker.layers, grads):
        torch.testing.assert_close(factors.layers[layer.name].eigenvalues, ekfac_reference(factors, layer, g),
                                   rtol=RTOL, atol=ATOL)


def test_a_layer_first_called_twice_after_its_eigenbasis_drops_that_micro_batch_only():
    """``shared`` is called once while covariances accumulate, then twice: the first such
    micro-batch's eigenvalues were partly squared per call, so they are dropped with a warning;
    the following ones sum the calls."""
    torch.manual_seed(0)
    model, items = SharedNet().double(), shared_data(12)
    config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64", update_every=1)
    with ip.InfluenceTracker(model, ip.ClassificationTask(), config) as tracker:
        model.twice = False
        for batch in loader(items, 4):
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            tracker.step(batch)
        tracker.refresh_eigenbasis()
        model.twice = True
        for i, batch in enumerate(loader(items, 4)):
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            if i == 0:
                with pytest.warns(UserWarning, match="'shared' was called more than once .* dropped"):
                    tracker.step(batch)
            else:
                tracker.step(batch)
        factors = tracker.factors()
    later = items[4:]
    grads = trainable_gradients(tracker.layers, lambda i: example_loss(model, later[i]), len(later))
    for layer, g in zip(tracker.layers, grads):
        torch.testing.assert_close(factors.layers[layer.name].eigenvalues, ekfac_reference(factors, layer, g),
                                   rtol=RTOL, atol=ATOL)


def test_self_scores_of_a_shared_layer_use_the_summed_gradient():
    torch.manual_seed(0)
    model, items = SharedNet().double(), shared_data()
    config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 4), config)
    scores = ip.Attributor(model, ip.ClassificationTask(), factors, config).self_scores(loader(items, 4))
    layers = ip.select_layers(model)
    grads = trainable_gradients(layers, lambda i: example_loss(model, items[i]), len(items))
    expected = sum((g * factors.precondition(layer.name, g)).flatten(1).sum(1) for layer, g in zip(layers, grads))
    torch.testing.assert_close(scores, expected, rtol=1e-8, atol=1e-12)


def test_a_shared_layer_with_different_batch_sizes_per_call_is_refused_by_name():
    model, items = SharedNet(mismatched=True).double(), shared_data()
    with pytest.raises(ValueError, match=r"'shared' is applied several times .* different batch sizes"):
        ip.fit_factors(model, ip.ClassificationTask(), loader(items, 4),
                       ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64"))


# --------------------------------------------------------------------------------- item: frozen parameters
def partly_frozen_image_net() -> ImageNet:
    """Conv2d with a frozen weight and trainable bias (bias-only), Linear with a frozen bias."""
    torch.manual_seed(0)
    model = ImageNet().double()
    model.conv.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    return model


def test_only_trainable_parameters_are_tracked():
    model = partly_frozen_image_net()
    layers = {layer.name: layer for layer in ip.select_layers(model)}
    assert layers["conv"].shape == (3, 1) and layers["fc"].shape == (4, 27)
    grads = layers["conv"].to_parameter_grads(torch.ones(3, 1))
    assert set(grads) == {"bias"} and set(layers["fc"].to_parameter_grads(torch.ones(4, 27))) == {"weight"}
    model.conv.bias.requires_grad_(False)
    assert [layer.name for layer in ip.select_layers(model)] == ["fc"]  # nothing trainable: not selected


def test_identity_scores_are_gradient_dot_products_over_trainable_parameters():
    model = partly_frozen_image_net()
    train, queries = image_data(10), image_data(3, seed=1)
    config = ip.InfluenceConfig(strategy="identity", accumulation_dtype="float64")
    attributor = ip.Attributor(model, ip.ClassificationTask(), ip.fit_factors(model, ip.ClassificationTask(), [], config))
    scores = attributor.pairwise_scores(loader(queries, 3), loader(train, 4))
    layers = ip.select_layers(model)
    g_train = trainable_gradients(layers, lambda i: example_loss(model, train[i]), len(train))
    g_query = trainable_gradients(layers, lambda i: example_loss(model, queries[i]), len(queries))
    expected = sum(q.flatten(1) @ t.flatten(1).T for q, t in zip(g_query, g_train))
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_factors_of_partly_frozen_layers_match_the_trainable_fisher(strategy):
    model, items = partly_frozen_image_net(), image_data(12)
    config = ip.InfluenceConfig(strategy=strategy, accumulation_dtype="float64")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 4), config)
    layers = ip.select_layers(model)
    grads = trainable_gradients(layers, lambda i: example_loss(model, items[i]), len(items))
    assert {name: tuple(shape) for name, shape in factors.shapes.items()} == {"conv": (3, 1), "fc": (4, 27)}
    for layer, g in zip(layers, grads):
        f = factors.layers[layer.name]
        d_out, d_in = layer.shape
        assert f.q_a.shape == (d_in, d_in) and f.q_s.shape == (d_out, d_out) and f.eigenvalues.shape == (d_out, d_in)
        if strategy == "ekfac":
            torch.testing.assert_close(f.eigenvalues, ekfac_reference(factors, layer, g), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------- item: inconsistent inputs
def fitted(strategy: str = "kfac", **overrides):
    model = ImageNet().double()
    config = ip.InfluenceConfig(strategy=strategy, accumulation_dtype="float64", **overrides)
    return model, ip.fit_factors(model, ip.ClassificationTask(), loader(image_data(), 4), config), config


def test_attributor_refuses_another_strategy_and_defaults_to_the_factors_config():
    model, factors, config = fitted("kfac", modules=["fc"], query_rank=2)
    with pytest.raises(ip.ConfigurationError, match="strategy is 'ekfac' but the factors were fitted with 'kfac'"):
        ip.Attributor(model, ip.ClassificationTask(), factors, ip.InfluenceConfig(strategy="ekfac", modules=["fc"]))
    attributor = ip.Attributor(model, ip.ClassificationTask(), factors)
    assert attributor.config == config and attributor.layer_names == ["fc"] and attributor.dtype == torch.float64


def test_shuffled_candidates_are_refused_by_every_scoring_method():
    model, factors, config = fitted()
    attributor = ip.Attributor(model, ip.ClassificationTask(), factors, config)
    items = image_data()
    shuffled = torch.utils.data.DataLoader(items, batch_size=4, shuffle=True, collate_fn=collate)
    queries = attributor.precondition(loader(image_data(2, seed=1), 2))
    calls = [lambda: attributor.pairwise_scores(queries, shuffled), lambda: attributor.top_k(queries, shuffled, 2),
             lambda: attributor.self_scores(shuffled), lambda: next(iter(attributor.iter_scores(queries, shuffled)))]
    for call in calls:
        with pytest.raises(ip.InputOrderError, match="RandomSampler.*shuffle=False"):
            call()
    assert attributor.pairwise_scores(queries, loader(items, 4)).shape == (2, len(items))


class CountingNet(ImageNet):
    """ImageNet that counts its forward calls (a bad batch must be refused before the model runs)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


@pytest.mark.parametrize("task,batch,message", [
    (ip.ClassificationTask(), torch.zeros(2, 2, 5, 5), r"\(inputs, labels\) pairs .* got a bare tensor of shape \[2, 2, 5, 5\]"),
    (ip.ClassificationTask(), {"x": torch.zeros(2, 2, 5, 5), "label": torch.zeros(2)}, r"rename 'label' to 'labels'"),
    (ip.RegressionTask(), torch.zeros(2, 2, 5, 5), r"RegressionTask expects batches as \(inputs, targets\)"),
    (ip.CausalLMTask(), {"ids": torch.zeros(2, 3, dtype=torch.long)}, r"'input_ids' tensor .* keys \['ids'\]"),
    (ip.CausalLMTask(), (torch.zeros(2, 3, dtype=torch.long),), r"CausalLMTask expects .*'input_ids'.* got a tuple"),
])
def test_a_batch_in_an_unexpected_format_is_named_before_the_model_runs(task, batch, message):
    model = CountingNet().double()
    CountingNet.calls = 0
    with pytest.raises(ip.BatchFormatError, match=message):
        task.loss(model, batch)
    assert CountingNet.calls == 0


# --------------------------------------------------------------------------------- item: default selection
def llama(vocab: int = 32000):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config)


def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=300, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("build,why", [
    (llama, r"the model's output embeddings, vocabulary-sized \(32000\)"),  # untied head
    (gpt2, r"the model's output embeddings, weight tied to an nn.Embedding, vocabulary-sized \(300\)"),
])
def test_default_selection_leaves_out_the_unembedding_and_names_it(build, why):
    model = build()
    with pytest.warns(UserWarning, match=rf"leaves out the unembedding 'lm_head' \({why}\).*modules=\['\*'\]"):
        names = [layer.name for layer in ip.select_layers(model)]
    assert "lm_head" not in names and len(names) >= 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # noted once per model
        ip.select_layers(model)
    assert [layer.name for layer in ip.select_layers(model, ["lm_head"])] == ["lm_head"]
    with pytest.warns(UserWarning, match="not tracking requested modules .*Embedding"):
        assert "lm_head" in [layer.name for layer in ip.select_layers(model, ["*"])]


def test_selection_and_memory_estimate_on_the_meta_device():
    """A model built on the meta device (planning memory, no weights) has no data addresses: the
    tied-weight test must not take every layer for the embedding (it did, leaving none). Llama
    3.2 1B's shapes, tied head: the 112 block layers are tracked, and the float32 statistics plus
    float32 eigenvectors are the 35 GB the planning figures quote (the estimate's eigenbasis also
    counts the float64 copies the factors keep)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = ip.select_layers(model)
    assert len(layers) == 112 and "lm_head" not in [layer.name for layer in layers]
    estimate = ip.estimate_memory(layers, ip.InfluenceConfig())
    float32_eigenvectors = estimate.eigenbasis_bytes * 4 // 12
    assert abs((estimate.statistics_bytes + float32_eigenvectors) / 1e9 - 34.5) < 0.5


class PlainLM(nn.Module):
    """A language model without Hugging Face hints: embedding, MLP, untied head."""

    def __init__(self, vocab: int, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.embed(input_ids)))))


def test_vocabulary_sized_head_of_a_plain_model_is_left_out_unless_the_mlp_is_as_wide():
    with pytest.warns(UserWarning, match=r"'head' \(vocabulary-sized \(5000\)\)"):
        assert [layer.name for layer in ip.select_layers(PlainLM(5000))] == ["up", "down"]
    tied = PlainLM(40)
    tied.head.weight = tied.embed.weight
    with pytest.warns(UserWarning, match=r"'head' \(weight tied to an nn.Embedding\)"):
        assert [layer.name for layer in ip.select_layers(tied)] == ["up", "down"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vocabulary 48 vs an MLP 32 wide: not told apart, nothing left out
        assert [layer.name for layer in ip.select_layers(PlainLM(48))] == ["up", "down", "head"]


def test_a_byte_level_model_as_wide_as_its_vocabulary_keeps_every_block_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=256, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.warns(UserWarning, match=r"leaves out the unembedding 'lm_head' \(the model's output embeddings, "
                                         r"weight tied to an nn.Embedding\)"):
        names = [layer.name for layer in ip.select_layers(model)]
    assert len(names) == 8 and "lm_head" not in names  # 4 Conv1D per block, none taken for a head


class HeadsOnly(nn.Module):
    """Every layer as wide as the vocabulary: the shape rule has nothing to compare against."""

    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.mid = nn.Linear(8, vocab)
        self.head = nn.Linear(vocab, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.embed(input_ids)))


def test_the_shape_rule_leaves_out_at_most_one_layer_and_never_the_whole_network():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both layers are vocabulary-sized: neither is told apart as the head
        assert [layer.name for layer in ip.select_layers(HeadsOnly())] == ["mid", "head"]
    tied = HeadsOnly(8)  # head tied to the embedding, and the only other layer excluded by nothing
    tied.mid = nn.Linear(8, 8)
    tied.head = nn.Linear(8, 8, bias=False)
    tied.head.weight = tied.embed.weight
    with pytest.warns(UserWarning, match=r"'head' \(weight tied to an nn.Embedding\)"):
        assert [layer.name for layer in ip.select_layers(tied)] == ["mid"]


def test_an_empty_default_selection_names_what_was_left_out_and_why():
    model = PlainLM(40)
    model.head.weight = model.embed.weight
    for layer in (model.up, model.down):
        layer.requires_grad_(False)
    with pytest.raises(ip.ConfigurationError, match=r"left out as the unembedding: 'head' \(weight tied to an "
                                                    r"nn.Embedding\).*modules=\['\*'\]"):
        ip.select_layers(model)


@pytest.mark.parametrize("strategy,dtype", [("ekfac", "float32"), ("kfac", "float64"), ("diagonal", "float32")])
def test_memory_estimate_counts_the_accumulators(strategy, dtype):
    model = llama()
    with pytest.warns(UserWarning, match="unembedding"):
        layers = ip.select_layers(model)
    estimate = estimate_memory(layers, ip.InfluenceConfig(strategy=strategy, accumulation_dtype=dtype))
    itemsize = 4 if dtype == "float32" else 8
    for layer, row in zip(layers, estimate.layers):
        d_out, d_in = layer.shape
        covariances = (d_in * d_in + d_out * d_out) * (strategy != "diagonal")
        eigenvalues = d_out * d_in * (strategy != "kfac")
        assert row.statistics == (covariances + eigenvalues) * itemsize
    assert estimate.statistics_bytes == sum(row.statistics for row in estimate.layers)
    assert estimate.total_bytes == estimate.statistics_bytes + estimate.eigenbasis_bytes + estimate.scratch_bytes
    table = estimate.table()
    assert "model.layers.0.mlp.down_proj" in table and "32x64" in table and "total" in table
    head = estimate_memory(ip.select_layers(model, ["lm_head"]), ip.InfluenceConfig(strategy="ekfac"))
    assert head.statistics_bytes == (32 * 32 + 32000 * 32000 + 32000 * 32) * 4  # 3.8 GiB: why it is left out


def test_tracker_logs_the_memory_of_its_selection(caplog):
    model = llama(vocab=2000)
    with caplog.at_level(logging.INFO, logger="infl_plugin"), pytest.warns(UserWarning, match="unembedding"):
        tracker = ip.InfluenceTracker(model, ip.CausalLMTask(), ip.InfluenceConfig())
    tracker.close()
    text = caplog.text
    assert "model.layers.0.self_attn.q_proj" in text and "lm_head" not in text and "ekfac: about" in text


def test_loss_from_output_is_the_tasks_loss_without_another_forward():
    """Adapters compare a training step's loss with ``Σ_n loss_n`` from the output they already
    have; it must be exactly the task's `loss` (same operations on the same logits)."""
    torch.manual_seed(0)
    classifier, x, y = nn.Linear(5, 3), torch.randn(6, 5), torch.randint(0, 3, (6,))
    regressor, targets = nn.Linear(5, 2), torch.randn(6, 2)
    lm = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 11))
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    cases = [(ip.ClassificationTask(), classifier, (x, y), classifier(x)),
             (ip.RegressionTask(), regressor, (x, targets), regressor(x)),
             (ip.CausalLMTask(), lambda input_ids, attention_mask: lm(input_ids),
              {"input_ids": ids, "attention_mask": mask}, lm(ids))]
    for task, model, batch, output in cases:
        assert torch.equal(task.loss_from_output(output, batch), task.loss(model, batch)), type(task).__name__
    with pytest.raises(NotImplementedError):
        ip.Task().loss_from_output(classifier(x), (x, y))
