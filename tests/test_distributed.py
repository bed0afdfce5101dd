"""Two CPU processes (gloo) launched with torchrun: Lightning DDP and the Hugging Face Trainer with
the influence callbacks finish (a deadlock fails the test at its timeout instead of hanging CI) and
give the statistics, factors and scores of one process trained on the same global batches."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import warnings
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import infl_plugin as ip
from infl_plugin.results.artifacts import read_artifacts

SCRIPTS = Path(__file__).resolve().parent / "ddp_scripts"
TIMEOUT_S = 300  # a healthy 2-process run takes 10-40 s on 2 cores; a deadlock never ends


def _script(name: str) -> ModuleType:
    if str(SCRIPTS) not in sys.path:  # the scripts import their shared `reports` module
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"ddp_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(script: str, *args: str, cwd: Path, processes: int = 2) -> str:
    """Run ``script`` under ``torch.distributed.run``; fail (killing the process group) on a
    non-zero exit or after `TIMEOUT_S`. Returns the combined output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(SCRIPTS / f"{script}.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo between local processes, whatever the host name resolves to
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{script} {' '.join(args)} did not finish within {TIMEOUT_S}s (a deadlock?):\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


def _ranks(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(2)]


def _assert_same_operator(a: ip.Factors, b: ip.Factors, rtol: float) -> None:
    """Both factors apply the same (G + λI)⁻¹ to random matrices (eigenvectors themselves are only
    defined up to sign and rotation within repeated eigenvalues)."""
    g = torch.Generator().manual_seed(0)
    for name, shape in a.shapes.items():
        v = torch.randn(5, *shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(a.precondition(name, v), b.precondition(name, v), rtol=rtol, atol=0.0)


def _assert_same_statistics(a: dict, b: dict, rtol: float) -> None:
    """Summed statistics (``CurvatureStatistics.state_dict``): equal counts, sums within ``rtol``."""
    assert a["layers"].keys() == b["layers"].keys()
    for name, layer in a["layers"].items():
        for key, value in layer.items():
            other = b["layers"][name][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, other, rtol=rtol, atol=rtol * float(value.abs().max()),
                                           msg=lambda message: f"{name}.{key}: {message}")
            else:
                assert value == other, (name, key)


# ------------------------------------------------------------------------------------ agreed decisions
def test_attribution_decides_from_the_reduced_statistics():
    """A process whose own statistics are empty (all its batches skipped) while another's are not
    must still attribute: the decision is read from the sums over processes. The reduction is
    stood in for by the other process's statistics (what ``all_reduce`` would add to zeros)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    task, config = ip.ClassificationTask(), ip.InfluenceConfig(update_every=1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    batches = [(x[i:i + 8], y[i:i + 8]) for i in (0, 8)]

    other = ip.InfluenceSession(model, task, config, progress=False).attach()
    torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    assert other.after_backward(batches[0])
    other.close()
    model.zero_grad()

    session = ip.InfluenceSession(model, task, config, progress=False, strict=True)
    session.set_data(batches, batches)
    assert not session.tracker.statistics.has_covariances
    session.tracker.statistics.reduced = other.tracker.statistics.reduced
    result = session.attribute(1)
    assert result is not None and session.attributions == 1 and session.last_attribution_step == 1
    assert session.tracker.statistics.bases is not None  # the eigenbasis was refreshed from the sums
    session.close()


# ------------------------------------------------------------------------------------ Lightning
@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory) -> Path:
    """One torchrun launch for all Lightning fits (see ``ddp_scripts/lightning_ddp.py``)."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    torchrun("lightning_ddp", str(out), cwd=out)
    return out


@pytest.mark.slow
def test_lightning_ddp_equals_one_process_on_the_same_global_batches(lightning_runs, tmp_path):
    """Under ``logger=False``, a CSVLogger and a TensorBoardLogger (each once hung in ``setup`` on
    a rank-0-only ``trainer.log_dir``), with the validation loader of ``fit(model, train, val)`` as
    queries. Each rank trains on half of each global batch of 8, the reference process on all 8:
    DDP's gradient average equals the reference's batch mean, the summed statistics equal the
    reference's, and so do those in the checkpoints the CSV run saved. Tolerances: float32 sums over 4 vs 8 rows in another order and SGD trajectories
    that agree to rounding: relative 1e-4 on the statistics; 1e-3 on operators and scores, since
    (Λ + λ)⁻¹ amplifies the rounding of the smallest eigenvalues (2e-4 seen)."""
    lightning_ddp = _script("lightning_ddp")
    reference = lightning_ddp.fit(tmp_path / "single", "single", False, world=1, rank=0)
    assert reference["last_step"] == 8 and reference["attributions"] == 4
    for name in ("none", "csv", "tensorboard"):
        run = torch.load(lightning_runs / f"{name}.pt", weights_only=False)
        for rank in _ranks(lightning_runs, name):
            assert (rank["steps"], rank["attributions"], rank["failed_attributions"], rank["skipped_batches"]) == (8, 4, 0, 0)
        assert run["last_step"] == 8
        for p, q in zip(run["parameters"], reference["parameters"]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        _assert_same_statistics(run["state"]["tracker"]["statistics"], reference["state"]["tracker"]["statistics"], 1e-4)
        _assert_same_operator(run["factors"], reference["factors"], rtol=1e-3)
        scale = float(reference["scores"].abs().max())
        torch.testing.assert_close(run["scores"], reference["scores"], rtol=1e-3, atol=1e-3 * scale)
        assert read_artifacts(run["artifact_dir"])["step"].tolist() == [2, 4, 6, 8]
    for step in (4, 8):  # checkpoints hold the statistics summed over both ranks
        saved = torch.load(lightning_runs / "csv" / "ckpt" / f"step={step}.ckpt", weights_only=False)
        statistics = saved["callbacks"]["InfluenceCallback[influence]"]["tracker"]["statistics"]
        assert all(layer["examples"] == step * 8 for layer in statistics["layers"].values())
    _assert_same_statistics(statistics, reference["state"]["tracker"]["statistics"], 1e-4)


@pytest.mark.slow
def test_lightning_ddp_streamed_scores_equal_one_process(lightning_runs, tmp_path):
    """``candidates="stream"``: each rank scores the examples of its own half-batches from its
    training backward; gathered at the attribution they are the scores one process streams from
    its full batches (the 16 examples of steps 5-6 at the last attribution; tolerance as above)."""
    lightning_ddp = _script("lightning_ddp")
    reference = lightning_ddp.fit(tmp_path / "single", "single", False, world=1, rank=0, candidates="stream")
    run = torch.load(lightning_runs / "stream.pt", weights_only=False)
    for rank in _ranks(lightning_runs, "stream"):
        assert (rank["attributions"], rank["failed_attributions"], rank["skipped_batches"]) == (4, 0, 0)
    assert run["last_step"] == reference["last_step"] == 8
    order, reference_order = run["candidate_indices"].argsort(), reference["candidate_indices"].argsort()
    assert run["candidate_indices"][order].tolist() == reference["candidate_indices"][reference_order].tolist()
    assert run["candidate_indices"].numel() == 16
    scale = float(reference["scores"].abs().max())
    torch.testing.assert_close(run["scores"][:, order], reference["scores"][:, reference_order], rtol=1e-3,
                               atol=1e-3 * scale)


@pytest.mark.slow
def test_lightning_ddp_refined_streaming_queries_equal_one_process(lightning_runs, tmp_path):
    """``refine_steps=3`` under DDP: the streaming queries' conjugate-gradient steps use Gauss-Newton
    products summed over the ranks (rank r the r-th of every 2 curvature batches), so the streamed
    scores equal one process's over all batches; and refinement changed them (against the plain
    ``stream`` run). Tolerance as above."""
    lightning_ddp = _script("lightning_ddp")
    reference = lightning_ddp.fit(tmp_path / "single", "single", False, world=1, rank=0, mode="refine",
                                  candidates="stream")
    run = torch.load(lightning_runs / "refine.pt", weights_only=False)
    plain = torch.load(lightning_runs / "stream.pt", weights_only=False)
    for rank in _ranks(lightning_runs, "refine"):
        assert (rank["attributions"], rank["failed_attributions"], rank["skipped_batches"]) == (4, 0, 0)
    order, reference_order = run["candidate_indices"].argsort(), reference["candidate_indices"].argsort()
    assert run["candidate_indices"][order].tolist() == reference["candidate_indices"][reference_order].tolist()
    scale = float(reference["scores"].abs().max())
    torch.testing.assert_close(run["scores"][:, order], reference["scores"][:, reference_order], rtol=1e-3,
                               atol=1e-3 * scale)
    assert not torch.allclose(run["scores"], plain["scores"], rtol=1e-2, atol=0)


@pytest.mark.slow
def test_lightning_ddp_statistics_skipped_on_one_rank_only(lightning_runs):
    """Rank 1 refuses its first micro-batch's statistics (NaN loss scale), rank 0 keeps its own,
    and an attribution follows at once: every rank must take the attribution's branch from the
    summed statistics (rank 1 alone has none) or one waits in ``all_reduce`` forever."""
    rank0, rank1 = _ranks(lightning_runs, "skip")
    assert rank0["steps"] == rank1["steps"] == 4
    assert rank0["attributions"] == rank1["attributions"] == 4 and rank0["failed_attributions"] == 0
    assert (rank0["skipped_batches"], rank1["skipped_batches"]) == (0, 1)
    assert not any("skipped the statistics" in w for w in rank0["warnings"])
    assert sum("skipped the statistics" in w for w in rank1["warnings"]) == 1
    run = torch.load(lightning_runs / "skip.pt", weights_only=False)
    assert run["last_step"] == 4 and torch.isfinite(run["scores"]).all()
    statistics = run["state"]["tracker"]["statistics"]["layers"]
    assert all(layer["examples"] == 4 * 8 - 4 for layer in statistics.values())  # 4 steps × 8 rows, less rank 1's 4


# ------------------------------------------------------------------------------------ FSDP2
@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    """One torchrun launch for the FSDP2 fits (see ``ddp_scripts/lightning_fsdp.py``)."""
    out = tmp_path_factory.mktemp("lightning_fsdp")
    torchrun("lightning_fsdp", str(out), cwd=out)
    return out


def _assert_fsdp_run_equals(out: Path, name: str, reference: dict) -> None:
    """Both ranks attributed 4 times and hold the same gathered result; it equals one process's.
    Tolerance: the runs agree to float64 rounding, the scores are stored in float32 (relative
    1e-7), so 1e-5 of the largest score; the top-k lists exactly."""
    run = torch.load(out / f"{name}.pt", weights_only=False)
    for rank in _ranks(out, name):
        assert (rank["steps"], rank["attributions"], rank["failed_attributions"], rank["skipped_batches"]) == (8, 4, 0, 0)
    held = [torch.load(out / f"{name}_result{r}.pt", weights_only=False) for r in range(2)]
    assert torch.equal(held[0]["scores"], held[1]["scores"]) and torch.equal(held[0]["scores"], run["scores"])
    assert run["last_step"] == reference["last_step"] == 8
    order, reference_order = run["candidate_indices"].argsort(), reference["candidate_indices"].argsort()
    assert run["candidate_indices"][order].tolist() == reference["candidate_indices"][reference_order].tolist()
    scale = float(reference["scores"].abs().max())
    torch.testing.assert_close(run["scores"][:, order], reference["scores"][:, reference_order], rtol=1e-5,
                               atol=1e-5 * scale)
    assert run["helpful_indices"].tolist() == reference["helpful_indices"].tolist()


@pytest.mark.slow
def test_fsdp2_checkpoint_attribution_equals_one_process(fsdp_runs, tmp_path):
    """FSDP2 through Lightning's ``ModelParallelStrategy`` (every ``nn.Linear`` and the root
    ``fully_shard``-ed), candidates scored at each attribution: every pass runs on both ranks in
    step (a sharded forward all-gathers the parameters), each rank scores half of the candidate
    batches, and the gathered scores and self-influence equal one process's on the same global
    batches. Before, the first attribution ran on rank 0 alone and waited forever in FSDP's all-gather."""
    lightning_fsdp = _script("lightning_fsdp")
    reference = lightning_fsdp.fit(tmp_path / "single", "all", world=1, rank=0, candidates="all")
    _assert_fsdp_run_equals(fsdp_runs, "all", reference)
    run = torch.load(fsdp_runs / "all.pt", weights_only=False)
    scale = float(reference["self_scores"].abs().max())
    torch.testing.assert_close(run["self_scores"], reference["self_scores"], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.slow
def test_fsdp2_streamed_attribution_equals_one_process(fsdp_runs, tmp_path):
    """``candidates="stream"`` under FSDP2: each rank streams its own examples, gathered at the
    attribution; the queries are preconditioned on both ranks in step."""
    lightning_fsdp = _script("lightning_fsdp")
    reference = lightning_fsdp.fit(tmp_path / "single", "stream", world=1, rank=0, candidates="stream")
    _assert_fsdp_run_equals(fsdp_runs, "stream", reference)


@pytest.mark.slow
def test_fsdp2_resumed_run_equals_the_uninterrupted_one(fsdp_runs):
    """The FSDP2 fit resumed from its step-4 checkpoint (the callback's state summed over the ranks
    in it) attributes at steps 6 and 8 exactly as the uninterrupted fit (float32 scores: 1e-5)."""
    resumed = torch.load(fsdp_runs / "resume.pt", weights_only=False)
    full = torch.load(fsdp_runs / "all.pt", weights_only=False)
    for rank in _ranks(fsdp_runs, "resume"):
        assert (rank["steps"], rank["attributions"], rank["failed_attributions"]) == (8, 4, 0)
    assert resumed["last_step"] == 8
    scale = float(full["scores"].abs().max())
    torch.testing.assert_close(resumed["scores"], full["scores"], rtol=1e-5, atol=1e-5 * scale)
    assert resumed["helpful_indices"].tolist() == full["helpful_indices"].tolist()


def test_refinement_under_fsdp2_is_refused_with_the_field_named(tmp_path):
    """Refinement's Gauss-Newton products swap the tracked parameters, which FSDP2 owns: refused
    when the data are set (Lightning: at train start, after ``configure_model``), naming the field."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,)))]
        session = ip.InfluenceSession(model, ip.ClassificationTask(), ip.InfluenceConfig(refine_steps=2), progress=False)
        with pytest.raises(ip.ConfigurationError, match="refine_steps=2 needs unsharded parameters"):
            session.set_data(batches, batches)
        ip.InfluenceSession(model, ip.ClassificationTask(), ip.InfluenceConfig(), progress=False).set_data(batches, batches)
    finally:
        torch.distributed.destroy_process_group()


def test_layer_selection_on_fsdp2_parameters_keeps_the_blocks(tmp_path):
    """Attributions select the layers again while FSDP2 holds the parameters as DTensors, whose data
    addresses are all alike: the tied-weight test must tell the blocks from the tied head (it took
    every layer for the embedding, and the first attribution of a sharded GPT-2 failed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=2, n_head=2))
        mesh = init_device_mesh("cpu", (1,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert hasattr(model.transformer.h[0].mlp.c_fc.weight, "placements")  # a DTensor outside the forward
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = [layer.name for layer in ip.select_layers(model)]
        assert len(names) == 8 and "lm_head" not in names
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.slow
def test_huggingface_trainer_two_processes_equal_one_process(tmp_path):
    """A tiny GPT-2 under ``torchrun --nproc_per_node 2`` (gloo, CPU) with the callback attached:
    it finishes, saves its influence state with each checkpoint, both ranks attribute on the same
    steps, and the statistics summed over the ranks
    equal those of one process trained on the same global batches (the per-rank loss is normalised
    by the tokens of both ranks and DDP averages: the same per-example gradients). Tolerances as
    in the Lightning comparison."""
    hf_ddp = _script("hf_ddp")
    torchrun("hf_ddp", str(tmp_path), cwd=tmp_path)
    reference = hf_ddp.train(tmp_path, "single", world=1)
    run = torch.load(tmp_path / "ddp.pt", weights_only=False)
    for rank in _ranks(tmp_path, "ddp"):
        assert (rank["steps"], rank["attributions"], rank["failed_attributions"], rank["skipped_batches"]) == (4, 2, 0, 0)
    assert run["last_step"] == reference["last_step"] == 4
    for p, q in zip(run["parameters"], reference["parameters"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    _assert_same_statistics(run["state"]["tracker"]["statistics"], reference["state"]["tracker"]["statistics"], 1e-4)
    scale = float(reference["scores"].abs().max())
    torch.testing.assert_close(run["scores"], reference["scores"], rtol=1e-3, atol=1e-3 * scale)
    for step in (2, 4):  # on_save ran on both ranks (its state is a collective) and rank 0 wrote it
        assert (tmp_path / "ddp" / f"checkpoint-{step}" / "influence_state.safetensors").is_file()


# ------------------------------------------------------------------------------------ DeepSpeed
def test_deepspeed_is_refused_at_train_start_saying_what_works():
    """ZeRO-3 keeps weights as empty placeholders outside their forward: both callbacks refuse
    DeepSpeed when training starts, naming the setting and the strategies that work instead."""
    from types import SimpleNamespace

    from infl_plugin.integrations.hf_queries import refuse_unsupported_training
    from infl_plugin.integrations.lightning import InfluenceCallback

    class DeepSpeedStrategy:  # what Lightning's strategy is called; deepspeed itself is not needed
        pass

    callback = InfluenceCallback(task="classification", queries="val")
    with pytest.raises(ip.ConfigurationError, match=r"InfluenceCallback does not support DeepSpeed \(strategy="
                                                     r"DeepSpeedStrategy\).*ModelParallelStrategy"):
        callback.setup(SimpleNamespace(strategy=DeepSpeedStrategy()), torch.nn.Linear(2, 2), "fit")
    with pytest.raises(ip.ConfigurationError, match=r"TrainingArguments.deepspeed.*Use DDP, or FSDP"):
        refuse_unsupported_training(SimpleNamespace(deepspeed="ds_config.json"), None)
    refuse_unsupported_training(SimpleNamespace(deepspeed=None), None)
