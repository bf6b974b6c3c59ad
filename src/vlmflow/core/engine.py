"""The vLLM backend: vLLM's engine, started inside the job, in its own environment.

vLLM pins its own torch and transformers, so it lives in an environment of its own (a
venv from ``make setup-vllm``, a conda env or a container image). The job runs in the
project's environment and starts ``vlmflow/core/engine_worker.py`` under that environment's
Python (``vllm.command``: a command line, e.g. ``.venv-vllm/bin/python`` or ``apptainer
exec --nv vllm.sif python3``): vLLM's ``LLM`` in a process of its own (one per
data-parallel group of the job's GPUs), fed through pipes. The job keeps a window of
requests in flight, refilled as answers finish; the engine batches whatever it holds
(continuous batching, shared prompt prefixes cached) and stops at the end of the job.

What makes the rows those of the HF backend: prompts go as token ids made by the same
tokenizer and chat template (images through the same chat template in the engine), every
request carries its own seed (from the config's seed, the stage, the shard and the key),
the model's stop ids and single-token sequence biases (generation_config.json) go with
each request, and the answer's token ids are decoded here as the HF path decodes.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import queue
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmflow.core.constrained import ListShape, engine_options, request_fields
from vlmflow.core.engine_process import (
    WORKER,
    Engine,
    EngineError,
    Worker,
    start_worker,
)
from vlmflow.core.errors import ConfigError
from vlmflow.core.models import GenerationSettings, cached_file, split_revision

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
# The Python of the engine's environment, as `make setup-vllm` builds it.
DEFAULT_COMMAND = ".venv-vllm/bin/python"


class RequestError(RuntimeError):
    """One request failed (retried, then counted as a failure of its sample)."""


@dataclass(frozen=True)
class Deployment:
    """Where the engine comes from and where it logs: how a job runs it, not what it
    computes (so not a param; the engine's version is recorded in every row)."""

    command: str = DEFAULT_COMMAND
    log_path: str = "vllm.log"
    # The job's memory (the profile's mem_mb): on a CPU node it sizes the engine's KV
    # cache; None: the job's memory is not known.
    memory_mb: int | None = None


def deployment_of(
    config: dict[str, Any], job_log: str | Path, memory_mb: int | None = None
) -> Deployment:
    """A rule's deployment: the config's ``vllm.command``, the engine's log beside the
    job's (``X.log`` -> ``X.vllm.log``), the job's memory (its ``mem_mb`` resource)."""
    command = config.get("vllm", {}).get("command", DEFAULT_COMMAND)
    log_path = str(Path(job_log).with_suffix(".vllm.log"))
    return Deployment(command=command, log_path=log_path, memory_mb=memory_mb)


# On a CPU, vLLM takes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB) or else reserves a
# share of the whole machine (gpu_memory_utilization of its memory), which a second job on
# the node cannot get. The job gives it this share of its own memory instead.
CPU_KV_CACHE_SHARE = 0.5


def engine_environment(memory_mb: int | None, gpus: int) -> dict[str, str]:
    """The engine's environment: the job's, plus on a CPU a KV cache sized from the job's
    memory (half of it, at least 1 GiB; 1 GiB when the job's memory is not known) and the
    engine core in the engine's own process; what the job's environment sets stands."""
    env = dict(os.environ)
    if gpus == 0:
        gib = max(1, int((memory_mb or 0) * CPU_KV_CACHE_SHARE / 1024))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(gib))
        # A GPU engine schedules in one process while the GPU computes in another; on a
        # CPU both would share the same cores, and the hand-over costs more than it
        # gains (benchmarks/README.md: start-up in half the time, a third more answers/s).
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


@dataclass(frozen=True)
class EngineSettings:
    """How the vLLM engine is started (``caption.engine``, ``attributes.phaseN.engine``)."""

    # None: the fewest of the job's GPUs that hold the model, the others serving more copies
    # of it (data parallel); 1 without a GPU (vlmflow.core.engine.parallel_sizes).
    tensor_parallel_size: int | None = None
    # None: the model's own context.
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    # vLLM's --quantization (e.g. fp8: a 16-bit checkpoint's weights in half the memory,
    # quantized as the engine loads them); None: the checkpoint's own precision.
    quantization: str | None = None
    # Sequences the engine batches at once (vLLM's max_num_seqs; the job keeps QUEUED
    # times as many requests in it, refilled as answers arrive); None: GPU_WINDOW with a
    # GPU, CPU_WINDOW without.
    max_num_seqs: int | None = None
    # How often a request the engine refuses is sent again before it counts as a failed
    # sample.
    retries: int = 2
    startup_timeout_s: float = 1800.0
    # An engine that finishes no request for this long fails the job (EngineError).
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class Sampling:
    """One request's sampling settings."""

    max_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: dict[str, float] = field(default_factory=dict)
    # What constrains the answer (vlmflow.core.constrained.request_fields); empty: nothing.
    constraint: dict[str, Any] = field(default_factory=dict)

    def params(self, seed: int) -> dict[str, Any]:
        """vLLM's SamplingParams fields of one request."""
        fields: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "seed": seed,
            "skip_special_tokens": True,
        }
        if self.do_sample:
            fields |= {"temperature": self.temperature, "top_p": self.top_p}
        else:
            fields |= {"temperature": 0.0}
        if self.stop_token_ids:
            fields["stop_token_ids"] = list(self.stop_token_ids)
        if self.logit_bias:
            fields["logit_bias"] = self.logit_bias
        return fields | self.constraint


def generation_defaults(reference: str) -> tuple[tuple[int, ...], dict[str, float]]:
    """The stop ids and single-token sequence biases of a model's generation_config.json,
    which HF ``generate`` applies by itself and a request has to carry."""
    path = cached_file(reference, "generation_config.json")
    if path is None:
        return (), {}
    config = json.loads(path.read_text(encoding="utf-8"))
    eos = config.get("eos_token_id")
    stops = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    bias: dict[str, float] = {}
    for tokens, value in config.get("sequence_bias") or []:
        if len(tokens) != 1:
            raise EngineError(
                f"{reference}: generation_config.json has a sequence_bias over "
                f"{len(tokens)} tokens; vLLM takes biases of single tokens only"
            )
        bias[str(tokens[0])] = float(value)
    return stops, bias


# The engine's batch without engine.max_num_seqs: vLLM's own default on a GPU; on a CPU,
# what benchmarks/engines.py measured best.
GPU_WINDOW = 256
CPU_WINDOW = 64


def window_of(options: EngineSettings) -> int:
    return options.max_num_seqs or (GPU_WINDOW if visible_gpus() else CPU_WINDOW)


def visible_gpus() -> int:
    """GPUs this job may use (Slurm and CUDA set CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import torch

        return int(torch.cuda.device_count())
    except ImportError:
        return 0


# The share of a GPU's memory the weights may take (the rest: KV cache, activations).
WEIGHTS_SHARE = 0.6


def parallel_sizes(
    options: EngineSettings, gpus: int, weights: int | None, gpu_memory: int | None
) -> tuple[int, int]:
    """(tensor parallel, data parallel) over a job's ``gpus``: ``tensor_parallel_size``
    when the config sets it, else the fewest GPUs (a divisor of ``gpus``) whose memory
    holds the weights (``weights`` bytes in WEIGHTS_SHARE of each GPU's ``gpu_memory``),
    all of them when either size is unknown. The GPUs left over serve more copies of the
    model, each with its share of the requests (vLLM's --data-parallel-size)."""
    if gpus <= 1:
        return options.tensor_parallel_size or 1, 1
    tensor = options.tensor_parallel_size
    if tensor is None:
        tensor = gpus
        if weights is not None and gpu_memory is not None:
            fits = [n for n in range(1, gpus + 1) if gpus % n == 0]
            tensor = next((n for n in fits if weights <= n * gpu_memory * WEIGHTS_SHARE), gpus)
    return tensor, max(1, gpus // tensor)


# Bytes per weight of the quantizations whose size vlmflow knows when it places a model.
BYTES_PER_WEIGHT = {"fp8": 1}


def weight_bytes(model: str) -> int | None:
    """The size of a model's safetensors weights where they are on this machine."""
    index = cached_file(model, "model.safetensors.index.json")
    if index is not None:
        total = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
        return int(total) if total else None
    single = cached_file(model, "model.safetensors")
    return single.stat().st_size if single is not None else None


def gpu_bytes() -> int | None:
    """The memory of this job's first GPU; None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except ImportError:
        pass
    return None


def engine_arguments(
    model: str,
    engine: EngineSettings,
    dtype: str,
    trust_remote_code: bool,
    seed: int,
    gpus: int,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], int]:
    """vLLM's ``LLM`` keyword arguments for one engine of a job with ``gpus`` GPUs, and
    how many engines share the job's GPUs (data parallel; vlmflow.core.engine.parallel_sizes).
    ``extra``: further engine arguments (a model family's, json mode's)."""
    name, revision = split_revision(model)
    weights = weight_bytes(model)
    if weights is not None and engine.quantization in BYTES_PER_WEIGHT:
        weights = weights * BYTES_PER_WEIGHT[engine.quantization] // 2  # of 16-bit weights
    tensor_parallel, data_parallel = parallel_sizes(engine, gpus, weights, gpu_bytes())
    arguments: dict[str, Any] = {
        "model": name,
        "seed": seed,
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "max_num_seqs": window_of(engine),
        "trust_remote_code": trust_remote_code,
    }
    if revision is not None:
        arguments["revision"] = revision
    if engine.quantization is not None:
        arguments["quantization"] = engine.quantization
    if engine.max_model_len is not None:
        arguments["max_model_len"] = engine.max_model_len
    if gpus == 0:
        # vLLM rewinds a seeded request's random generator when a chunked prefill discards
        # its sampled token; CPU generators cannot rewind ("CPU Generator does not use
        # offset"), so on a CPU every prompt is prefilled whole. Eager mode: compiling
        # costs a CPU job more than it saves (benchmarks/README.md).
        arguments |= {"enable_chunked_prefill": False, "enforce_eager": True}
    return arguments | (extra or {}), data_parallel


def device_groups(gpus: int, engines: int) -> list[str | None]:
    """Each engine's CUDA_VISIBLE_DEVICES: the job's visible GPUs in ``engines`` equal
    groups; None (the job's own) for a single engine."""
    if engines <= 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",")] if visible else [str(n) for n in range(gpus)]
    size = len(devices) // engines
    return [",".join(devices[n * size : (n + 1) * size]) for n in range(engines)]


@contextmanager
def running(
    command: str,
    model: str,
    engine: EngineSettings,
    *,
    dtype: str,
    trust_remote_code: bool,
    seed: int,
    log_path: str | Path,
    extra: dict[str, Any] | None = None,
    memory_mb: int | None = None,
) -> Iterator[Engine]:
    """Start the vLLM engine(s) for ``model`` under ``command`` (the engine environment's
    Python) and stop them on exit (each one's whole process group, also when the job is
    stopped by SIGTERM); they load while the job goes on (``Engine``)."""
    gpus = visible_gpus()
    arguments, engines = engine_arguments(
        model, engine, dtype, trust_remote_code, seed, gpus, extra
    )
    args = [*shlex.split(command), str(WORKER), json.dumps(arguments)]
    log_file = Path(log_path)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = engine_environment(memory_mb, gpus)
    log.info(
        "starting %d vLLM engine(s): %s (log: %s; CPU KV cache: %s GiB)",
        engines,
        shlex.join(args),
        log_file,
        env.get("VLLM_CPU_KVCACHE_SPACE", "-"),
    )
    running_engine = Engine(queue.Queue(), log_file, engine.startup_timeout_s)
    with ExitStack() as stack:
        handle = stack.enter_context(open(log_file, "ab"))
        stack.callback(running_engine.stop)
        for devices in device_groups(gpus, engines):
            own = env if devices is None else env | {"CUDA_VISIBLE_DEVICES": devices}
            process = start_worker(args, own, handle, command)
            running_engine.workers.append(Worker(process, running_engine.inbox))
        yield running_engine


# The job keeps this many batches of requests in each engine: when some of its batch
# finish, the engine's scheduler has the next ones waiting (as in LLM.generate's queue)
# instead of running a smaller batch until the job's next requests arrive.
QUEUED = 2


@dataclass(frozen=True)
class Session:
    """A stage's running engine, its engine settings and its requests' sampling."""

    engine: Engine
    options: EngineSettings
    sampling: Sampling

    @property
    def window(self) -> int:
        """Requests in flight: QUEUED times each engine's max_num_seqs."""
        return QUEUED * window_of(self.options) * len(self.engine.workers)


def open_session(
    settings: GenerationSettings,
    deployment: Deployment | None,
    stack: ExitStack,
    shape: ListShape | None = None,
    *,
    extra: dict[str, Any] | None = None,
    stop_ids: Sequence[int] = (),
) -> Session:
    """Start the engine for a stage's ``settings`` on ``stack`` (stopped when it closes;
    it loads while the stage prepares its requests);
    with ``shape``, every answer is constrained to that JSON list (vlmflow.core.constrained).
    ``extra``: further engine arguments; ``stop_ids``: stops besides the model's own."""
    options = EngineSettings(**settings.engine)
    place = deployment or Deployment()
    running_engine = stack.enter_context(
        running(
            place.command,
            settings.model,
            options,
            dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            seed=settings.seed,
            log_path=place.log_path,
            extra=(engine_options() if shape is not None else {}) | (extra or {}),
            memory_mb=place.memory_mb,
        )
    )
    stops, bias = generation_defaults(settings.model)
    stops += tuple(i for i in stop_ids if i not in stops)
    sampling = Sampling(
        settings.max_new_tokens,
        settings.do_sample,
        settings.temperature,
        settings.top_p,
        stops,
        bias,
        request_fields(shape) if shape is not None else {},
    )
    return Session(running_engine, options, sampling)


def in_window(
    session: Session, message_of: Callable[[int], dict[str, Any]], indices: Sequence[int]
) -> Iterator[tuple[int, list[int] | RequestError]]:
    """``(index, answer token ids)`` for every index as its answer arrives, with up to the
    session's window of requests in flight, each finished one replaced by the next at
    once (the engine batches whatever it holds, continuously). A request the engine
    refuses is sent again up to ``engine.retries`` times, then comes back as a
    RequestError (its sample's failure); an EngineError (the engine died) ends the
    stream. Answers to a stream left early are dropped by the next one."""
    queue_of = iter(indices)
    pending: dict[int, int] = {}  # request id -> index
    tries: dict[int, int] = {}
    for index in itertools.islice(queue_of, session.window):
        pending[session.engine.submit(message_of(index))] = index
    while pending:
        ident, answer, _ = session.engine.answer(session.options.request_timeout_s)
        if ident not in pending:
            continue  # a request of a stream left early
        index = pending.pop(ident)
        if isinstance(answer, str) and tries.get(index, 0) < session.options.retries:
            tries[index] = tries.get(index, 0) + 1
            pending[session.engine.submit(message_of(index))] = index
            continue
        following = next(queue_of, None)
        if following is not None:
            pending[session.engine.submit(message_of(following))] = following
        if isinstance(answer, str):
            yield index, RequestError(f"the vLLM engine refused the request: {answer}")
        else:
            yield index, answer


def stream_completions(
    session: Session,
    prompt_of: Callable[[int], list[int]],
    seed_of: Callable[[int], int],
    indices: Sequence[int],
) -> Iterator[tuple[int, list[int] | RequestError]]:
    """The answer token ids of each prompt (token ids), as they arrive (``in_window``)."""

    def message(index: int) -> dict[str, Any]:
        return {
            "prompt": list(prompt_of(index)),
            "sampling": session.sampling.params(seed_of(index)),
        }

    return in_window(session, message, indices)


def stream_chat_with_images(
    session: Session,
    image_of: Callable[[int], tuple[bytes, str]],
    prompt: str,
    seed_of: Callable[[int], int],
    indices: Sequence[int],
) -> Iterator[tuple[int, list[int] | RequestError]]:
    """The answer token ids for each image ((bytes, format)) under one user turn of the
    image then ``prompt``, rendered by the model's chat template in the engine, as they
    arrive (``in_window``)."""

    def message(index: int) -> dict[str, Any]:
        data, image_format = image_of(index)
        url = f"data:image/{image_format};base64,{base64.b64encode(data).decode('ascii')}"
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": prompt},
        ]
        return {
            "messages": [{"role": "user", "content": content}],
            "sampling": session.sampling.params(seed_of(index)),
        }

    return in_window(session, message, indices)


def decoded(
    answers: Iterator[tuple[int, list[int] | RequestError]], tokenizer: Any
) -> Iterator[tuple[int, str | RequestError]]:
    """Each answer's text, decoded as the HF backend decodes (special tokens skipped,
    stripped); a failed request passes as it is."""
    for index, ids in answers:
        if isinstance(ids, RequestError):
            yield index, ids
        else:
            yield index, str(tokenizer.decode(ids, skip_special_tokens=True)).strip()


# A vllm.command that starts vLLM's OpenAI server (what it named before vlmflow ran the
# engine itself): its CLI or its module.
SERVER_COMMAND = re.compile(r"(?:^|\s)(?:-m\s+vllm\b|\S*vllm\s+serve\b)")


def check_command(config: dict[str, Any]) -> None:
    """``vllm.command`` is the engine environment's Python, not a server's command line."""
    command = config.get("vllm", {}).get("command", "")
    if SERVER_COMMAND.search(command):
        raise ConfigError(
            f"config.vllm.command: {command!r} starts a vLLM server; vllm.command is the "
            "Python of the engine's environment, which runs vlmflow's engine script "
            "(e.g. .venv-vllm/bin/python, .vllm-conda/bin/python or apptainer exec --nv "
            "vllm.sif python3)"
        )
