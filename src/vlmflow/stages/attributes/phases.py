"""The two attribute phases as jobs: every key of a shard answered (or counted as a
failure with its reason), parsed and written; launched over a node's GPUs for a
Meta-format checkpoint (``python -m vlmflow.stages.attributes JOB.json``)."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from vlmflow.core import distributed, engine
from vlmflow.core.attribute_text import (
    clean_vlm_caption,
    merge_phases,
    parse_list,
    phase1_prompt,
    phase2_prompt,
)
from vlmflow.core.io import read_json, read_parquet_rows, stable_seed, write_rows_parquet
from vlmflow.core.progress import (
    ProgressFile,
    fingerprint,
    input_state,
    progress_path,
    run_batches,
    run_stream,
)
from vlmflow.core.prompts import prompt_id
from vlmflow.families import meta_llama
from vlmflow.stages.attributes.generation import (
    Generator,
    make_generator,
    order_by_length,
    special_tokens,
)
from vlmflow.stages.attributes.settings import PHASE1_SCHEMA, PHASE2_SCHEMA, LLMSettings

log = logging.getLogger(__name__)


def _answers(
    keys: list[str],
    prompts: list[str],
    settings: LLMSettings,
    phase: str,
    shard_id: str,
    input_path: str | Path,
    out_parquet: str | Path,
    deployment: engine.Deployment | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{key: {"answer", "failure", "engine"}} for every prompt, resumable (see
    vlmflow.core.progress), and the model's special tokens (for parse_list).

    With a model-parallel Meta checkpoint every rank runs this in step; only rank 0
    writes the progress file.
    """
    recorded = settings.recorded() | {"prompt": settings.prompt}
    progress = ProgressFile(
        progress_path(out_parquet),
        fingerprint(phase, recorded, shard_id, input_state(input_path)),
        read_only=not distributed.rank_from_env().is_main,
    )
    if all(key in progress.done for key in keys):
        markers = special_tokens(settings) if keys else []
        return {key: progress.done[key] for key in keys}, markers
    seed = (settings.seed, phase, shard_id)
    with ExitStack() as stack:
        # Loaded only when there is work left: a finished or empty shard needs no model.
        generator = make_generator(settings, prompts, keys, seed, stack, deployment)
        too_long = _too_long(generator, keys, settings, phase, shard_id)
        fits = [i for i in range(len(keys)) if keys[i] not in too_long]

        def answered(index: int, text: str) -> dict[str, Any]:
            return {"key": keys[index], "answer": text, "failure": None, "engine": generator.engine}

        def failed_row(index: int, error: BaseException) -> dict[str, Any]:
            failure = f"generation_error: {error}"
            return {"key": keys[index], "answer": None, "failure": failure, "engine": None}

        order = order_by_length([generator.lengths[i] for i in fits], fits)
        desc = f"{phase} {shard_id}"
        if generator.stream is not None:
            stream, window = generator.stream, generator.window
            done = run_stream(keys, stream, answered, failed_row, progress, desc, order, window)
        else:
            answer = generator.answer
            assert answer is not None

            def run_batch(indices: list[int]) -> list[dict[str, Any]]:
                texts = answer(indices)
                return [answered(i, text) for i, text in zip(indices, texts, strict=True)]

            done = run_batches(
                keys, settings.batch_size, run_batch, failed_row, progress, seed, desc, order
            )
    return {**done, **too_long}, generator.special_tokens


def _too_long(
    generator: Generator, keys: list[str], settings: LLMSettings, phase: str, shard_id: str
) -> dict[str, dict[str, Any]]:
    """Rows of the prompts that leave no room for the answer; an error when all do."""
    too_long = {
        keys[i]: {"key": keys[i], "answer": None, "failure": "prompt_too_long", "engine": None}
        for i in range(len(keys))
        if generator.too_long(i, settings.max_new_tokens)
    }
    if too_long and len(too_long) == len(keys):
        raise ValueError(
            f"{phase} {shard_id}: every prompt leaves no room for "
            f"attributes.{phase}.max_new_tokens = {settings.max_new_tokens} in a context of "
            f"{generator.context} tokens (attributes.max_seq_len or the model's own); raise "
            "attributes.max_seq_len, or lower max_new_tokens or shorten the template"
        )
    if too_long:
        log.warning(
            "%s %s: %d prompts leave no room for %d new tokens in a context of %d",
            phase,
            shard_id,
            len(too_long),
            settings.max_new_tokens,
            generator.context,
        )
    return too_long


def run_phase1(
    captions_parquet: str | Path,
    out_parquet: str | Path,
    settings: LLMSettings,
    shard_id: str,
    deployment: engine.Deployment | None = None,
) -> dict[str, int]:
    rows = read_parquet_rows(captions_parquet)
    todo = [row for row in rows if row["failure"] is None]
    prompts = [
        phase1_prompt(settings.prompt, row["web_caption"], clean_vlm_caption(row["vlm_caption"]))
        for row in todo
    ]
    answer_of, markers = _answers(
        [row["key"] for row in todo],
        prompts,
        settings,
        "phase1",
        shard_id,
        captions_parquet,
        out_parquet,
        deployment,
    )
    pid = prompt_id(settings.prompt)
    settings_json = _settings_json(settings)
    out: list[dict[str, Any]] = []
    for row in rows:
        if row["failure"] is not None:
            raw: str | None = None
            attributes: list[str] = []
            failure: str | None = "caption_failed"
        elif answer_of[row["key"]]["failure"] is not None:
            raw, attributes, failure = None, [], answer_of[row["key"]]["failure"]
        else:
            raw = answer_of[row["key"]]["answer"]
            parsed = parse_list(raw, settings.stop_words, settings.max_words, markers)
            attributes, failure = parsed.attributes, parsed.failure
        out.append(
            {
                "key": row["key"],
                "web_caption": row["web_caption"],
                "vlm_caption": row["vlm_caption"],
                "raw_answer": raw,
                "attributes": attributes,
                "model": settings.model,
                "engine": answer_of.get(row["key"], {}).get("engine"),
                "prompt_id": pid,
                "settings": settings_json,
                "failure": failure,
            }
        )
    _write_output(out_parquet, out, PHASE1_SCHEMA)
    return _count(out, shard_id, "phase1")


def run_phase2(
    phase1_parquet: str | Path,
    out_parquet: str | Path,
    settings: LLMSettings,
    shard_id: str,
    deployment: engine.Deployment | None = None,
) -> dict[str, int]:
    rows = read_parquet_rows(phase1_parquet)
    todo = [row for row in rows if row["failure"] is None and row["attributes"]]
    prompts = [phase2_prompt(settings.prompt, row["attributes"]) for row in todo]
    answer_of, markers = _answers(
        [row["key"] for row in todo],
        prompts,
        settings,
        "phase2",
        shard_id,
        phase1_parquet,
        out_parquet,
        deployment,
    )
    pid = prompt_id(settings.prompt)
    settings_json = _settings_json(settings)
    out: list[dict[str, Any]] = []
    for row in rows:
        phase1 = list(row["attributes"] or [])
        answer = answer_of.get(row["key"], {})
        raw = answer.get("answer")
        phase2: list[str] = []
        phase2_failure: str | None = None
        failure = row["failure"] if row["failure"] is not None else None
        if failure is None and row["key"] in answer_of:
            # A phase-2 answer that fails or does not parse costs only the new elements:
            # the phase-1 attributes still stand, so the sample is kept and the phase-2
            # failure counted on its own.
            if raw is None:
                phase2_failure = answer.get("failure") or "generation_error"
            else:
                parsed = parse_list(raw, settings.stop_words, settings.max_words, markers)
                phase2, phase2_failure = parsed.attributes, parsed.failure
        merged = merge_phases(phase1, phase2, stable_seed(settings.seed, row["key"]))
        if failure is None and not merged:
            failure = "no_attributes"
        out.append(
            {
                "key": row["key"],
                "raw_answer": raw,
                "phase1_attributes": phase1,
                "phase2_attributes": phase2,
                "attributes": [m.text for m in merged],
                "attribute_sources": [m.source for m in merged],
                "phase2_failure": phase2_failure,
                "model": settings.model,
                "engine": answer.get("engine"),
                "prompt_id": pid,
                "settings": settings_json,
                "failure": failure,
            }
        )
    _write_output(out_parquet, out, PHASE2_SCHEMA)
    counts = _count(out, shard_id, "phase2")
    counts["phase2_failed"] = sum(1 for r in out if r["phase2_failure"] is not None)
    if counts["phase2_failed"]:
        reasons: dict[str, int] = {}
        for r in out:
            if r["phase2_failure"] is not None:
                reason = r["phase2_failure"].split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        log.warning(
            "phase2 shard %s: %d kept samples have phase-1 attributes only: %s",
            shard_id,
            counts["phase2_failed"],
            reasons,
        )
    return counts


def _write_output(out_parquet: str | Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    # Model-parallel ranks all compute the rows; rank 0 writes them.
    if distributed.rank_from_env().is_main:
        write_rows_parquet(out_parquet, rows, schema)
        progress_path(out_parquet).unlink(missing_ok=True)


def _settings_json(settings: LLMSettings) -> str:
    """The settings a row was made with (the prompt is identified by prompt_id)."""
    return json.dumps(settings.recorded(), sort_keys=True)


def _count(rows: list[dict[str, Any]], shard_id: str, phase: str) -> dict[str, int]:
    failed = sum(1 for r in rows if r["failure"] is not None)
    counts = {"in": len(rows), "ok": len(rows) - failed, "failed": failed}
    log.info("%s shard %s: %s", phase, shard_id, counts)
    return counts


@dataclass(frozen=True)
class PhaseJob:
    """One attribute phase on one shard, as a file the launched processes read."""

    phase: str  # "phase1" or "phase2"
    input_path: str
    out_path: str
    settings: LLMSettings
    shard_id: str
    deployment: engine.Deployment | None = None

    def run(self) -> dict[str, int]:
        run_phase = run_phase1 if self.phase == "phase1" else run_phase2
        try:
            return run_phase(
                self.input_path, self.out_path, self.settings, self.shard_id, self.deployment
            )
        finally:
            if meta_llama.is_meta_checkpoint(self.settings.model):
                meta_llama.leave_model_parallel()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "settings": asdict(self.settings)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PhaseJob:
        settings = dict(data["settings"])
        settings["stop_words"] = tuple(settings["stop_words"])
        deployment = data.get("deployment")
        return cls(
            **{
                **data,
                "settings": LLMSettings(**settings),
                "deployment": engine.Deployment(**deployment) if deployment else None,
            }
        )


def launch(job: PhaseJob, launcher: str | None, log_file: IO[str]) -> None:
    """Run ``job`` here, or on one process per shard of a model-parallel Meta checkpoint.

    ``launcher`` is the rule's ``mpi`` resource from the profile (e.g. ``srun``); without
    one, an N-shard checkpoint is started with ``torchrun --standalone
    --nproc-per-node=N`` inside this job.
    """
    model = job.settings.model
    parallel = meta_llama.model_parallel_size(model) if meta_llama.is_meta_checkpoint(model) else 1
    if parallel == 1:
        job.run()
        return
    spec = Path(job.out_path).parent / f".{Path(job.out_path).name}.job.json"
    distributed.launch_module(
        launcher or f"torchrun --standalone --nproc-per-node={parallel}",
        "vlmflow.stages.attributes",
        spec,
        job.to_json(),
        log_file,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of each launched process: ``python -m vlmflow.stages.attributes JOB.json``."""
    args = sys.argv[1:] if argv is None else argv
    distributed.log_as_rank()
    try:
        PhaseJob.from_json(read_json(args[0])).run()
    finally:
        distributed.finish()
