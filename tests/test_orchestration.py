"""Orchestration guarantees: crash and resume from the cache, identical results on every task runner,
retries of a failing layer, CPU fallback after CUDA out-of-memory."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_ranks.config import load_rank_config
from lora_ranks.settings import AllocationSettings
from lora_ranks.spectra import spectrum as spectra
from lora_ranks.synthetic import write_planted_pair

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
KW = dict(allocation=AllocationSettings(energy_threshold=0.95, min_rank=2, max_rank=32, smoothing="none"))


@pytest.fixture(scope="module")
def six_layer_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("six")
    return write_planted_pair(root / "base", root / "ft", num_layers=6, planted_rank=(3, 9, 17), noise=1e-2)


def _comparable(config: dict) -> dict:
    """Everything in a config except wall times and the runner-dependent timing section."""
    modules = {n: m.model_dump(exclude={"svd_seconds"}) for n, m in config.modules.items()}
    return {"rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern,
            "layer_ranks": config.layer_ranks, "compression_ratio": config.compression_ratio, "modules": modules,
            "fingerprints": config.analysis_metadata.layer_fingerprints}


DRIVER = textwrap.dedent("""
    import os, sys
    import lora_ranks.analysis.layer as T  # the step the plan runs
    crash_at = os.environ.get("CRASH_AT_LAYER")
    original = T.analyze_layer
    def analyze_or_die(pair, modules, *args, **kwargs):
        if modules[0].layer == crash_at:
            os._exit(17)  # the process dies as under SIGKILL: no cleanup, no state reported
        return original(pair, modules, *args, **kwargs)
    T.analyze_layer = analyze_or_die
    from flows.svd_analysis import svd_analysis
    from lora_ranks.settings import AllocationSettings
    svd_analysis(base_model=sys.argv[1], finetuned_model=sys.argv[2], output_dir=sys.argv[3],
                 allocation=AllocationSettings(energy_threshold=0.95, min_rank=2, max_rank=32, smoothing="none"))
""")


def _run_driver(args, env, log_path, crash_at=None):
    """Run DRIVER in its own process group; afterwards stop whatever it left by killing that group. Returns (exit
    code, combined output)."""
    env = {**env, **({"CRASH_AT_LAYER": crash_at} if crash_at else {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we created: the driver and its server
            except ProcessLookupError:
                pass
    return code, Path(log_path).read_text()


def test_crash_then_rerun_computes_only_missing_layers(six_layer_pair, tmp_path, task_states):
    """A run killed outright (its own process, as a user's) after three layers; the rerun (here, in this process:
    results persist under the same Prefect home) takes those three from the cache and computes the other three."""
    from prefect.settings import PREFECT_API_URL

    from flows.svd_analysis import svd_analysis

    # The crashed run reports to this session's test server (starting an ephemeral one of its own costs ~8
    # CPU-seconds, and a migration on a fresh worker); what it finished persists under the same Prefect home.
    env = {**os.environ, "LORA_RANKS_MAX_WORKERS": "1", "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    out = tmp_path / "out"
    code, log = _run_driver([*six_layer_pair, out], env, tmp_path / "crashed.log", crash_at="model.layers.3")
    assert code == 17, log[-3000:]
    done_before = sorted(p.name for p in (out / "analysis_outputs" / "svd" / "raw_data" / "layers").glob("*"))
    assert done_before == [f"model.layers.{i}.safetensors" for i in range(3)]
    assert not (out / "configs" / "lora_rank_config.json").exists()

    base, finetuned = map(str, six_layer_pair)
    resumed = svd_analysis(base_model=base, finetuned_model=finetuned, output_dir=str(out), return_state=True, **KW)
    assert resumed.is_completed(), resumed.message
    states = task_states(resumed)
    for i in range(6):
        assert states[f"analyze-model.layers.{i}"] == [("Cached" if i < 3 else "Completed", 1)], f"layer {i}"

    reference = load_rank_config(svd_analysis(base_model=base, finetuned_model=finetuned,  # uninterrupted
                                              output_dir=str(tmp_path / "reference"), **KW))
    assert _comparable(load_rank_config(out / "configs" / "lora_rank_config.json")) == _comparable(reference)


def test_rerun_hits_cache_and_refresh_recomputes(planted_pair, tmp_path, task_states):
    from flows.svd_analysis import svd_analysis

    kwargs = dict(base_model=str(planted_pair[0]), finetuned_model=str(planted_pair[1]), output_dir=str(tmp_path),
                  return_state=True, **KW)
    layers = ["analyze-model.layers.0", "analyze-model.layers.1"]

    def analyzed(state):
        states = task_states(state)
        return {name: [s for s, _ in states[name]] for name in layers}

    first = svd_analysis(**kwargs)
    assert analyzed(first) == {name: ["Completed"] for name in layers}
    rerun = svd_analysis(**kwargs)
    assert analyzed(rerun) == {name: ["Cached"] for name in layers}
    # A deleted layer file is noticed and recomputed even though the cache still has the result.
    (tmp_path / "analysis_outputs" / "svd" / "raw_data" / "layers" / "model.layers.1.safetensors").unlink()
    healed = svd_analysis(**kwargs)
    assert (tmp_path / "analysis_outputs" / "svd" / "raw_data" / "layers" / "model.layers.1.safetensors").is_file()
    assert analyzed(healed) == {layers[0]: ["Cached"], layers[1]: ["Cached", "Completed"]}
    refreshed = svd_analysis(**kwargs, refresh=True)
    assert analyzed(refreshed) == {name: ["Completed"] for name in layers}
    configs = [load_rank_config(s.result()) for s in (first, rerun, healed, refreshed)]
    assert all(_comparable(c) == _comparable(configs[0]) for c in configs)


@pytest.fixture(scope="module")
def threads_config(planted_pair, tmp_path_factory, prefect_harness):
    """The planted pair's config from the default runner (threads), which every other runner must reproduce."""
    from flows.svd_analysis import svd_analysis

    return load_rank_config(svd_analysis(output_dir=str(tmp_path_factory.mktemp("threads")), refresh=True,
                                         base_model=str(planted_pair[0]), finetuned_model=str(planted_pair[1]), **KW))


@pytest.mark.parametrize("runner", ["processes", "dask"])
def test_every_task_runner_gives_the_same_config(planted_pair, tmp_path, threads_config, runner, monkeypatch):
    """The process pool and Dask reproduce the threads' config.
    Dask runs on an existing cluster, at LORA_RANKS_DASK_ADDRESS, as on a pool of machines: here a local one whose
    workers are threads of this process (its own cluster of worker processes cost ~85 CPU-seconds beside the
    suite, torch and Prefect imported in each); the local cluster the runner starts itself is checked below."""
    from flows import _runtime
    from flows.svd_analysis import svd_analysis

    kwargs = dict(base_model=str(planted_pair[0]), finetuned_model=str(planted_pair[1]), refresh=True, **KW)
    monkeypatch.setenv("LORA_RANKS_TASK_RUNNER", runner)
    # One worker process: the tasks still run in another process and come back (each worker costs ~25 CPU-seconds
    # to start, importing torch, transformers and Prefect); two workers and their pinning: the next test.
    monkeypatch.setenv("LORA_RANKS_MAX_WORKERS", "1" if runner == "processes" else "2")
    with contextlib.ExitStack() as stack:
        if runner == "dask":
            from distributed import LocalCluster

            cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                                       dashboard_address=None))
            monkeypatch.setenv("LORA_RANKS_DASK_ADDRESS", cluster.scheduler_address)
        task_runner = _runtime.task_runner()
        assert runner != "dask" or task_runner.address == cluster.scheduler_address
        other = load_rank_config(svd_analysis.with_options(task_runner=task_runner)(output_dir=str(tmp_path / runner),
                                                                                    **kwargs))
    assert _comparable(other) == _comparable(threads_config)


def test_dask_without_an_address_starts_a_local_cluster_of_processes(monkeypatch):
    """Without LORA_RANKS_DASK_ADDRESS, the Dask runner starts a local cluster of LORA_RANKS_MAX_WORKERS worker
    processes, one thread each (a layer task's matrix products use every core of its process already)."""
    from flows import _runtime

    monkeypatch.setenv("LORA_RANKS_TASK_RUNNER", "dask")
    monkeypatch.delenv("LORA_RANKS_DASK_ADDRESS", raising=False)
    monkeypatch.setenv("LORA_RANKS_MAX_WORKERS", "3")
    runner = _runtime.task_runner()
    assert runner.address is None
    assert runner.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                     "dashboard_address": None}


def test_a_layer_that_fails_once_is_retried(planted_pair, tmp_path, monkeypatch, task_states):
    import lora_ranks.analysis.layer as T  # the step the plan runs
    from flows.svd_analysis import svd_analysis

    calls = {"n": 0}
    original = T.analyze_layer

    def flaky(pair, modules, *args, **kwargs):
        if modules[0].layer == "model.layers.1" and calls["n"] == 0:
            calls["n"] += 1
            raise OSError("injected transient read error")
        return original(pair, modules, *args, **kwargs)

    monkeypatch.setattr(T, "analyze_layer", flaky)
    state = svd_analysis(
        base_model=str(planted_pair[0]), finetuned_model=str(planted_pair[1]), output_dir=str(tmp_path),
        refresh=True, return_state=True, **KW)
    assert calls["n"] == 1
    assert task_states(state)["analyze-model.layers.1"] == [("Completed", 2)]  # failed once, retried, succeeded
    assert task_states(state)["analyze-model.layers.0"] == [("Completed", 1)]
    assert load_rank_config(state.result()).analysis_metadata.n_modules == 14


def test_cuda_out_of_memory_falls_back_to_cpu(monkeypatch):
    real = spectra._compute_spectrum

    def oom_on_cuda(delta, top_k, method, dev, *rest):
        if dev.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(delta, top_k, method, dev, *rest)

    monkeypatch.setattr(spectra, "_compute_spectrum", oom_on_cuda)
    a = torch.randn(40, 30, dtype=torch.float64).float()
    result = spectra.compute_spectrum(a, 10, device="cuda")
    assert result.device == "cpu (CUDA out of memory)"
    ref = torch.linalg.svdvals(a.double())[:10].numpy()
    assert np.max(np.abs(result.singular_values[:10] - ref) / ref) < 1e-10


def test_process_pool_pins_one_gpu_per_worker(monkeypatch):
    """The process runner's initializer gives each worker its own device and a share of the CPU threads."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from flows import _runtime
    from tests._pool_probe import worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("LORA_RANKS_MAX_WORKERS", raising=False)
    monkeypatch.setenv("LORA_RANKS_TASK_RUNNER", "processes")
    assert _runtime.visible_gpus() == ["0", "1"]
    runner = _runtime.task_runner()
    assert runner._max_workers == 2 and runner._initargs == (("0", "1"), max(1, (os.cpu_count() or 1) // 2))

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"), initializer=_runtime.pin_worker,
                             initargs=(("0", "1"), 1)) as pool:
        seen = list(pool.map(worker_env, range(16)))
    device_of = {}
    for pid, device, threads in seen:
        assert device in ("0", "1") and threads == "1"
        assert device_of.setdefault(pid, device) == device  # a worker keeps its device
    assert len(set(device_of.values())) == len(device_of)  # no two workers share one


def test_layer_cache_key_follows_numerics_and_device(planted_pair, tmp_path, monkeypatch, task_states):
    """A rerun hits the cache; other numerics (an upgrade, an edited spectra module) or another device type
    recompute, so a result computed by other code is never served."""
    import tasks.analysis as T
    from flows.svd_analysis import svd_analysis

    kwargs = dict(base_model=str(planted_pair[0]), finetuned_model=str(planted_pair[1]), output_dir=str(tmp_path),
                  return_state=True, **KW)

    def analyzed(state):
        return {name: [s for s, _ in v] for name, v in task_states(state).items() if name.startswith("analyze-")}

    layers = ["analyze-model.layers.0", "analyze-model.layers.1"]
    first = svd_analysis(**kwargs)
    assert analyzed(first) == {n: ["Completed"] for n in layers}
    assert analyzed(svd_analysis(**kwargs)) == {n: ["Cached"] for n in layers}
    with monkeypatch.context() as patch:
        patch.setattr(T, "numerics_identity", lambda: "spectra code of another version")
        assert analyzed(svd_analysis(**kwargs)) == {n: ["Completed"] for n in layers}
    with monkeypatch.context() as patch:  # the same pair analyzed where CUDA is the default device
        patch.setattr(T, "default_device", lambda: torch.device("cuda"))
        assert analyzed(svd_analysis(**kwargs)) == {n: ["Completed"] for n in layers}
    assert analyzed(svd_analysis(**kwargs)) == {n: ["Cached"] for n in layers}  # back as before: cached


def test_numerics_identity_changes_when_the_code_does(tmp_path, monkeypatch):
    import importlib
    import sys

    import lora_ranks.analysis.layer as layer

    module = tmp_path / "fake_spectra.py"
    module.write_text("ALGORITHM = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(layer, "_NUMERICS_MODULES", layer._NUMERICS_MODULES + ("fake_spectra",))
    layer.numerics_identity.cache_clear()
    before = layer.numerics_identity()
    module.write_text("ALGORITHM = 2  # a changed rule\n")
    sys.modules.pop("fake_spectra", None)
    importlib.invalidate_caches()
    layer.numerics_identity.cache_clear()
    assert layer.numerics_identity() != before
    layer.numerics_identity.cache_clear()
