"""The vLLM backend's pieces that need no engine (vlmflow.engine): the server's command
line, the requests' sampling, the model's generation defaults, a dead engine's reason."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from vlmflow import engine

PIN = "ab" * 20


def test_the_server_command_carries_the_pinned_revision_and_the_engine_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    options = engine.EngineSettings(max_model_len=4096, gpu_memory_utilization=0.8)
    args = engine.server_command(
        "apptainer exec --nv 'my image.sif' vllm serve",
        f"org/model@{PIN}",
        options,
        "bfloat16",
        True,
        7,
        8123,
    )
    assert args[:5] == ["apptainer", "exec", "--nv", "my image.sif", "vllm"]
    assert args[args.index("--model") + 1] == "org/model"
    assert args[args.index("--revision") + 1] == PIN
    assert args[args.index("--tensor-parallel-size") + 1] == "2"  # the job's GPUs
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.8"
    assert args[args.index("--seed") + 1] == "7"
    assert args[args.index("--dtype") + 1] == "bfloat16"
    assert "--trust-remote-code" in args
    assert "--no-enable-chunked-prefill" not in args  # GPUs rewind seeded generators
    assert "--enforce-eager" not in args
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu = engine.server_command(
        "vllm serve", "/models/x", engine.EngineSettings(), "auto", False, 0, 1
    )
    assert "--revision" not in cpu and "--trust-remote-code" not in cpu
    assert cpu[cpu.index("--tensor-parallel-size") + 1] == "1"
    assert "--no-enable-chunked-prefill" in cpu and "--enforce-eager" in cpu


def test_greedy_requests_drop_the_sampling_parameters() -> None:
    sampled = engine.Sampling(16, True, 0.6, 0.7, (1, 2), {"5": 2.5}).body(seed=3)
    assert sampled["temperature"] == 0.6 and sampled["top_p"] == 0.7
    assert sampled["seed"] == 3 and sampled["stop_token_ids"] == [1, 2]
    assert sampled["logit_bias"] == {"5": 2.5} and sampled["return_token_ids"] is True
    greedy = engine.Sampling(16, False, 0.6, 0.7).body(seed=3)
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy
    assert "stop_token_ids" not in greedy and "logit_bias" not in greedy


def test_the_models_stop_ids_and_single_token_biases_go_with_every_request(
    tmp_path: Path,
) -> None:
    config = {"eos_token_id": [3, 9], "sequence_bias": [[[11], 2.5], [[12], -1.0]]}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert engine.generation_defaults(str(tmp_path)) == ((3, 9), {"11": 2.5, "12": -1.0})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    assert engine.generation_defaults(str(tmp_path)) == ((4,), {})
    config = {"eos_token_id": 4, "sequence_bias": [[[11, 12], 1.0]]}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    with pytest.raises(engine.EngineError, match="single tokens only"):
        engine.generation_defaults(str(tmp_path))
    assert engine.generation_defaults(str(tmp_path / "none")) == ((), {})


def test_a_dead_engines_reason_is_the_first_exception_in_its_log(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_text(
        "(APIServer pid=1) WARNING 11-29 21:18:22 [system_utils.py:255] failed with error X\n"
        "(Worker pid=2) ERROR 11-29 21:18:52 [executor.py:1] Traceback (most recent call last):\n"
        "(Worker pid=2) ERROR 11-29 21:18:52 [executor.py:1] RuntimeError: CPU Generator does "
        "not use offset\n"
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n"
        'INFO:     127.0.0.1:5 - "POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error\n'
    )
    assert engine.last_line(log) == "RuntimeError: CPU Generator does not use offset"
    log.write_text(
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "  Value error, max_model_len (999999) is too long\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
    )
    assert engine.last_line(log).endswith("Value error, max_model_len (999999) is too long")
    log.write_text("starting\nKilled\n")
    assert engine.last_line(log) == "Killed"
    assert engine.last_line(tmp_path / "missing.log") == "(no log)"


def test_a_deployment_logs_beside_the_job_and_defaults_to_the_engine_env() -> None:
    place = engine.deployment_of({}, "logs/caption/d/000001.log")
    assert place.command == engine.DEFAULT_COMMAND
    assert place.log_path == "logs/caption/d/000001.vllm.log"
    place = engine.deployment_of({"vllm": {"command": "vllm serve"}}, "x.log")
    assert place.command == "vllm serve"


def test_a_window_keeps_its_width_in_flight_and_yields_answers_as_they_arrive() -> None:
    lock = threading.Lock()
    state = {"in_flight": 0, "most": 0, "started": 0}

    def one(index: int) -> list[int]:
        with lock:
            state["in_flight"] += 1
            state["started"] += 1
            state["most"] = max(state["most"], state["in_flight"])
        time.sleep(0.002 * (index % 5))  # answers arrive out of order
        with lock:
            state["in_flight"] -= 1
        if index == 7:
            raise engine.RequestError("vLLM answered 400")
        return [index, index]

    results = dict(engine.in_window(one, list(range(40)), width=6))
    assert sorted(results) == list(range(40))
    assert isinstance(results.pop(7), engine.RequestError)  # that sample's failure, not the job's
    assert all(ids == [i, i] for i, ids in results.items())
    assert state["most"] == 6  # always refilled to the window, never above it

    # Leaving early sends nothing more than what was in flight.
    state["started"] = 0
    stream = engine.in_window(one, list(range(1000)), width=4)
    next(stream)
    stream.close()
    time.sleep(0.05)
    assert state["started"] <= 5


def test_the_window_is_the_servers_max_num_seqs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    args = engine.server_command("vllm serve", "m", engine.EngineSettings(), "auto", False, 0, 1)
    assert args[args.index("--max-num-seqs") + 1] == str(engine.CPU_WINDOW)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert engine.window_of(engine.EngineSettings()) == engine.GPU_WINDOW
    assert engine.window_of(engine.EngineSettings(max_num_seqs=32)) == 32


def test_a_cpu_job_sizes_the_engines_kv_cache_from_its_own_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert engine.server_environment(16000, gpus=0)["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert engine.server_environment(None, gpus=0)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine.server_environment(16000, gpus=1)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # the user's own choice stands
    assert engine.server_environment(16000, gpus=0)["VLLM_CPU_KVCACHE_SPACE"] == "3"
    place = engine.deployment_of({}, "logs/caption/d/000000.log", memory_mb=16000)
    assert place.memory_mb == 16000


def test_a_model_that_fits_one_gpu_runs_data_parallel_over_the_jobs_gpus() -> None:
    gib = 1 << 30
    auto = engine.EngineSettings()
    # 16 GB of 8B bf16 weights on 80 GB GPUs: one GPU each, 4 copies.
    assert engine.parallel_sizes(auto, 4, 16 * gib, 80 * gib) == (1, 4)
    # 140 GB of 70B weights: 4 GPUs hold it (2 would not, at 60 % of each), 2 copies on 8.
    assert engine.parallel_sizes(auto, 8, 140 * gib, 80 * gib) == (4, 2)
    assert engine.parallel_sizes(auto, 4, None, 80 * gib) == (4, 1)  # size unknown: all
    assert engine.parallel_sizes(engine.EngineSettings(tensor_parallel_size=2), 8, 1, 1) == (2, 4)
    assert engine.parallel_sizes(auto, 0, 16 * gib, None) == (1, 1)
