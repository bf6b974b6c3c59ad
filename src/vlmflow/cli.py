"""The ``vlmflow`` command: ``vlmflow status`` and ``vlmflow miniatures``."""

from __future__ import annotations

import os
import sys

COMMANDS = {
    "status": "where a run stands: shards, samples, stale outputs, failed jobs",
    "miniatures": "tiny stand-ins of a config's hub models, in a hub cache of their own",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        lines = ["usage: vlmflow COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    if args[0] == "miniatures":
        from vlmflow.demo import miniatures

        return miniatures.main(args[1:])
    from vlmflow.reporting import status

    try:
        return status.main(args[1:])
    except BrokenPipeError:
        # The reader went away (`vlmflow status | head`): not an error of ours.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes it at exit
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
