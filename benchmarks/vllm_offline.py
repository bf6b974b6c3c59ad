"""vLLM's offline floor: the same prompts through ``vllm.LLM.generate`` in one process.

Runs in the engine's own environment (`.venv-vllm/bin/python`, which has no vlmflow);
benchmarks/engines.py writes the spec, starts this script and compares. Reads a JSON spec
(model, dtype, max_model_len, max_num_seqs, seed, prompts as token ids, max_tokens, stop
ids, logit bias, chunked prefill) and writes JSON: the engine's start-up seconds, the
seconds of the one ``generate`` call, and every answer's token ids in prompt order.

    .venv-vllm/bin/python benchmarks/vllm_offline.py SPEC.json OUT.json
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    started = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        seed=spec["seed"],
        enable_chunked_prefill=spec["chunked_prefill"],
        enforce_eager=spec["enforce_eager"],
    )
    startup = time.perf_counter() - started
    sampling = SamplingParams(
        max_tokens=spec["max_tokens"],
        temperature=0.0,
        stop_token_ids=spec["stop_token_ids"] or None,
        logit_bias={int(k): v for k, v in spec["logit_bias"].items()} or None,
        skip_special_tokens=True,
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    started = time.perf_counter()
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    seconds = time.perf_counter() - started
    answers = [list(output.outputs[0].token_ids) for output in outputs]
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump({"startup_s": startup, "seconds": seconds, "answers": answers}, handle)


if __name__ == "__main__":
    main()
