"""The vLLM backend's pieces that need no engine (vlmflow.core.engine): the engine's
arguments, the requests' sampling and window, the model's generation defaults, a dead
engine's reason."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from vlmflow.core import engine, engine_process

PIN = "ab" * 20


def test_the_engine_gets_the_pinned_revision_and_the_engine_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    options = engine.EngineSettings(max_model_len=4096, gpu_memory_utilization=0.8)
    arguments, engines = engine.engine_arguments(
        f"org/model@{PIN}", options, "bfloat16", True, 7, gpus=2, extra={"x": 1}
    )
    assert engines == 1
    assert arguments["model"] == "org/model" and arguments["revision"] == PIN
    assert arguments["tensor_parallel_size"] == 2  # the job's GPUs, the model's size unknown
    assert arguments["max_model_len"] == 4096 and arguments["gpu_memory_utilization"] == 0.8
    assert arguments["seed"] == 7 and arguments["dtype"] == "bfloat16"
    assert arguments["trust_remote_code"] is True and arguments["x"] == 1
    assert "enable_chunked_prefill" not in arguments  # GPUs rewind seeded generators
    assert "enforce_eager" not in arguments
    cpu, _ = engine.engine_arguments("/models/x", engine.EngineSettings(), "auto", False, 0, gpus=0)
    assert "revision" not in cpu and cpu["trust_remote_code"] is False
    assert cpu["tensor_parallel_size"] == 1
    assert cpu["enable_chunked_prefill"] is False and cpu["enforce_eager"] is True


def test_a_missing_engine_python_is_named_with_how_to_build_it(tmp_path: Path) -> None:
    missing = tmp_path / "no env" / "bin" / "python"
    with (
        open(os.devnull, "wb") as sink,
        pytest.raises(engine.EngineError, match=r"not found; build the engine's environment"),
    ):
        engine.start_worker([str(missing), str(engine.WORKER), "{}"], {}, sink, str(missing))
    assert engine.WORKER.name == "engine_worker.py" and engine.WORKER.is_file()


def test_greedy_requests_drop_the_sampling_parameters() -> None:
    sampled = engine.Sampling(16, True, 0.6, 0.7, (1, 2), {"5": 2.5}).params(seed=3)
    assert sampled["temperature"] == 0.6 and sampled["top_p"] == 0.7
    assert sampled["seed"] == 3 and sampled["stop_token_ids"] == [1, 2]
    assert sampled["logit_bias"] == {"5": 2.5} and sampled["max_tokens"] == 16
    greedy = engine.Sampling(16, False, 0.6, 0.7).params(seed=3)
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
    assert engine_process.last_line(log) == "RuntimeError: CPU Generator does not use offset"
    log.write_text(
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "  Value error, max_model_len (999999) is too long\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
    )
    assert engine_process.last_line(log).endswith("Value error, max_model_len (999999) is too long")
    log.write_text("starting\nKilled\n")
    assert engine_process.last_line(log) == "Killed"
    assert engine_process.last_line(tmp_path / "missing.log") == "(no log)"


def test_a_deployment_logs_beside_the_job_and_defaults_to_the_engine_env() -> None:
    place = engine.deployment_of({}, "logs/caption/d/000001.log")
    assert place.command == engine.DEFAULT_COMMAND
    assert place.log_path == "logs/caption/d/000001.vllm.log"
    place = engine.deployment_of({"vllm": {"command": "apptainer exec vllm.sif python3"}}, "x.log")
    assert place.command == "apptainer exec vllm.sif python3"


class FakeEngine:
    """An engine that finishes requests in its own order: the window's other side."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = [object()] * workers
        self.held: dict[int, int] = {}  # request id -> the prompt's first token
        self.sent: list[int] = []
        self.most = 0
        self.ids = itertools.count()

    def submit(self, message: dict[str, Any]) -> int:
        ident = next(self.ids)
        self.held[ident] = message["prompt"][0]
        self.sent.append(message["prompt"][0])
        self.most = max(self.most, len(self.held))
        return ident

    def answer(self, timeout_s: float) -> engine_process.Answer:
        ident = max(self.held, key=lambda i: (self.held[i] % 5, i))  # out of order
        index = self.held.pop(ident)
        return engine_process.Answer(ident, "prompt too long" if index == 7 else [index, index])


def session_on(fake: FakeEngine, retries: int = 2) -> engine.Session:
    options = engine.EngineSettings(max_num_seqs=3, retries=retries)
    return engine.Session(fake, options, engine.Sampling(8, False, 1.0, 1.0))  # type: ignore[arg-type]


def test_a_window_keeps_its_width_in_flight_and_yields_answers_as_they_arrive() -> None:
    fake = FakeEngine()
    answers = engine.stream_completions(session_on(fake), lambda i: [i], lambda i: i, range(40))
    results = dict(answers)
    assert sorted(results) == list(range(40))
    assert isinstance(results.pop(7), engine.RequestError)  # that sample's failure, not the job's
    assert fake.sent.count(7) == 3  # sent again twice (engine.retries) before it counts
    assert all(ids == [i, i] for i, ids in results.items())
    # Always refilled to the window (twice the engine's batch: the next requests wait in
    # the engine), never above it.
    assert fake.most == session_on(fake).window == 2 * 3

    # Leaving early sends nothing more than what was in flight; the next stream drops the
    # answers still owed to the first.
    fake.sent.clear()
    stream = engine.stream_completions(session_on(fake), lambda i: [i], lambda i: i, range(1000))
    next(stream)
    stream.close()
    assert len(fake.sent) == 6 + 1
    later = dict(
        engine.stream_completions(session_on(fake), lambda i: [i], lambda i: i, [100, 101])
    )
    assert later == {100: [100, 100], 101: [101, 101]}


def test_the_window_is_each_engines_max_num_seqs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    arguments, _ = engine.engine_arguments("m", engine.EngineSettings(), "auto", False, 0, 0)
    assert arguments["max_num_seqs"] == engine.CPU_WINDOW
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert engine.window_of(engine.EngineSettings()) == engine.GPU_WINDOW
    assert engine.window_of(engine.EngineSettings(max_num_seqs=32)) == 32
    assert session_on(FakeEngine(workers=4)).window == 4 * 2 * 3  # one window per engine


def test_a_cpu_job_sizes_the_engines_kv_cache_from_its_own_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert engine.engine_environment(16000, gpus=0)["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert engine.engine_environment(None, gpus=0)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine.engine_environment(16000, gpus=1)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # the user's own choice stands
    assert engine.engine_environment(16000, gpus=0)["VLLM_CPU_KVCACHE_SPACE"] == "3"
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


def test_data_parallel_engines_split_the_jobs_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert engine.device_groups(4, 2) == ["4,5", "6,7"]
    assert engine.device_groups(4, 4) == ["4", "5", "6", "7"]
    assert engine.device_groups(4, 1) == [None]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert engine.device_groups(2, 2) == ["0", "1"]
