"""Ingest throughput: vlmflow vs img2dataset on the same URL list, served locally.

Generates JPEG and PNG images of mixed sizes, serves them from an HTTP server on
127.0.0.1 with some 404s, slow responses and HTML pages mixed in, and runs both tools on
the same URL list with the same resize settings, passed to both in img2dataset's words
(``--resize-mode``, ``--image-size``, ``--resize-only-if-bigger``; by default the longer
side <= 256, never enlarged), JPEG quality 90, the same number of processes and threads
per process, and the same shard size. vlmflow runs one shard per process as Snakemake
runs one ingest job per shard (``--cores`` processes at once); img2dataset runs with its
multiprocessing distributor. Each runs as its own command, timed from start to exit
(start-up included); the CPU column is the user + system time of it and its children.

img2dataset pins webdataset<0.3 and pandas<3, so it is installed into its own throw-away
venv (``--img2dataset-venv DIR`` reuses one). Prints a table; the last line is
``ratio vlmflow/img2dataset: X.XX``.

    .venv/bin/python benchmarks/ingest.py [--images 2000] [--processes 2] [--threads 16]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import venv
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from vlmflow.stages.ingest import (
    IngestSettings,
    count_rows,
    ingest_source_shard,
    shard_ranges,
    source_from_config,
)

IMG2DATASET = "img2dataset==1.47.0"
SLOW_S = 0.5


# --------------------------------------------------------------------------- data


def make_images(folder: Path, count: int, seed: int) -> list[dict[str, Any]]:
    """Images of mixed sizes and formats, plus the kinds of failures real lists have."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number in range(count):
        draw = rng.random()
        name = f"{number:06d}"
        if draw < 0.03:
            rows.append({"path": f"/missing/{name}.jpg", "kind": "404"})
            continue
        if draw < 0.05:
            rows.append({"path": f"/page/{name}.html", "kind": "html"})
            continue
        width, height = rng.randint(64, 1600), rng.randint(64, 1200)
        # Smooth random content (a small noise image enlarged): realistic file sizes.
        small = Image.frombytes("RGB", (16, 12), rng.randbytes(16 * 12 * 3))
        image = small.resize((width, height), Image.Resampling.BICUBIC)
        fmt = "png" if rng.random() < 0.25 else "jpg"
        path = folder / f"{name}.{fmt}"
        if not path.exists():
            image.save(path, format="PNG" if fmt == "png" else "JPEG", quality=92)
        slow = draw > 0.98
        rows.append({"path": f"/img/{path.name}" + ("?slow=1" if slow else ""), "kind": "ok"})
    return rows


class Handler(BaseHTTPRequestHandler):
    folder: ClassVar[Path]
    protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts
    # Headers and body go out as separate writes; without TCP_NODELAY, Nagle's algorithm
    # and the client's delayed ACK stall every response by up to 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if "slow=1" in query:
            time.sleep(SLOW_S)
        if path.startswith("/img/"):
            file = self.folder / Path(path).name
            body = file.read_bytes()
            kind = "image/png" if file.suffix == ".png" else "image/jpeg"
            self.send("200 OK", body, kind)
        elif path.startswith("/page/"):
            self.send("200 OK", b"<!doctype html><html><body>gone</body></html>", "text/html")
        else:
            self.send("404 Not Found", b"not found", "text/plain")

    def send(self, status: str, body: bytes, kind: str) -> None:
        code, _, _ = status.partition(" ")
        self.send_response(int(code))
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients closing idle keep-alive connections: not worth a traceback


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    Handler.folder = folder
    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- tools


def vlmflow_shard(args: tuple[str, int, int, dict[str, Any], str, str]) -> int:
    url_list, start, end, settings, out, shard = args
    # What the workflow's ingest job runs (workflow/scripts/ingest.py).
    source = source_from_config({"url_list": url_list}, "bench")
    stats = ingest_source_shard(
        source,
        start,
        end,
        IngestSettings(**settings),
        f"{out}/{shard}.tar",
        f"{out}/{shard}.stats.json",
        shard,
    )
    return int(stats["ok"])


def vlmflow_main(
    url_list: str, out: str, settings_json: str, processes: int, shard_size: int
) -> None:
    """What the timed vlmflow process runs: every shard, ``processes`` at a time."""
    settings = json.loads(settings_json)
    jobs = [
        (url_list, start, end, settings, out, f"{number:06d}")
        for number, (start, end) in enumerate(shard_ranges(count_rows(url_list), shard_size))
    ]
    # A fresh process per shard, as Snakemake starts one per ingest job.
    with ProcessPoolExecutor(processes, max_tasks_per_child=1) as pool:
        print(sum(pool.map(vlmflow_shard, jobs)))


def run_vlmflow(url_list: Path, out: Path, args: argparse.Namespace) -> tuple[float, float, int]:
    settings = {
        "resize_mode": args.resize_mode,
        "image_size": args.image_size,
        "resize_only_if_bigger": args.resize_only_if_bigger,
        "jpeg_quality": 90,
        "threads": args.threads,
        "retries": 0,
        "timeout_s": 10.0,
        # The benchmark's server is on loopback, which ingest refuses by default.
        "allowed_networks": ["127.0.0.0/8"],
    }
    out.mkdir(parents=True)
    command = [
        sys.executable,
        __file__,
        "--vlmflow-worker",
        str(url_list),
        str(out),
        json.dumps(settings),
        str(args.processes),
        str(args.shard_size),
    ]
    (seconds, cpu), run = timed(command, dict(os.environ))
    if run.returncode != 0:
        raise SystemExit(f"vlmflow failed:\n{run.stderr[-3000:]}")
    return seconds, cpu, int(run.stdout.split()[-1])


def timed(
    command: list[str], env: dict[str, str]
) -> tuple[tuple[float, float], subprocess.CompletedProcess[str]]:
    """Run a command; its wall-clock seconds and the CPU seconds of it and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return (seconds, cpu), run


def img2dataset_venv(path: Path | None, scratch: Path) -> Path:
    folder = path or scratch / "img2dataset-venv"
    binary = folder / "bin" / "img2dataset"
    if not binary.exists():
        print(f"installing {IMG2DATASET} into {folder} ...", file=sys.stderr)
        venv.create(folder, with_pip=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "--quiet", IMG2DATASET], check=True)
    return binary


def run_img2dataset(
    binary: Path, url_list: Path, out: Path, args: argparse.Namespace
) -> tuple[float, float, int]:
    command = [
        str(binary),
        f"--url_list={url_list}",
        "--input_format=tsv",
        "--url_col=url",
        "--caption_col=caption",
        "--output_format=webdataset",
        f"--output_folder={out}",
        f"--processes_count={args.processes}",
        f"--thread_count={args.threads}",
        f"--number_sample_per_shard={args.shard_size}",
        f"--image_size={args.image_size}",
        f"--resize_mode={args.resize_mode}",
        f"--resize_only_if_bigger={args.resize_only_if_bigger}",
        "--encode_quality=90",
        "--retries=0",
        "--timeout=10",
        "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    (seconds, cpu), run = timed(command, env)
    if run.returncode != 0:
        raise SystemExit(f"img2dataset failed:\n{run.stderr[-3000:]}")
    ok = 0
    for stats_file in glob.glob(str(out / "*_stats.json")):
        with open(stats_file, encoding="utf-8") as handle:
            ok += int(json.load(handle)["successes"])
    return seconds, cpu, ok


# --------------------------------------------------------------------------- main


def main() -> None:
    if sys.argv[1:2] == ["--vlmflow-worker"]:
        url_list, out, settings, processes, shard_size = sys.argv[2:]
        vlmflow_main(url_list, out, settings, int(processes), int(shard_size))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="URLs in the list")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16, help="downloads in flight per process")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--resize-mode",
        default="keep_ratio_largest",
        choices=["keep_ratio", "keep_ratio_largest", "center_crop", "border", "no"],
    )
    parser.add_argument(
        "--resize-only-if-bigger", default=True, action=argparse.BooleanOptionalAction
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img2dataset-venv", type=Path, help="reuse (or create) this venv")
    parser.add_argument("--work", type=Path, help="keep images and outputs here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        binary = img2dataset_venv(args.img2dataset_venv, work)
        rows = make_images(work / "images", args.images, args.seed)
        url_list = work / "urls.tsv"
        kinds = {kind: sum(row["kind"] == kind for row in rows) for kind in ("ok", "404", "html")}
        with serve(work / "images") as base:
            urls = [f"{base}{row['path']}\timage {i}" for i, row in enumerate(rows)]
            lines = ["url\tcaption", *urls]
            url_list.write_text("\n".join(lines) + "\n", encoding="utf-8")
            runs = {}
            stamp = time.strftime("%H%M%S")
            # The images were just written: both runs are served from the page cache.
            runs["img2dataset"] = run_img2dataset(binary, url_list, work / f"i2d-{stamp}", args)
            runs["vlmflow"] = run_vlmflow(url_list, work / f"vlmflow-{stamp}", args)

    print(
        f"\n{args.images} URLs ({kinds['ok']} images, {kinds['404']} 404s, {kinds['html']} HTML"
        f" pages, ~2% slowed by {SLOW_S} s); {args.processes} processes x {args.threads}"
        f" threads, shards of {args.shard_size}, --resize_mode {args.resize_mode}"
        f" --image_size {args.image_size} --resize_only_if_bigger"
        f" {args.resize_only_if_bigger} for both\n"
    )
    print(f"{'tool':<12} {'seconds':>8} {'CPU s':>6} {'ok':>6} {'images/s':>9}")
    for tool, (seconds, cpu, ok) in runs.items():
        print(f"{tool:<12} {seconds:8.1f} {cpu:6.1f} {ok:6d} {ok / seconds:9.1f}")
    (i2d_s, _, i2d_ok), (vf_s, _, vf_ok) = runs["img2dataset"], runs["vlmflow"]
    same = "identical" if i2d_ok == vf_ok else f"DIFFERENT ({vf_ok} vs {i2d_ok})"
    print(f"success counts: {same}")
    print(f"ratio vlmflow/img2dataset: {(vf_ok / vf_s) / (i2d_ok / i2d_s):.2f}")


if __name__ == "__main__":
    main()
