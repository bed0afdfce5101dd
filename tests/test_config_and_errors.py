"""Configuration validation, layer selection, persistence and bad inputs."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import infl_plugin as ip

from models import ImageNet, image_data, loader


@pytest.mark.parametrize(
    "kwargs,field,allowed",
    [
        ({"strategy": "ekafc"}, "strategy", "'identity', 'diagonal', 'kfac', 'ekfac'"),
        ({"fisher": "true"}, "fisher", "'empirical', 'sampled'"),
        ({"damping": 0.0}, "damping", "float > 0"),
        ({"damping": -1.0}, "damping", "float > 0"),
        ({"damping": "abc"}, "damping", "float > 0"),
        ({"damping": float("inf")}, "damping", "finite float > 0"),
        ({"damping": float("nan")}, "damping", "finite float > 0"),
        ({"seed": "x"}, "seed", "integer"),
        ({"seed": True}, "seed", "integer"),
        ({"module_types": ["LSTM"]}, "module_types", "'Linear', 'Conv1D', 'Conv2d'"),
        ({"dampnig": 0.1}, "dampnig", "allowed fields: ['accumulation_dtype', 'damping'"),
        ({"query_rank": 0}, "query_rank", "integer >= 1"),
        ({"update_every": 0}, "update_every", "integer >= 1"),
        ({"accumulation_dtype": "bfloat16"}, "accumulation_dtype", "'float32', 'float64'"),
        ({"modules": "fc"}, "modules", "list of strings"),
    ],
)
def test_invalid_config_names_field_and_allowed_values(kwargs, field, allowed):
    with pytest.raises(ip.ConfigurationError) as info:
        ip.InfluenceConfig(**kwargs)
    assert isinstance(info.value, (ValueError, ip.InfluenceError))
    named = f"InfluenceConfig.{field}" in str(info.value) or f"no field(s) ['{field}']" in str(info.value)
    assert named and allowed in str(info.value)


def test_config_is_an_omegaconf_structured_config():
    schema = OmegaConf.structured(ip.InfluenceConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"strategy": "kfac", "modules": ["fc*"], "damping": 0.01}))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, ip.InfluenceConfig) and config.modules == ["fc*"] and config.damping == 0.01
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, OmegaConf.create({"stratgey": "kfac"}))
    with pytest.raises(ValueError, match="InfluenceConfig.strategy"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"strategy": "nope"}))
    with pytest.raises(ValueError, match="no field"):
        ip.InfluenceConfig.from_dict({"strategy": "kfac", "bogus": 1})
    with pytest.raises(ValueError, match="InfluenceConfig.module_types"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"module_types": ["Embedding"]}))


def test_config_builds_from_a_lightning_cli_style_parser():
    """The unknown-field guard leaves the dataclass as jsonargparse (LightningCLI) reads it."""
    jsonargparse = pytest.importorskip("jsonargparse")

    class Holder:
        def __init__(self, config: ip.InfluenceConfig = None) -> None:
            self.config = config

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Holder, "holder")
    parsed = parser.parse_args(["--holder.config.strategy=kfac", "--holder.config.damping=0.5"])
    config = parser.instantiate_classes(parsed).holder.config
    assert isinstance(config, ip.InfluenceConfig) and config.strategy == "kfac" and config.damping == 0.5


def test_layer_selection_by_pattern_and_type():
    model = ImageNet()
    assert [layer.name for layer in ip.select_layers(model, ["fc"])] == ["fc"]
    assert [layer.kind for layer in ip.select_layers(model, types=["Conv2d"])] == ["Conv2d"]
    with pytest.raises(ValueError, match="No trainable layer matches"):
        ip.select_layers(model, ["decoder.*"])
    with pytest.raises(ValueError, match="module_types"):
        ip.select_layers(model, types=["LSTM"])


def test_unsupported_layers_that_were_asked_for_are_named():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(3),
                          nn.LayerNorm(3), nn.ReLU(), nn.Dropout(0.1))
    model(torch.randn(1, 4, 5, 5))
    with pytest.warns(UserWarning, match=r"0 \(Conv2d: grouped") as record:
        layers = ip.select_layers(model, ["*"])
    assert [layer.name for layer in layers] == ["2"]
    message = str(record[0].message)
    assert "3 (LayerNorm" in message  # has parameters the user might expect to be tracked
    assert "Flatten" not in message and "ReLU" not in message and "Dropout" not in message


def test_a_vocabulary_sized_layer_is_named_before_anything_is_allocated():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 20_000, bias=False))  # S alone: 20000² floats = 1.5 GiB
    with pytest.warns(UserWarning, match=r"layer '1' \(\[20000, 8\]\) needs 1\.5 GiB") as record:
        tracker = ip.InfluenceTracker(model, ip.ClassificationTask(), ip.InfluenceConfig(strategy="kfac"))
    tracker.close()
    assert len(record) == 1  # the small layer is not named
    assert all(s.a_sum is None and s.s_sum is None for s in tracker.statistics.totals.values())


def test_frozen_layers_are_not_tracked():
    model = ImageNet()
    model.conv.requires_grad_(False)
    assert [layer.name for layer in ip.select_layers(model)] == ["fc"]


def test_empty_loader_is_a_clear_error():
    model = ImageNet().double()
    with pytest.raises(ValueError, match="empty loader"):
        ip.fit_factors(model, ip.ClassificationTask(), [], ip.InfluenceConfig())
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(image_data(), 4), ip.InfluenceConfig())
    attributor = ip.Attributor(model, ip.ClassificationTask(), factors)
    with pytest.raises(ValueError, match="query loader yielded no batch"):
        attributor.pairwise_scores([], loader(image_data(), 4))
    with pytest.raises(ValueError, match="training loader yielded no batch"):
        attributor.pairwise_scores(loader(image_data(4), 4), [])


def test_nan_batch_in_fitting_is_skipped_counted_and_warned():
    model = ImageNet().double()
    items = image_data()
    bad = [(torch.full_like(items[0][0], float("nan")), items[0][1])] + items[1:4]
    with pytest.warns(UserWarning, match="skipped 1 of 3 batches"):
        factors = ip.fit_factors(model, ip.ClassificationTask(), loader(bad + items[4:], 4), ip.InfluenceConfig(accumulation_dtype="float64"))
    clean = ip.fit_factors(model, ip.ClassificationTask(), loader(items[4:], 4), ip.InfluenceConfig(accumulation_dtype="float64"))
    for name, f in clean.layers.items():
        torch.testing.assert_close(factors.layers[name].eigenvalues, f.eigenvalues)
    with pytest.raises(ValueError, match="None of the 1 batches"):
        ip.fit_factors(model, ip.ClassificationTask(), loader(bad[:1], 4), ip.InfluenceConfig())


def test_factors_save_load_round_trip_and_refuse_other_layers(tmp_path):
    model = ImageNet().double()
    config = ip.InfluenceConfig(strategy="ekfac", accumulation_dtype="float64")
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(image_data(), 4), config)
    path = tmp_path / "factors.safetensors"
    factors.save(path)
    loaded = ip.Factors.load(path)
    assert loaded.strategy == "ekfac" and loaded.config == config.to_dict()
    for name, f in factors.layers.items():
        g = loaded.layers[name]
        assert torch.equal(f.q_a, g.q_a) and torch.equal(f.eigenvalues, g.eigenvalues) and f.damping == g.damping
    queries, train = loader(image_data(3, seed=1), 3), loader(image_data(), 4)
    torch.testing.assert_close(
        ip.Attributor(model, ip.ClassificationTask(), loaded, config).pairwise_scores(queries, train),
        ip.Attributor(model, ip.ClassificationTask(), factors, config).pairwise_scores(queries, train),
    )
    with pytest.raises(ValueError, match="another layer set"):
        ip.Attributor(model, ip.ClassificationTask(), loaded, ip.InfluenceConfig(modules=["fc"]))



@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "tail", "foreign", "missing tensor", "no shapes"])
def test_damaged_factors_file_is_a_clear_error_naming_the_path(tmp_path, damage):
    model = ImageNet().double()
    good = tmp_path / "good.safetensors"
    ip.fit_factors(model, ip.ClassificationTask(), loader(image_data(), 4), ip.InfluenceConfig(strategy="kfac")).save(good)
    data, path = good.read_bytes(), tmp_path / f"{damage.replace(' ', '_')}.safetensors"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "tail":
        path.write_bytes(data[:-8])
    elif damage == "foreign":
        save_file({"w": torch.zeros(2)}, str(path))
    else:
        with safe_open(str(good), framework="pt") as handle:
            meta = json.loads(handle.metadata()["infl_plugin"])
        tensors = load_file(str(good))
        if damage == "missing tensor":
            del tensors["fc::q_s"]
        else:
            del meta["shapes"]
        save_file(tensors, str(path), metadata={"infl_plugin": json.dumps(meta)})
    with pytest.raises(ip.FactorsFileError) as info:
        ip.Factors.load(path)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)
    expected = {"missing tensor": r"'fc' lacks the \['q_s'\]", "no shapes": r"lacks the factors metadata entries \['shapes'\]",
                "foreign": "not an infl_plugin factors file"}
    if damage in expected:
        assert re.search(expected[damage], str(info.value))
    with pytest.raises(FileNotFoundError, match="No factors file"):
        ip.Factors.load(tmp_path / "absent.safetensors")


def test_attribution_leaves_gradients_and_mode_untouched():
    model = ImageNet().double().train()
    items = image_data()
    F.cross_entropy(model(torch.stack([x for x, _ in items])), torch.stack([y for _, y in items])).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    factors = ip.fit_factors(model, ip.ClassificationTask(), loader(items, 4), ip.InfluenceConfig(fisher="sampled"))
    ip.Attributor(model, ip.ClassificationTask(), factors).self_scores(loader(items, 4))
    assert model.training
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert not any(m._forward_hooks for m in model.modules())


def test_regression_task_sampled_fisher_is_the_gauss_newton_matrix():
    """For ½‖Wx − y‖², E over sampled y of g gᵀ is the GGN: S → I (per example, one token)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    items = [(torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)) for _ in range(4000)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = ip.fit_factors(model, ip.RegressionTask(), loader(items, 500),
                                 ip.InfluenceConfig(strategy="kfac", fisher="sampled", accumulation_dtype="float64"))
    f = factors.layers[""]
    s_eigenvalues = f.eigenvalues[:, 0] / torch.linalg.eigvalsh(
        torch.stack([x for x, _ in items]).T @ torch.stack([x for x, _ in items]) / len(items))[0]
    torch.testing.assert_close(s_eigenvalues, torch.ones(2, dtype=torch.float64), atol=0.1, rtol=0)


def test_core_imports_without_lightning_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import infl_plugin, infl_plugin.integrations\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
