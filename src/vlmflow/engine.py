"""The vLLM backend: an OpenAI-compatible vLLM server started inside the job.

vLLM pins its own torch and transformers, so it lives in an environment of its own (a
venv from ``make setup-vllm``, a conda env or a container image). The job runs in the
project's environment, starts the server from ``vllm.command`` (a command line, e.g.
``.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server`` or ``apptainer exec --nv
vllm.sif vllm serve``), waits for it, sends every request of a batch at once (the engine
batches them continuously and caches shared prompt prefixes) and stops it at the end.

What makes the rows those of the HF backend: prompts go as token ids made by the same
tokenizer and chat template (images through the same chat template on the server), every
request carries its own seed (from the config's seed, the stage, the shard and the key),
the model's stop ids and single-token sequence biases (generation_config.json) are sent
with each request, and the answer's token ids are decoded here as the HF path decodes.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import requests

from vlmflow.constrained import ListShape, request_fields, server_args
from vlmflow.models import GenerationSettings, cached_file, split_revision

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKENDS = ("hf", "vllm")
# The engine in the environment `make setup-vllm` builds.
DEFAULT_COMMAND = ".venv-vllm/bin/python -m vllm.entrypoints.openai.api_server"
SERVED_NAME = "model"


class EngineError(Exception):
    """The engine could not start, or died: the job fails with its last log line (not a
    RuntimeError, so no batch retry takes it for a failure of its samples)."""


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
    """A rule's deployment: the config's ``vllm.command``, the server's log beside the
    job's (``X.log`` -> ``X.vllm.log``), the job's memory (its ``mem_mb`` resource)."""
    command = config.get("vllm", {}).get("command", DEFAULT_COMMAND)
    log_path = str(Path(job_log).with_suffix(".vllm.log"))
    return Deployment(command=command, log_path=log_path, memory_mb=memory_mb)


# On a CPU, vLLM takes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB) or else reserves a
# share of the whole machine (gpu_memory_utilization of its memory), which a second job on
# the node cannot get. The job gives it this share of its own memory instead.
CPU_KV_CACHE_SHARE = 0.5


def server_environment(memory_mb: int | None, gpus: int) -> dict[str, str]:
    """The server's environment: the job's, plus on a CPU a KV cache sized from the job's
    memory (half of it, at least 1 GiB; 1 GiB when the job's memory is not known), unless
    the job's environment sets VLLM_CPU_KVCACHE_SPACE itself."""
    env = dict(os.environ)
    if gpus == 0 and "VLLM_CPU_KVCACHE_SPACE" not in env:
        gib = max(1, int((memory_mb or 0) * CPU_KV_CACHE_SHARE / 1024))
        env["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
    return env


@dataclass(frozen=True)
class EngineSettings:
    """How the vLLM server is started (``caption.engine``, ``attributes.phaseN.engine``)."""

    # None: the fewest of the job's GPUs that hold the model, the others serving more copies
    # of it (data parallel); 1 without a GPU (vlmflow.engine.parallel_sizes).
    tensor_parallel_size: int | None = None
    # None: the model's own context.
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    # vLLM's --quantization (e.g. fp8: a 16-bit checkpoint's weights in half the memory,
    # quantized as the server loads them); None: the checkpoint's own precision.
    quantization: str | None = None
    # Requests in flight at once, refilled as answers arrive (vLLM batches them; its
    # --max-num-seqs); None: GPU_WINDOW with a GPU, CPU_WINDOW without.
    max_num_seqs: int | None = None
    # How often a failed request is sent again before it counts as a failed sample.
    retries: int = 2
    startup_timeout_s: float = 1800.0
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
    # What constrains the answer (vlmflow.constrained.request_fields); empty: nothing.
    constraint: dict[str, Any] = field(default_factory=dict)

    def body(self, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": SERVED_NAME,
            "max_tokens": self.max_tokens,
            "seed": seed,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if self.do_sample:
            body |= {"temperature": self.temperature, "top_p": self.top_p}
        else:
            body |= {"temperature": 0.0}
        if self.stop_token_ids:
            body["stop_token_ids"] = list(self.stop_token_ids)
        if self.logit_bias:
            body["logit_bias"] = self.logit_bias
        return body | self.constraint


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


# Requests in flight without engine.max_num_seqs: vLLM's own default on a GPU; on a CPU,
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_command(
    command: str,
    model: str,
    engine: EngineSettings,
    dtype: str,
    trust_remote_code: bool,
    seed: int,
    port: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """The server's command line: ``command`` (split as a shell would, never run by one),
    the model and engine settings and ``extra`` options."""
    name, revision = split_revision(model)
    args = [*shlex.split(command), "--model", name]
    if revision is not None:
        args += ["--revision", revision]
    gpus = visible_gpus()
    weights = weight_bytes(model)
    if weights is not None and engine.quantization in BYTES_PER_WEIGHT:
        weights = weights * BYTES_PER_WEIGHT[engine.quantization] // 2  # of 16-bit weights
    tensor_parallel, data_parallel = parallel_sizes(engine, gpus, weights, gpu_bytes())
    args += [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        SERVED_NAME,
        "--seed",
        str(seed),
        "--dtype",
        dtype,
        "--tensor-parallel-size",
        str(tensor_parallel),
        "--gpu-memory-utilization",
        str(engine.gpu_memory_utilization),
        # No line per request and no periodic stats in the server's log: on a 2-core CPU
        # these cost the engine a fifth of its rate (benchmarks/README.md); the job's log
        # has its own progress, and errors still reach the server's log.
        "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ]
    if engine.quantization is not None:
        args += ["--quantization", engine.quantization]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    if gpus == 0:
        # vLLM rewinds a seeded request's random generator when a chunked prefill discards
        # its sampled token; CPU generators cannot rewind ("CPU Generator does not use
        # offset"), so on a CPU every prompt is prefilled whole. Eager mode: compiling
        # costs a CPU job more than it saves (benchmarks/engines.py: start-up 25 s instead
        # of 41 s, the first 256 answers in 1.1 s instead of 3.7 s).
        args += ["--no-enable-chunked-prefill", "--enforce-eager"]
    args += ["--max-num-seqs", str(window_of(engine))]
    if data_parallel > 1:
        args += ["--data-parallel-size", str(data_parallel)]
    if trust_remote_code:
        args.append("--trust-remote-code")
    return [*args, *extra]


# A Python exception's line ("RuntimeError: ...", "pydantic ... ValidationError: ..."),
# then other error lines ("Value error, ...", "error: ..."; not "value_error" in a URL).
EXCEPTION_LINE = re.compile(r"[A-Za-z](?:Error|Exception): ")
ERROR_LINE = re.compile(r"\b(?:[Ee]rror|[Ee]xception)\b|[a-z](?:Error|Exception)\b")
# Lines that name an error without being one (HTTP access logs, warnings about limits).
NOT_ERRORS = re.compile(r'"(?:GET|POST) /| WARNING ')


def last_line(path: Path) -> str:
    """The error a dead engine's log names: its first exception (the root cause; later
    ones say the engine died of it), with pydantic's detail line; else the last error
    line, else the last line."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    lines = [
        _after_prefix(line.strip())
        for line in lines
        if line.strip() and not NOT_ERRORS.search(line)
    ]
    for number, line in enumerate(lines):
        if EXCEPTION_LINE.search(line):
            detail = lines[number + 1] if number + 1 < len(lines) else ""
            return f"{line} {detail}" if "validation error" in line else line
    errors = [line for line in lines if ERROR_LINE.search(line)]
    return errors[-1] if errors else (lines[-1] if lines else "(empty log)")


def _after_prefix(line: str) -> str:
    """A log line without vLLM's "(Worker pid=N) ERROR date [file:line]" prefix."""
    return re.sub(r"^\(\w+ pid=\d+\)\s+\w+\s+[\d-]+ [\d:]+ \[[^\]]+\]\s*", "", line)


class Server:
    """A running vLLM server (see ``serve``)."""

    def __init__(
        self, process: subprocess.Popen[bytes], url: str, log_path: Path, connections: int = 10
    ) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path
        self.version = ""
        self.http = requests.Session()
        # One kept-alive connection per request in flight.
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=connections)
        self.http.mount("http://", adapter)

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise EngineError(
                f"the vLLM server exited with code {code}: {last_line(self.log_path)} "
                f"(log: {self.log_path})"
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if self.http.get(f"{self.url}/health", timeout=5).status_code == 200:
                    self.version = self.http.get(f"{self.url}/version", timeout=5).json()["version"]
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise EngineError(
            f"the vLLM server did not answer within {timeout_s:.0f} s: "
            f"{last_line(self.log_path)} (log: {self.log_path})"
        )

    def post(self, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """One request; an HTTP error or a dead server raises."""
        try:
            response = self.http.post(f"{self.url}{path}", json=body, timeout=timeout_s)
        except requests.RequestException as error:
            self.check_alive()
            raise RequestError(f"request to the vLLM server failed: {error}") from None
        if response.status_code != 200:
            raise RequestError(f"vLLM answered {response.status_code}: {response.text[:500]}")
        result: dict[str, Any] = response.json()
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.http.close()


@contextmanager
def serve(
    command: str,
    model: str,
    engine: EngineSettings,
    *,
    dtype: str,
    trust_remote_code: bool,
    seed: int,
    log_path: str | Path,
    extra: Sequence[str] = (),
    memory_mb: int | None = None,
) -> Iterator[Server]:
    """Start a vLLM server for ``model``, wait until it answers, stop it on exit (its
    whole process group, also when the job is stopped by SIGTERM)."""
    port = free_port()
    args = server_command(command, model, engine, dtype, trust_remote_code, seed, port, extra)
    log_file = Path(log_path)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = server_environment(memory_mb, visible_gpus())
    log.info(
        "starting the vLLM server: %s (log: %s; CPU KV cache: %s GiB)",
        shlex.join(args),
        log_file,
        env.get("VLLM_CPU_KVCACHE_SPACE", "-"),
    )
    handle: IO[bytes] = open(log_file, "ab")  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(
            args,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except FileNotFoundError:
        handle.close()
        raise EngineError(
            f"vllm.command {command!r}: {args[0]} not found; build the engine's environment "
            "with `make setup-vllm`, or point vllm.command at your vLLM installation"
        ) from None
    server = Server(process, f"http://127.0.0.1:{port}", log_file, window_of(engine))
    try:
        started = time.monotonic()
        server.wait_ready(engine.startup_timeout_s)
        log.info("vLLM %s ready after %.1f s", server.version, time.monotonic() - started)
        yield server
    finally:
        server.stop()
        handle.close()


@dataclass(frozen=True)
class Session:
    """A stage's running server, its engine settings and its requests' sampling."""

    server: Server
    options: EngineSettings
    sampling: Sampling

    @property
    def window(self) -> int:
        return window_of(self.options)

    def request(self, path: str, body: dict[str, Any]) -> list[int]:
        """One request's answer token ids, retried (``with_retries``)."""
        timeout = self.options.request_timeout_s
        return with_retries(
            lambda: _token_ids(self.server.post(path, body, timeout)),
            self.server,
            self.options.retries,
        )


def open_session(
    settings: GenerationSettings,
    deployment: Deployment | None,
    stack: ExitStack,
    shape: ListShape | None = None,
    *,
    extra: Sequence[str] = (),
    stop_ids: Sequence[int] = (),
) -> Session:
    """Start the server for a stage's ``settings`` on ``stack`` (stopped when it closes);
    with ``shape``, every answer is constrained to that JSON list (vlmflow.constrained).
    ``extra``: further server options; ``stop_ids``: stops besides the model's own."""
    options = EngineSettings(**settings.engine)
    place = deployment or Deployment()
    server = stack.enter_context(
        serve(
            place.command,
            settings.model,
            options,
            dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            seed=settings.seed,
            log_path=place.log_path,
            extra=[*(server_args() if shape is not None else ()), *extra],
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
    return Session(server, options, sampling)


def _die_with_parent() -> None:
    """In the server's process: be stopped when the job's process dies, even by SIGKILL
    (Linux; elsewhere the job's own cleanup and Slurm's do it)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def with_retries(call: Callable[[], T], server: Server, retries: int) -> T:
    """``call`` again after a failure (a dead server is never retried)."""
    for attempt in range(retries + 1):
        try:
            return call()
        except RequestError:
            server.check_alive()
            if attempt == retries:
                raise
            time.sleep(min(2.0**attempt, 10.0))
    raise AssertionError("unreachable")


def in_window(
    one: Callable[[int], list[int]], indices: Sequence[int], width: int
) -> Iterator[tuple[int, list[int] | RequestError]]:
    """``(index, one(index))`` for every index as its answer arrives, with up to ``width``
    requests in flight, each finished one replaced by the next at once (the engine
    batches whatever is in flight, continuously). A request that still fails after its
    retries comes back as its RequestError; an EngineError (the server died) ends the
    stream. Leaving the stream early cancels the requests not yet sent."""
    queue = iter(indices)
    pending: dict[Future[list[int]], int] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, width))
    try:
        for index in itertools.islice(queue, width):
            pending[pool.submit(one, index)] = index
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                following = next(queue, None)
                if following is not None:
                    pending[pool.submit(one, following)] = following
                try:
                    yield index, future.result()
                except RequestError as error:
                    yield index, error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def stream_completions(
    session: Session,
    prompt_of: Callable[[int], list[int]],
    seed_of: Callable[[int], int],
    indices: Sequence[int],
) -> Iterator[tuple[int, list[int] | RequestError]]:
    """The answer token ids of each prompt (token ids), as they arrive (``in_window``)."""

    def one(index: int) -> list[int]:
        body = session.sampling.body(seed_of(index)) | {"prompt": list(prompt_of(index))}
        return session.request("/v1/completions", body)

    return in_window(one, indices, session.window)


def stream_chat_with_images(
    session: Session,
    image_of: Callable[[int], tuple[bytes, str]],
    prompt: str,
    seed_of: Callable[[int], int],
    indices: Sequence[int],
) -> Iterator[tuple[int, list[int] | RequestError]]:
    """The answer token ids for each image ((bytes, format)) under one user turn of the
    image then ``prompt``, rendered by the model's chat template on the server, as they
    arrive (``in_window``)."""

    def one(index: int) -> list[int]:
        data, image_format = image_of(index)
        url = f"data:image/{image_format};base64,{base64.b64encode(data).decode('ascii')}"
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": prompt},
        ]
        body = session.sampling.body(seed_of(index)) | {
            "messages": [{"role": "user", "content": content}]
        }
        return session.request("/v1/chat/completions", body)

    return in_window(one, indices, session.window)


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


def _token_ids(answer: dict[str, Any]) -> list[int]:
    choice = answer["choices"][0]
    ids = choice.get("token_ids")
    if ids is None:
        raise RequestError("the vLLM server returned no token_ids (vLLM >= 0.10 is needed)")
    return [int(i) for i in ids]
