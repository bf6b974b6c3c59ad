"""The vLLM engine of one job, in the engine's own environment: requests in, answers out.

vLLM pins its own torch and transformers, so this file runs under the engine
environment's Python (``vllm.command``), which has no vlmflow: it imports only the
standard library and vLLM. ``vlmflow.core.engine`` starts it as

    <vllm.command> engine_worker.py '<LLM keyword arguments as JSON>'

and talks to it through its standard input and output, one JSON object a line:

- out, once the engine is built: ``{"ready": "<vLLM version>"}``;
- in, a request: ``{"id": N, "prompt": [token ids]}`` or ``{"id": N, "messages": [a chat
  in OpenAI's format]}``, with ``"sampling"``: SamplingParams' fields (``seed``,
  ``max_tokens``, ``temperature``, ``top_p``, ``stop_token_ids``, ``logit_bias``,
  ``structured_outputs``: StructuredOutputsParams' fields...);
- out, as each answer finishes: ``{"id": N, "token_ids": [...], "prompt_tokens": n}``,
  or ``{"id": N, "error": "..."}`` for a request the engine refused;
- the end of the input: the engine finishes what it holds and exits.

Requests join the engine's running batch between its steps as they arrive (vLLM's
continuous batching, as its offline ``LLM.generate`` runs it), with no HTTP server, JSON
API layer or second process per request. Everything else the engine prints goes to
standard error (the job's engine log).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from typing import IO, Any

# A request that ends the input.
CLOSED = None


def read_requests(source: IO[str], inbox: queue.Queue[Any]) -> None:
    """Every request line of ``source`` into ``inbox``, then CLOSED."""
    for line in source:
        if line.strip():
            inbox.put(json.loads(line))
    inbox.put(CLOSED)


def sampling_params(fields: dict[str, Any]) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    fields = dict(fields)
    if "logit_bias" in fields:
        fields["logit_bias"] = {int(k): float(v) for k, v in fields["logit_bias"].items()}
    if "structured_outputs" in fields:
        fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
    return SamplingParams(**fields)


def add(llm: Any, request: dict[str, Any]) -> str:
    """Queue one request in the engine; the request id its outputs carry (``LLM`` numbers
    its requests; the id it returns has vLLM's random suffix: ``7-1a2b3c4d``)."""
    params = sampling_params(request.get("sampling", {}))
    if "messages" in request:
        ids = llm.enqueue_chat([request["messages"]], params, use_tqdm=False)
    else:
        from vllm.inputs import TokensPrompt

        ids = llm.enqueue(TokensPrompt(prompt_token_ids=request["prompt"]), params, use_tqdm=False)
    return str(ids[0]).split("-", 1)[0]


class Answers:
    """The protocol's output: a line per message, flushed at once."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def send(self, message: dict[str, Any]) -> None:
        self.stream.write(json.dumps(message) + "\n")
        self.stream.flush()


def take_requests(
    llm: Any, inbox: queue.Queue[Any], names: dict[str, int], answers: Answers, block: bool
) -> bool:
    """Add the requests waiting in ``inbox`` (waiting for one if ``block``); True once the
    input has ended."""
    while True:
        try:
            request = inbox.get(block=block)
        except queue.Empty:
            return False
        block = False
        if request is CLOSED:
            return True
        try:
            names[add(llm, request)] = request["id"]
        except Exception as error:  # the request's error goes back to it
            answers.send({"id": request["id"], "error": f"{type(error).__name__}: {error}"})


def serve(llm: Any, source: IO[str], answers: Answers) -> None:
    """Run requests from ``source`` until it ends and the engine holds none."""
    inbox: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=read_requests, args=(source, inbox), daemon=True).start()
    engine = llm.llm_engine
    names: dict[str, int] = {}  # engine request id -> the request's id
    closed = False
    while not closed or names:
        if not closed:
            closed = take_requests(llm, inbox, names, answers, block=not names)
        if not names:
            continue
        for output in engine.step():
            if output.finished:
                answers.send(
                    {
                        "id": names.pop(output.request_id),
                        "token_ids": list(output.outputs[0].token_ids),
                        "prompt_tokens": len(output.prompt_token_ids or ()),
                    }
                )


def main() -> None:
    # The protocol keeps the real standard output; whatever else writes there (vLLM's
    # logging, prints) goes to standard error, the engine's log.
    answers = Answers(os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8"))
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import vllm

    llm = vllm.LLM(**json.loads(sys.argv[1]))
    answers.send({"ready": vllm.__version__})
    serve(llm, sys.stdin, answers)


if __name__ == "__main__":
    main()
