"""`onecard` on the command line: the table of subcommands, and nothing else.

Each command lives in its own module with `add_arguments(parser)` and `run(args)`; the modules
import PyTorch only when a command runs, so `onecard --help` answers at once.
"""

from __future__ import annotations

import importlib
import os
import sys

from onecard import __version__
from onecard.args import Parser
from onecard.errors import UsageError, quiet_rank

# name, help, module, its add-arguments function, its run function
COMMANDS = [
    ("train", "train a model (no arguments: a small demo on the embedded corpus)",
     "onecard.pretrain", "add_arguments", "run"),
    ("sft", "fine-tune a base model into a chat model on conversations (no arguments: the newest base run "
     "and the embedded chat set)", "onecard.sft", "add_arguments", "run"),
    ("chat", "talk to a chat model (an onecard SFT run or a nanochat chat checkpoint)", "onecard.chat",
     "add_arguments", "run"),
    ("serve", "serve a model: an OpenAI-compatible API and a web chat page", "onecard.serve", "add_arguments", "run"),
    ("report", "draw a run's loss, throughput, memory, power and energy as PNG files and one HTML page",
     "onecard.report", "add_arguments", "run"),
    ("sample", "continue a prompt with a trained model", "onecard.sample", "add_arguments", "run"),
    ("eval", "measure a model: bits per byte, CORE, chat tasks, harness tasks", "onecard.evaluate", "add_arguments",
     "run"),
    ("tokenizer", "tokenizer tools", "onecard.datasets", "add_tokenizer_arguments", "run_tokenizer"),
    ("data", "download pre-training shards, the eval bundle and chat data", "onecard.datasets",
     "add_data_arguments", "run_data"),
    ("info", "a model's dimensions, parameters and FLOPs", "onecard.planning", "add_info_arguments", "run_info"),
    ("plan", "predict memory, time, energy and cost of training a model on a card",
     "onecard.planning", "add_plan_arguments", "run_plan"),
    ("bench", "measure this machine's card to calibrate the planner", "onecard.bench", "add_arguments", "run"),
    ("export", "write a model in transformers' or nanochat's format", "onecard.export", "add_arguments", "run"),
]


def build_parser() -> Parser:
    parser = Parser(
        prog="onecard",
        description="Train a nanochat-class chat model from scratch on one consumer GPU, and know "
                    "beforehand whether it fits, how long it takes and what it costs.")
    parser.add_argument("--version", action="version", version=f"onecard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, help_text, module_name, add_name, run_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        getattr(module, add_name)(p)
        p.set_defaults(run=getattr(module, run_name), parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args, unknown = build_parser().parse_known_args(argv)  # imports every command module: Ctrl-C can land here
        if unknown:  # said by the command's own parser, so that the error points at its --help
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args.run(args)
    except BrokenPipeError:  # `onecard plan ... | head -1`: the reader left; not the user's input
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe stopped
    except (UsageError, OSError) as error:  # OSError: a file it needs is a directory, unreadable, on a full disk...
        if not quiet_rank():  # under torchrun every rank meets the same bad input: one says it
            print(f"onecard: error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:  # the CPU allocator's out of memory; the card's is the step's own
        if isinstance(error, RuntimeError) and "can't allocate memory" not in str(error):
            raise
        print("onecard: error: out of memory on this machine (RAM): ask for less (a smaller --micro-batch, "
              "--seq-len, model or --size)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not quiet_rank():
            print("\nonecard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
