"""`gptq-fsdp` command line: `quantize` a model folder into a compressed-tensors checkpoint, `plan`
a sharded run, measure `perplexity`."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

import torch

from gptq_fsdp.cli import quantize, report
from gptq_fsdp.cli.common import say


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptq-fsdp", description="GPTQ quantization into compressed-tensors.")
    # The deepspeed launcher inserts --local_rank=N before the subcommand.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    quantize.add_parser(commands)
    report.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # a preempting scheduler's SIGTERM acts as Ctrl-C
        previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        commands = {
            "quantize": quantize.quantize_command,
            "perplexity": report.perplexity_command,
            "plan": report.plan_command,
        }
        commands[args.command](args)
    except KeyboardInterrupt:  # outside the quantize loop (which says where its state is)
        say("interrupted")
        raise SystemExit(130) from None
    finally:
        while quantize.held_locks:
            quantize.held_locks.pop().release()
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
