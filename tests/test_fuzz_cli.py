"""Fuzzing the command line: malformed (and some valid) invocations of every subcommand.

Each case runs `onecard.cli.main(argv)` in-process (much faster than a subprocess) under a time
limit, and must:
  * exit 0 or 2 (what the case expects; 1 only where a case says so),
  * never let an exception other than SystemExit escape `main`, and print no "Traceback",
  * on an error (exit 2), write exactly ONE non-empty line to stderr. Our argparse subclass
    (onecard.args.Parser) prints no usage line, so argparse errors are held to the same rule:
    "onecard <command>: error: <what> (see onecard <command> --help)",
  * name in its error only flags that the command it ran really has,
  * not hang: a case that runs past its limit fails (and a hang inside C code, which the alarm
    cannot interrupt, is ended by faulthandler so that the test run itself never hangs).
Valid train cases use --dry-run: nothing here trains for real.

The named cases at the top are the defects a fault soak found; the rest widen the net. Last come a
subprocess check that `onecard --help` is quick and imports no PyTorch, and hypothesis properties
of the number grammar (onecard/units.py) and the argparse types (onecard/args.py).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import re
import signal
import subprocess
import sys
import time
import traceback

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onecard import args as argtypes
from onecard.cli import build_parser, main
from onecard.units import LARGEST, NumberError, parse_gib, parse_number, quantity

LIMIT_S = 5.0  # per case; the slowest valid ones (a report, a dry run) take about a second
OK, ERR, EITHER = {0}, {2}, {0, 2}


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in onecard swallows it."""


def case(name: str, *argv: str, code: set[int] = ERR, has: str | None = None, limit: float = LIMIT_S):
    return pytest.param(list(argv), code, has, limit, id=name)


T = "{tmp}"  # replaced by the test's tmp_path
HUGE_INT = "99999999999999999999999"

CASES = [
    # ---- the fault soak's defects, by name
    case("soak-train-steps-inf", "train", "--steps", "inf", has="--steps"),
    case("soak-train-steps-1e309", "train", "--steps", "1e309", has="--steps"),
    case("soak-train-tokens-inf", "train", "--tokens", "inf", has="--tokens"),
    case("soak-train-micro-batch-inf", "train", "--micro-batch", "inf", has="--micro-batch"),
    case("soak-train-ratio-inf", "train", "--ratio", "inf", has="--ratio"),
    case("soak-train-ratio-nan", "train", "--ratio", "nan", has="--ratio"),
    case("soak-train-seed-huge", "train", "--seed", HUGE_INT, has="--seed"),
    case("soak-sample-seed-huge", "sample", "--run-dir", T, "--seed", HUGE_INT, has="--seed"),
    case("soak-plan-tokens-1e300", "plan", "--model", "d12", "--gpu", "rtx4070", "--tokens", "1e300",
         has="--tokens"),
    case("soak-plan-assume-nan", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "fragmentation=nan",
         has="fragmentation"),
    case("soak-plan-assume-inf", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "fragmentation=inf",
         has="fragmentation"),
    case("soak-plan-assume-1e30", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "fragmentation=1e30",
         has="fragmentation"),
    case("soak-tokenizer-vocab-1e30", "tokenizer", "train", "--vocab-size", "1e30", "--out", T + "/tok",
         has="--vocab-size"),
    case("soak-train-data-fake-parquet", "train", "--data", T + "/fake.parquet", "--run-dir", T + "/run",
         has="fake.parquet"),
    case("soak-train-run-dir-file", "train", "--run-dir", T + "/afile", "--dry-run", has="afile"),
    case("soak-train-run-dir-proc", "train", "--run-dir", "/proc/x", "--steps", "1"),
    case("soak-report-out-file", "report", T + "/goodlog", "--out", T + "/afile", has="afile"),
    case("soak-tokenizer-out-file", "tokenizer", "train", "--out", T + "/afile", has="afile", limit=2),
    case("soak-plan-plot-under-file", "plan", "--model", "d12", "--gpu", "rtx4070", "--plot", T + "/afile/p.png",
         has="--plot"),
    case("soak-sample-temperature-nan", "sample", "--run-dir", T, "--temperature", "nan", has="--temperature"),
    case("soak-sample-temperature-neg", "sample", "--run-dir", T, "--temperature", "-1", has="--temperature"),
    case("soak-sample-empty-config", "sample", "--run-dir", T + "/emptycfg", "--device", "cpu"),
    case("soak-report-log-list", "report", T + "/badlog", code=EITHER, limit=15),
    case("soak-train-model-empty", "train", "--model", "", has="--model"),
    case("soak-sample-tokenizer-missing", "sample", "--run-dir", T + "/emptycfg", "--tokenizer", "/nonexistent",
         has="/nonexistent"),
    case("soak-train-eval-every-neg", "train", "--eval-every", "-1", has="--eval-every"),
    case("soak-train-save-every-min-nan", "train", "--save-every-min", "nan", has="--save-every-min"),
    # refused at once (a few ms), not planned; 2 s leaves room for a garbage-collection pause late in the suite
    case("soak-plan-d1000", "plan", "--model", "d1000", "--gpu", "rtx4070", has="d1000", limit=2),
    case("soak-plan-d5", "plan", "--model", "d5", "--gpu", "rtx4070", has="d5"),
    case("soak-info-dd", "info", "--model", "dd", has="dd"),
    case("soak-unknown-subcommand", "frobnicate", has="frobnicate"),
    case("soak-train-vram-0", "train", "--vram", "0", "--dry-run", has="--vram"),
    case("soak-train-vram-neg", "train", "--vram", "-12GB", "--dry-run", has="--vram"),
    case("soak-train-vram-1e30", "train", "--vram", "1e30", "--dry-run", has="--vram"),
    case("soak-train-gpu-nosuchcard", "train", "--gpu", "nosuchcard", "--dry-run", has="nosuchcard"),
    case("soak-train-recipe-nosuch", "train", "--recipe", "nosuch", "--dry-run", has="nosuch"),
    case("soak-plan-recipe-nosuch", "plan", "--model", "d12", "--gpu", "rtx4070", "--recipe", "nosuch",
         has="nosuch"),
    case("soak-plan-gpus-0", "plan", "--model", "d12", "--gpu", "rtx4070", "--gpus", "0", has="--gpus"),
    case("soak-train-total-batch-7-dry-run", "train", "--total-batch", "7", "--dry-run", has="--total-batch"),
    case("soak-bench-steps-0", "bench", "--steps", "0", has="--steps"),

    # ---- top level and --help of every subcommand
    case("no-arguments"),
    case("empty-subcommand", ""),
    case("unicode-subcommand", "trän"),
    case("top-unknown-flag", "--frob"),
    case("top-help", "--help", code=OK),
    case("train-help", "train", "--help", code=OK),
    case("report-help", "report", "--help", code=OK),
    case("sample-help", "sample", "--help", code=OK),
    case("tokenizer-help", "tokenizer", "--help", code=OK),
    case("tokenizer-train-help", "tokenizer", "train", "--help", code=OK),
    case("info-help", "info", "--help", code=OK),
    case("plan-help", "plan", "--help", code=OK),
    case("bench-help", "bench", "--help", code=OK),

    # ---- train: numbers
    case("train-steps-nan", "train", "--steps", "nan"),
    case("train-steps-neg", "train", "--steps", "-1"),
    case("train-steps-0", "train", "--steps", "0"),
    case("train-steps-fraction", "train", "--steps", "1.5"),
    case("train-steps-empty", "train", "--steps", ""),
    case("train-steps-word", "train", "--steps", "many"),
    case("train-steps-1e-300", "train", "--steps", "1e-300"),
    case("train-steps-huge", "train", "--steps", HUGE_INT),
    case("train-steps-1e18", "train", "--steps", "1e18"),
    case("train-steps-unicode", "train", "--steps", "五"),
    case("train-steps-missing-value", "train", "--steps"),
    case("train-steps-and-tokens", "train", "--steps", "5", "--tokens", "5"),
    case("train-tokens-0", "train", "--tokens", "0"),
    case("train-tokens-neg", "train", "--tokens", "-5B"),
    case("train-tokens-1e300", "train", "--tokens", "1e300"),
    case("train-micro-batch-0", "train", "--micro-batch", "0"),
    case("train-micro-batch-1e30", "train", "--micro-batch", "1e30"),
    case("train-ratio-0", "train", "--ratio", "0"),
    case("train-ratio-neg", "train", "--ratio", "-20"),
    case("train-ratio-1e-300-dry-run", "train", "--ratio", "1e-300", "--dry-run", code=OK),
    case("train-seed-neg", "train", "--seed", "-1"),
    case("train-seed-fraction", "train", "--seed", "1.5"),
    case("train-seed-empty", "train", "--seed", ""),
    case("train-seed-2-63", "train", "--seed", str(2**63)),
    case("train-seed-max-dry-run", "train", "--seed", str(2**63 - 1), "--dry-run", code=OK),
    case("train-seq-len-0", "train", "--seq-len", "0"),
    case("train-seq-len-inf", "train", "--seq-len", "inf"),
    case("train-vocab-size-1e30", "train", "--vocab-size", "1e30"),
    case("train-vocab-size-0", "train", "--vocab-size", "0"),
    case("train-tokenizer-chars-0", "train", "--tokenizer-chars", "0"),
    case("train-tokenizer-missing", "train", "--tokenizer", T + "/nowhere", "--dry-run", has="no tokenizer in"),
    case("train-tokenizer-not-one", "train", "--tokenizer", T + "/hfgarbage", "--dry-run", has="tokenizer.json"),
    case("train-eval-batches-0", "train", "--eval-batches", "0"),
    case("train-save-every-min-inf", "train", "--save-every-min", "inf"),
    case("train-save-every-min-neg", "train", "--save-every-min", "-1"),
    case("train-save-every-steps-neg", "train", "--save-every-steps", "-1"),
    case("train-keep-0", "train", "--keep", "0"),
    case("train-price-neg", "train", "--price", "-1"),
    case("train-price-nan", "train", "--price", "nan"),
    case("train-power-0", "train", "--power", "0"),
    case("train-power-inf", "train", "--power", "inf"),
    case("train-vram-nan", "train", "--vram", "nan", "--dry-run"),
    case("train-vram-neg-attached", "train", "--vram=-12GB", "--dry-run", has="--vram"),
    case("train-tokens-neg-attached", "train", "--tokens=-5B", has="--tokens"),
    case("train-vram-12TB", "train", "--vram", "12TB", "--dry-run"),
    case("train-vram-GB-only", "train", "--vram", "GB", "--dry-run"),
    case("train-vram-1e-300", "train", "--vram", "1e-300", "--gpu", "rtx4070", "--dry-run"),
    case("train-vram-tiny", "train", "--vram", "0.5", "--gpu", "rtx4070", "--dry-run", has="--vram"),
    # ---- train: names and paths
    case("train-model-dd", "train", "--model", "dd"),
    case("train-model-d0", "train", "--model", "d0"),
    case("train-model-d101", "train", "--model", "d101"),
    case("train-model-d1000", "train", "--model", "d1000", limit=1),
    case("train-model-d5", "train", "--model", "d5", "--dry-run"),
    case("train-model-spaces", "train", "--model", "   "),
    case("train-model-fullwidth", "train", "--model", "ｄ１２"),
    case("train-model-emoji", "train", "--model", "d🔥"),
    case("train-model-option-like", "train", "--model", "-d12"),
    case("train-model-and-depth", "train", "--model", "d4", "--depth", "4", "--dry-run"),
    case("train-depth-0", "train", "--depth", "0"),
    case("train-depth-1000", "train", "--depth", "1000", limit=1),
    case("train-depth-inf", "train", "--depth", "inf"),
    case("train-device-gpu", "train", "--device", "gpu"),
    case("train-activations-bogus", "train", "--activations", "bogus"),
    case("train-gpu-empty", "train", "--gpu", ""),
    case("train-gpus-flag", "train", "--gpus", "0"),
    case("train-recipe-empty", "train", "--recipe", ""),
    case("train-currency-empty", "train", "--currency", ""),
    case("train-data-missing", "train", "--data", "/nonexistent/corpus", "--dry-run"),
    case("train-data-empty-string", "train", "--data", ""),
    case("train-data-empty-dir", "train", "--data", T + "/empty", "--dry-run"),
    case("train-data-wrong-suffix", "train", "--data", T + "/data.bin", "--dry-run"),
    case("train-data-unicode-missing", "train", "--data", T + "/корпус-語料.txt", "--dry-run"),
    case("train-run-dir-empty", "train", "--run-dir", ""),
    case("train-run-dir-under-file", "train", "--run-dir", T + "/afile/run", "--steps", "1"),
    case("train-init-from-missing", "train", "--init-from", "/nonexistent/run", "--dry-run"),
    case("train-init-from-file", "train", "--init-from", T + "/afile", "--dry-run"),
    case("train-init-from-empty-config", "train", "--init-from", T + "/emptycfg", "--dry-run"),
    case("train-unknown-flag", "train", "--frobnicate"),
    case("train-positional", "train", "d12"),
    # ---- train: valid dry runs (nothing is trained)
    case("train-dry-run", "train", "--dry-run", code=OK),
    case("train-dry-run-d4-vram", "train", "--model", "d4", "--gpu", "rtx4070", "--vram", "12GB", "--dry-run",
         code=OK),
    case("train-dry-run-model-upper", "train", "--model", " D4 ", "--dry-run", code=OK),
    case("train-dry-run-tokens-1e18", "train", "--tokens", "1e15", "--dry-run", code=OK),
    case("train-dry-run-recipe-upper", "train", "--recipe", "LEAN", "--dry-run", code=OK),

    # ---- sample
    case("sample-no-run-dir", "sample"),
    case("sample-run-dir-missing", "sample", "--run-dir", "/nonexistent/run"),
    case("sample-run-dir-empty-string", "sample", "--run-dir", ""),
    case("sample-run-dir-file", "sample", "--run-dir", T + "/afile"),
    case("sample-run-dir-empty-dir", "sample", "--run-dir", T + "/empty", "--device", "cpu"),
    case("sample-bad-json-config", "sample", "--run-dir", T + "/badjson", "--device", "cpu"),
    case("sample-list-config", "sample", "--run-dir", T + "/listcfg", "--device", "cpu"),
    case("sample-fake-nanochat", "sample", "--run-dir", T + "/fakenano", "--device", "cpu"),
    case("sample-temperature-inf", "sample", "--run-dir", T, "--temperature", "inf"),
    case("sample-temperature-3", "sample", "--run-dir", T, "--temperature", "3"),
    case("sample-temperature-empty", "sample", "--run-dir", T, "--temperature", ""),
    case("sample-seed-neg", "sample", "--run-dir", T, "--seed", "-1"),
    case("sample-max-tokens-0", "sample", "--run-dir", T, "--max-tokens", "0"),
    case("sample-max-tokens-inf", "sample", "--run-dir", T, "--max-tokens", "inf"),
    case("sample-max-tokens-huge", "sample", "--run-dir", T, "--max-tokens", HUGE_INT),
    case("sample-top-k-0", "sample", "--run-dir", T, "--top-k", "0"),
    case("sample-top-k-1e-300", "sample", "--run-dir", T, "--top-k", "1e-300"),
    case("sample-tokenizer-empty", "sample", "--run-dir", T, "--tokenizer", ""),
    case("sample-device-tpu", "sample", "--run-dir", T, "--device", "tpu"),

    # ---- report
    case("report-no-run-dir", "report"),
    case("report-missing", "report", "/nonexistent/run"),
    case("report-file", "report", T + "/afile"),
    case("report-empty-dir", "report", T + "/empty"),
    case("report-empty-string", "report", ""),
    case("report-log-is-dir", "report", T + "/logdir", has="is not a file"),
    case("report-out-under-file", "report", T + "/goodlog", "--out", T + "/afile/report"),
    case("report-out-empty", "report", T + "/goodlog", "--out", ""),
    case("report-unknown-flag", "report", T + "/goodlog", "--frob"),
    case("report-garbage-log", "report", T + "/garbage", code=EITHER, limit=15),
    case("report-huge-numbers", "report", T + "/hugelog", code=EITHER, limit=15),
    case("report-largest-numbers", "report", T + "/largelog", code=OK, limit=15),
    case("report-valid", "report", T + "/goodlog", "--out", T + "/out", code=OK, limit=15),

    # ---- tokenizer
    case("tokenizer-no-command", "tokenizer"),
    case("tokenizer-unknown-command", "tokenizer", "frob"),
    case("tokenizer-vocab-0", "tokenizer", "train", "--vocab-size", "0"),
    case("tokenizer-vocab-inf", "tokenizer", "train", "--vocab-size", "inf"),
    case("tokenizer-vocab-too-small", "tokenizer", "train", "--data", T + "/tiny.txt", "--vocab-size", "100",
         "--out", T + "/tok", has="vocab"),
    case("tokenizer-vocab-2-31", "tokenizer", "train", "--data", T + "/tiny.txt", "--vocab-size", str(2**31),
         "--out", T + "/tok", has="vocab"),
    case("tokenizer-out-under-file", "tokenizer", "train", "--out", T + "/afile/tok", limit=2),
    case("tokenizer-out-empty", "tokenizer", "train", "--out", ""),
    case("tokenizer-data-missing", "tokenizer", "train", "--data", "/nonexistent", "--out", T + "/tok"),
    case("tokenizer-data-empty", "tokenizer", "train", "--data", ""),
    case("tokenizer-data-fake-parquet", "tokenizer", "train", "--data", T + "/fake.parquet", "--out", T + "/tok"),
    case("tokenizer-data-empty-dir", "tokenizer", "train", "--data", T + "/empty", "--out", T + "/tok"),
    case("tokenizer-max-chars-0", "tokenizer", "train", "--max-chars", "0"),
    case("tokenizer-max-chars-inf", "tokenizer", "train", "--max-chars", "inf"),
    case("tokenizer-vocab-beyond-corpus", "tokenizer", "train", "--data", T + "/tiny.txt", "--vocab-size", "400",
         "--out", T + "/tok", has="--vocab-size"),
    case("tokenizer-train-valid", "tokenizer", "train", "--data", T + "/tiny.txt", "--vocab-size", "280",
         "--out", T + "/tok", code=OK),

    # ---- data download (nothing here reaches the network: every case fails first or is a dry run)
    case("data-help", "data", "--help", code=OK),
    case("data-download-help", "data", "download", "--help", code=OK),
    case("data-no-command", "data"),
    case("data-unknown-command", "data", "frob"),
    case("data-download-no-dataset", "data", "download"),
    case("data-download-unknown-dataset", "data", "download", "imagenet", "--shards", "1", has="imagenet"),
    case("data-download-empty-dataset", "data", "download", ""),
    case("data-download-no-amount", "data", "download", "fineweb-edu", "--dir", T + "/d", has="--shards"),
    case("data-download-shards-0", "data", "download", "fineweb-edu", "--shards", "0", has="--shards"),
    case("data-download-shards-inf", "data", "download", "fineweb-edu", "--shards", "inf", has="--shards"),
    case("data-download-shards-huge", "data", "download", "fineweb-edu", "--shards", HUGE_INT, has="--shards"),
    case("data-download-shards-beyond-set", "data", "download", "fineweb-edu", "--shards", "1823", "--dir",
         T + "/d", "--dry-run", has="1,822"),
    case("data-download-shards-and-tokens", "data", "download", "fineweb-edu", "--shards", "2", "--tokens", "1B"),
    case("data-download-tokens-0", "data", "download", "fineweb-edu", "--tokens", "0", has="--tokens"),
    case("data-download-tokens-nan", "data", "download", "fineweb-edu", "--tokens", "nan", has="--tokens"),
    case("data-download-for-model-bad", "data", "download", "fineweb-edu", "--for-model", "x20"),
    case("data-download-for-model-d0", "data", "download", "fineweb-edu", "--for-model", "d0"),
    case("data-download-ratio-alone", "data", "download", "fineweb-edu", "--shards", "2", "--ratio", "20",
         has="--ratio"),
    case("data-download-ratio-0", "data", "download", "fineweb-edu", "--for-model", "d12", "--ratio", "0",
         has="--ratio"),
    case("data-download-chars-per-token-0", "data", "download", "fineweb-edu", "--tokens", "1B",
         "--chars-per-token", "0", has="--chars-per-token"),
    case("data-download-chars-per-token-1000", "data", "download", "fineweb-edu", "--tokens", "1B",
         "--chars-per-token", "1000", "--dir", T + "/d", "--dry-run", has="characters per token"),
    case("data-download-base-url-ftp", "data", "download", "fineweb-edu", "--shards", "1", "--base-url",
         "ftp://mirror/x", has="--base-url"),
    case("data-download-base-url-bad-pattern", "data", "download", "fineweb-edu", "--shards", "1", "--base-url",
         "http://127.0.0.1:9/{foo}", has="--base-url"),
    case("data-download-base-url-empty", "data", "download", "fineweb-edu", "--shards", "1", "--base-url", ""),
    case("data-download-base-url-ipv6-open", "data", "download", "fineweb-edu", "--shards", "1", "--base-url",
         "http://[::1", has="--base-url"),
    case("data-eval-bundle-base-url-ipv6-open", "data", "download", "eval-bundle", "--base-url", "http://[::1",
         has="--base-url"),
    case("plan-plot-text-file", "plan", "--model", "d12", "--gpu", "rtx4070", "--plot", T + "/p.txt", has="--plot"),
    case("data-download-dir-file", "data", "download", "fineweb-edu", "--shards", "1", "--dir", T + "/afile",
         has="afile"),
    case("data-download-dir-under-file", "data", "download", "fineweb-edu", "--shards", "1", "--dir",
         T + "/afile/sub", has="afile"),
    case("data-download-dir-empty", "data", "download", "fineweb-edu", "--shards", "1", "--dir", ""),
    case("data-download-dir-proc", "data", "download", "fineweb-edu", "--shards", "1", "--dir", "/proc/x/y",
         "--base-url", "http://127.0.0.1:9"),
    case("data-download-workers-0", "data", "download", "fineweb-edu", "--shards", "1", "--workers", "0",
         has="--workers"),
    case("data-download-retries-inf", "data", "download", "fineweb-edu", "--shards", "1", "--retries", "inf",
         has="--retries"),
    case("data-download-timeout-0", "data", "download", "fineweb-edu", "--shards", "1", "--timeout", "0",
         has="--timeout"),
    case("data-download-timeout-nan", "data", "download", "fineweb-edu", "--shards", "1", "--timeout", "nan",
         has="--timeout"),
    case("data-download-eval-bundle-shards", "data", "download", "eval-bundle", "--shards", "3", has="--shards"),
    case("data-download-eval-bundle-dir-file", "data", "download", "eval-bundle", "--dir", T + "/afile",
         "--dry-run", has="afile"),
    case("data-download-eval-bundle-dir-full", "data", "download", "eval-bundle", "--dir", T + "/goodlog",
         "--dry-run", has="goodlog"),
    case("data-download-manifest-garbage", "data", "download", "fineweb-edu", "--shards", "1", "--dir",
         T + "/badmanifest", "--dry-run", has="onecard-dataset.json"),
    case("data-download-dry-run-valid", "data", "download", "fineweb-edu", "--shards", "2", "--dir", T + "/d",
         "--dry-run", code=OK),
    case("data-download-for-model-dry-run-valid", "data", "download", "climbmix", "--for-model", "d20",
         "--ratio", "8", "--dir", T + "/d", "--dry-run", code=OK),
    case("data-download-eval-bundle-dry-run-valid", "data", "download", "eval-bundle", "--dir", T + "/eb",
         "--dry-run", code=OK),

    # ---- info
    case("info-no-model", "info"),
    case("info-model-empty", "info", "--model", ""),
    case("info-model-d0", "info", "--model", "d0"),
    case("info-model-d1000", "info", "--model", "d1000", limit=1),
    case("info-model-neg", "info", "--model", "d-1"),
    case("info-model-unicode", "info", "--model", "д12"),
    case("info-depth-0", "info", "--depth", "0"),
    case("info-depth-neg", "info", "--depth", "-3"),
    case("info-depth-1e30", "info", "--depth", "1e30"),
    case("info-depth-5", "info", "--depth", "5"),
    case("info-model-and-depth", "info", "--model", "d12", "--depth", "12"),
    case("info-vocab-0", "info", "--model", "d12", "--vocab-size", "0"),
    case("info-vocab-1e30", "info", "--model", "d12", "--vocab-size", "1e30"),
    case("info-seq-len-nan", "info", "--model", "d12", "--seq-len", "nan"),
    case("info-ratio-nan", "info", "--model", "d12", "--ratio", "nan"),
    case("info-ratio-inf", "info", "--model", "d12", "--ratio", "inf"),
    case("info-ratio-0", "info", "--model", "d12", "--ratio", "0"),
    case("info-valid-d20", "info", "--model", "d20", code=OK),
    case("info-valid-depth", "info", "--depth", "32", code=OK),
    case("info-valid-ratio-tiny", "info", "--model", "d12", "--ratio", "1e-300", code=OK),
    case("info-valid-vocab-huge", "info", "--model", "d12", "--vocab-size", str(2**52), code=OK),

    # ---- plan
    case("plan-no-model-no-days", "plan", "--gpu", "rtx4070"),
    case("plan-model-empty", "plan", "--model", "", "--gpu", "rtx4070"),
    case("plan-model-d0", "plan", "--model", "d0", "--gpu", "rtx4070"),
    case("plan-depth-1000", "plan", "--depth", "1000", "--gpu", "rtx4070", limit=1),
    case("plan-depth-7-valid", "plan", "--depth", "7", "--gpu", "rtx4070", code=OK),
    case("plan-model-and-depth", "plan", "--model", "d12", "--depth", "12"),
    case("plan-gpu-nosuchcard", "plan", "--model", "d12", "--gpu", "nosuchcard"),
    case("plan-gpu-empty", "plan", "--model", "d12", "--gpu", ""),
    case("plan-gpu-unicode", "plan", "--model", "d12", "--gpu", "ｒｔｘ４０７０", code=EITHER),
    case("plan-no-gpu", "plan", "--model", "d12", code=EITHER),
    case("plan-vram-0", "plan", "--model", "d12", "--gpu", "rtx4070", "--vram", "0"),
    case("plan-vram-neg", "plan", "--model", "d12", "--gpu", "rtx4070", "--vram", "-12GB"),
    case("plan-vram-neg-attached", "plan", "--model", "d12", "--gpu", "rtx4070", "--vram=-12GB", has="--vram"),
    case("plan-vram-1e30", "plan", "--model", "d12", "--gpu", "rtx4070", "--vram", "1e30"),
    case("plan-vram-nan", "plan", "--model", "d12", "--gpu", "rtx4070", "--vram", "nan"),
    case("plan-vram-tiny", "plan", "--model", "d12", "--gpu", "rtx4070", "--vram", "0.5"),
    case("plan-gpus-neg", "plan", "--model", "d12", "--gpu", "rtx4070", "--gpus", "-1"),
    case("plan-gpus-1e30", "plan", "--model", "d12", "--gpu", "rtx4070", "--gpus", "1e30"),
    case("plan-gpus-million", "plan", "--model", "d12", "--gpu", "rtx4070", "--gpus", "1e6", code=EITHER),
    case("plan-recipe-empty", "plan", "--model", "d12", "--gpu", "rtx4070", "--recipe", ""),
    case("plan-recipe-and-fit", "plan", "--model", "d12", "--gpu", "rtx4070", "--recipe", "lean", "--fit"),
    case("plan-tokens-0", "plan", "--model", "d12", "--gpu", "rtx4070", "--tokens", "0"),
    case("plan-tokens-1e-300", "plan", "--model", "d12", "--gpu", "rtx4070", "--tokens", "1e-300", code=EITHER),
    case("plan-tokens-1e18", "plan", "--model", "d12", "--gpu", "rtx4070", "--tokens", "1e18", code=OK),
    case("plan-tokens-and-ratio", "plan", "--model", "d12", "--gpu", "rtx4070", "--tokens", "5", "--ratio", "5"),
    case("plan-tokens-and-days", "plan", "--model", "d12", "--gpu", "rtx4070", "--tokens", "5B", "--days", "5"),
    case("plan-ratio-nan", "plan", "--model", "d12", "--gpu", "rtx4070", "--ratio", "nan"),
    case("plan-ratio-1e-300", "plan", "--model", "d12", "--gpu", "rtx4070", "--ratio", "1e-300", code=EITHER),
    case("plan-days-0", "plan", "--gpu", "rtx4070", "--days", "0"),
    case("plan-days-nan", "plan", "--gpu", "rtx4070", "--days", "nan"),
    case("plan-days-1e300", "plan", "--gpu", "rtx4070", "--days", "1e300"),
    case("plan-days-1e17-model", "plan", "--model", "d12", "--gpu", "rtx4070", "--days", "1e17", code=EITHER),
    case("plan-days-1e17-budget", "plan", "--gpu", "rtx4070", "--days", "1e17", code=EITHER),
    case("plan-days-1e-300-model", "plan", "--model", "d12", "--gpu", "rtx4070", "--days", "1e-300", code=EITHER),
    case("plan-days-1e-300-budget", "plan", "--gpu", "rtx4070", "--days", "1e-300", code=EITHER),
    case("plan-total-batch-7", "plan", "--model", "d12", "--gpu", "rtx4070", "--total-batch", "7",
         has="--total-batch"),
    case("plan-seq-len-0", "plan", "--model", "d12", "--gpu", "rtx4070", "--seq-len", "0"),
    case("plan-seq-len-huge", "plan", "--model", "d12", "--gpu", "rtx4070", "--seq-len", "1e15", code=EITHER),
    case("plan-micro-batch-huge", "plan", "--model", "d12", "--gpu", "rtx4070", "--micro-batch", "1e6",
         code=EITHER),
    case("plan-vocab-huge", "plan", "--model", "d12", "--gpu", "rtx4070", "--vocab-size", "1e15", code=EITHER),
    case("plan-mfu-0", "plan", "--model", "d12", "--gpu", "rtx4070", "--mfu", "0"),
    case("plan-mfu-1.5", "plan", "--model", "d12", "--gpu", "rtx4070", "--mfu", "1.5"),
    case("plan-mfu-nan", "plan", "--model", "d12", "--gpu", "rtx4070", "--mfu", "nan"),
    case("plan-mfu-1e-300", "plan", "--model", "d12", "--gpu", "rtx4070", "--mfu", "1e-300", code=EITHER),
    case("plan-power-1e-300", "plan", "--model", "d12", "--gpu", "rtx4070", "--power", "1e-300", code=EITHER),
    case("plan-price-huge", "plan", "--model", "d12", "--gpu", "rtx4070", "--price", "1e18", code=OK),
    case("plan-price-neg", "plan", "--model", "d12", "--gpu", "rtx4070", "--price", "-1"),
    case("plan-currency-empty", "plan", "--model", "d12", "--gpu", "rtx4070", "--currency", ""),
    case("plan-assume-unknown", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "frob=1"),
    case("plan-assume-no-value", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "fragmentation"),
    case("plan-assume-empty-value", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "fragmentation="),
    case("plan-assume-equals", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "="),
    case("plan-assume-neg", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "pcie_overlap=-1"),
    case("plan-assume-divisor-0", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume", "matmul_ceiling=0"),
    case("plan-assume-context-huge", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume",
         "cuda_context_bytes=1e18"),
    case("plan-assume-bandwidth-1e-300", "plan", "--model", "d12", "--gpu", "rtx4070", "--recipe", "offload-states",
         "--assume", "cpu_memory_bandwidth=1e-300", code=EITHER),
    case("plan-assume-overhead-huge", "plan", "--model", "d12", "--gpu", "rtx4070", "--assume",
         "overhead_watts=1e18", code=EITHER),
    case("plan-plot-dir", "plan", "--model", "d12", "--gpu", "rtx4070", "--plot", T),
    case("plan-plot-empty", "plan", "--model", "d12", "--gpu", "rtx4070", "--plot", ""),
    case("plan-plot-missing-folder", "plan", "--model", "d12", "--gpu", "rtx4070", "--plot", T + "/no/such/p.png"),
    case("plan-unknown-flag", "plan", "--frob"),
    case("plan-valid", "plan", "--model", "d12", "--gpu", "rtx4070", code=OK),
    case("plan-valid-json", "plan", "--model", "d20", "--gpu", "rtx4090", "--json", code=OK),
    case("plan-valid-budget", "plan", "--gpu", "rtx4070", "--days", "30", code=OK),
    case("plan-valid-recipe-upper", "plan", "--model", "d12", "--gpu", "rtx4070", "--recipe", " Lean ", code=OK),
    case("plan-valid-plot", "plan", "--model", "d12", "--gpu", "rtx4070", "--plot", T + "/plan.png", code=OK,
         limit=15),

    # ---- eval (bad input only: a real evaluation is in tests/test_core_metric.py and friends)
    case("eval-help", "eval", "--help", code=OK),
    case("eval-no-run-dir", "eval"),
    case("eval-missing", "eval", "/nonexistent/run", "--device", "cpu"),
    case("eval-file", "eval", T + "/afile", "--device", "cpu"),
    case("eval-empty-dir", "eval", T + "/empty", "--device", "cpu"),
    case("eval-empty-string", "eval", ""),
    case("eval-bad-json-config", "eval", T + "/badjson", "--device", "cpu"),
    case("eval-fake-nanochat", "eval", T + "/fakenano", "--device", "cpu"),
    case("eval-task-unknown", "eval", T + "/empty", "--task", "frob", has="--task"),
    case("eval-task-empty", "eval", T + "/empty", "--task", ""),
    case("eval-task-commas", "eval", T + "/empty", "--task", ",", has="names no task"),
    case("eval-core-no-bundle", "eval", T + "/empty", "--task", "core", has="--bundle"),
    case("eval-bundle-missing", "eval", T + "/empty", "--task", "core", "--bundle", "/nonexistent/b",
         has="/nonexistent/b"),
    case("eval-bundle-empty-dir", "eval", T + "/empty", "--task", "core", "--bundle", T + "/empty", has="core.yaml"),
    case("eval-bundle-file", "eval", T + "/empty", "--task", "core", "--bundle", T + "/afile", has="afile"),
    case("eval-gsm8k-no-data", "eval", T + "/empty", "--task", "gsm8k", has="--gsm8k"),
    case("eval-gsm8k-missing", "eval", T + "/empty", "--task", "gsm8k", "--gsm8k", "/nonexistent.jsonl",
         has="--gsm8k"),
    case("eval-arc-wrong-suffix", "eval", T + "/empty", "--task", "arc-easy", "--arc-easy", T + "/data.bin",
         "--device", "cpu"),
    case("eval-data-missing", "eval", T + "/empty", "--data", "/nonexistent/corpus", has="--data"),
    case("eval-max-per-task-0", "eval", T + "/empty", "--max-per-task", "0", has="--max-per-task"),
    case("eval-max-per-task-inf", "eval", T + "/empty", "--max-per-task", "inf"),
    case("eval-max-per-task-nan", "eval", T + "/empty", "--max-per-task", "nan"),
    case("eval-max-per-task-huge", "eval", T + "/empty", "--max-per-task", HUGE_INT),
    case("eval-batch-tokens-neg", "eval", T + "/empty", "--batch-tokens", "-5"),
    case("eval-bpb-tokens-1e300", "eval", T + "/empty", "--bpb-tokens", "1e300"),
    case("eval-max-new-tokens-0", "eval", T + "/empty", "--max-new-tokens", "0"),
    case("eval-lm-eval-limit-neg", "eval", T + "/empty", "--lm-eval-limit", "-1"),
    case("eval-lm-eval-empty", "eval", T + "/empty", "--lm-eval", ""),
    case("eval-device-tpu", "eval", T + "/empty", "--device", "tpu"),
    case("eval-unknown-flag", "eval", T + "/empty", "--frob"),

    # ---- bench (argument errors only: a real measurement is not a unit test)
    case("bench-steps-1", "bench", "--steps", "1", has="--steps"),
    case("bench-steps-neg", "bench", "--steps", "-1"),
    case("bench-steps-inf", "bench", "--steps", "inf"),
    case("bench-depth-0", "bench", "--depth", "0"),
    case("bench-depth-1000", "bench", "--depth", "1000", limit=1),
    case("bench-depth-5", "bench", "--depth", "5"),
    case("bench-recipe-nosuch", "bench", "--recipe", "nosuch"),
    case("bench-recipe-empty", "bench", "--recipe", ""),
    case("bench-gpu-empty", "bench", "--gpu", ""),
    case("bench-size-0", "bench", "--size", "0"),
    case("bench-seq-len-nan", "bench", "--seq-len", "nan"),
    case("bench-micro-batch-inf", "bench", "--micro-batch", "inf"),
    case("bench-unknown-flag", "bench", "--frob"),

    # ---- export (and transformers folders given to the commands that read models)
    case("export-no-to", "export", T + "/goodlog", T + "/out", has="--to"),
    case("export-to-gguf", "export", T + "/goodlog", "--to", "gguf", T + "/out", has="--to"),
    case("export-dtype-fp16", "export", T + "/goodlog", "--to", "hf", T + "/out", "--dtype", "fp16", has="--dtype"),
    case("export-phase-bad", "export", T + "/goodlog", "--to", "nanochat", T + "/out", "--phase", "x", has="--phase"),
    case("export-one-folder", "export", T + "/goodlog", "--to", "hf"),
    case("export-empty-out", "export", T + "/goodlog", "--to", "hf", ""),
    case("export-not-a-model", "export", T + "/empty", "--to", "hf", T + "/out", has="not a model"),
    case("export-source-missing", "export", T + "/nosuch", "--to", "hf", T + "/out", has="nosuch"),
    case("export-out-file", "export", T + "/goodlog", "--to", "hf", T + "/afile", has="afile"),
    case("export-out-under-file", "export", T + "/goodlog", "--to", "nanochat", T + "/afile/out", has="afile"),
    case("export-out-not-empty", "export", T + "/empty", "--to", "hf", T + "/goodlog", has="--force"),
    case("export-into-source", "export", T + "/goodlog", "--to", "hf", T + "/goodlog", "--force", has="goodlog"),
    case("export-fakenano", "export", T + "/fakenano", "--to", "hf", T + "/out"),
    case("export-emptycfg", "export", T + "/emptycfg", "--to", "nanochat", T + "/out"),
    case("export-hf-llama", "export", T + "/hfllama", "--to", "nanochat", T + "/out", has="model_type"),
    case("export-hf-tied", "export", T + "/hftied", "--to", "nanochat", T + "/out", has="tie_word_embeddings"),
    case("export-hf-pickle", "export", T + "/hfpickle", "--to", "nanochat", T + "/out", has="pytorch_model.bin"),
    case("export-hf-garbage", "export", T + "/hfgarbage", "--to", "nanochat", T + "/out", has="model.safetensors"),
    case("export-hf-bad-config", "export", T + "/hfbadcfg", "--to", "hf", T + "/out", has="hidden_size"),
    case("export-unknown-flag", "export", T + "/goodlog", "--to", "hf", T + "/out", "--frob"),
    case("sample-hf-llama", "sample", "--run-dir", T + "/hfllama", has="model_type"),
    case("sample-hf-garbage", "sample", "--run-dir", T + "/hfgarbage", "--device", "cpu"),
    case("chat-hf-tied", "chat", T + "/hftied", "-p", "hi", has="tie_word_embeddings"),

    # ---- serve (the bad ones fail before listening, or stop the server when the weights cannot load)
    case("serve-no-run-dir", "serve"),
    case("serve-run-dir-missing", "serve", "/nonexistent/run", has="not a directory"),
    case("serve-port-too-big", "serve", T + "/empty", "--port", "70000", has="--port"),
    case("serve-port-text", "serve", T + "/empty", "--port", "http", has="--port"),
    case("serve-host-empty", "serve", T + "/empty", "--host", "", has="--host"),
    case("serve-max-concurrent-zero", "serve", T + "/empty", "--max-concurrent", "0", has="--max-concurrent"),
    case("serve-kind-bad", "serve", T + "/empty", "--kind", "instruct", has="--kind"),
    case("serve-limit-unknown", "serve", T + "/empty", "--limit", "speed=3", has="--limit"),
    case("serve-limit-negative", "serve", T + "/empty", "--limit", "max_tokens=-1", has="--limit"),
    case("serve-bad-config", "serve", T + "/badjson", "--port", "0", has="config.json"),
    case("serve-empty-dir", "serve", T + "/empty", "--port", "0", "--kind", "chat", has="neither"),
    case("serve-fake-nanochat", "serve", T + "/fakenano", "--port", "0", "--device", "cpu"),
]


# ---------------------------------------------------------------- the harness

@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Import PyTorch and the heavy modules once, so that a case's time limit measures the case."""
    import matplotlib.pyplot  # noqa: F401
    import torch  # noqa: F401

    import onecard.data  # noqa: F401
    import onecard.plan.choose  # noqa: F401
    import onecard.plan.report  # noqa: F401
    import onecard.pretrain  # noqa: F401
    import onecard.weights  # noqa: F401


def hf_config(**changes) -> str:
    """A transformers nanochat config.json, with changes."""
    return json.dumps({"model_type": "nanochat", "num_hidden_layers": 1, "vocab_size": 300, "hidden_size": 64,
                       "num_attention_heads": 1, "max_position_embeddings": 32, **changes})


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """The files the cases point at; the working directory and ONECARD_HOME are kept inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ONECARD_HOME", str(tmp_path / "home"))
    (tmp_path / "afile").write_text("just a file\n")
    (tmp_path / "fake.parquet").write_text("this is text, not parquet\n" * 50)
    (tmp_path / "data.bin").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "tiny.txt").write_text("a small corpus of a few words, a few words only\n" * 40)
    (tmp_path / "empty").mkdir()
    for name, files in {
        "badlog": {"log.jsonl": "[1,2]\n"},
        "goodlog": {"log.jsonl": '{"step": 1, "loss": 3.5, "wall_s": 1.0}\n{"step": 2, "loss": 3.1, "wall_s": 2.0}\n',
                    "config.json": "[1]", "summary.json": "{not json"},
        "garbage": {"log.jsonl": '\x00\xff{"step": [], "loss": "x"}\n{"step": true, "loss": null}\n{{{{\n'},
        "hugelog": {"log.jsonl": '{"step": 1e308, "loss": 1e308, "wall_s": 1e308, "tokens_per_s": 1e308}\n'
                                 '{"step": 2e308, "loss": -1e308}\n{"step": 123456789012345678901234567890, '
                                 '"loss": 1, "vram_bytes": 1e300}\n'},
        "largelog": {"log.jsonl": '{"step": 1, "loss": 1e18, "wall_s": 0}\n{"step": 1e18, "loss": -1e18, '
                                  '"wall_s": 1e18, "tokens_per_s": 1e18, "vram_bytes": 1e18}\n'},
        "emptycfg": {"config.json": "{}", "model.safetensors": "not safetensors"},
        "badjson": {"config.json": "{", "model.safetensors": "not safetensors"},
        "listcfg": {"config.json": "[1, 2]", "model.safetensors": "not safetensors"},
        "fakenano": {"model_000010.pt": "not a torch file", "meta_000010.json": '{"model_config": {"n_layer": "x"}}'},
        "badmanifest": {"onecard-dataset.json": '{"format": "onecard-shards", "validation": 3}'},
        "hfllama": {"config.json": '{"model_type": "llama"}', "model.safetensors": "not safetensors"},
        "hftied": {"config.json": hf_config(tie_word_embeddings=True), "model.safetensors": "not safetensors"},
        "hfpickle": {"config.json": hf_config(), "pytorch_model.bin": "not a pickle"},
        "hfgarbage": {"config.json": hf_config(), "model.safetensors": "not safetensors", "tokenizer.json": "{"},
        "hfbadcfg": {"config.json": hf_config(hidden_size="x"), "model.safetensors": "not safetensors"},
    }.items():
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text)
    (tmp_path / "logdir" / "log.jsonl").mkdir(parents=True)
    return tmp_path


def _alarm(signum, frame):
    raise Hang()


def run_case(argv: list[str], limit: float) -> tuple[int, float]:
    """main(argv) under a time limit: (exit code, seconds). Fails on an escaping exception or a hang."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    # a hang in C code, which the alarm cannot interrupt, ends the whole run, loudly
    faulthandler.dump_traceback_later(limit * 4 + 10, exit=True, file=sys.__stderr__)
    started = time.perf_counter()
    try:
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Hang:
        pytest.fail(f"onecard {argv} ran past {limit} s", pytrace=False)
    except BaseException:  # noqa: B036 - anything but SystemExit escaping main is the defect we look for
        pytest.fail(f"onecard {argv} raised:\n{traceback.format_exc()}", pytrace=False)
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
    code = 0 if code is None else code
    return (code if isinstance(code, int) else 1), time.perf_counter() - started


def _options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Every command path ('train', 'tokenizer train', '') -> the flags it takes."""
    found = {}

    def walk(p, path):
        found[path] = {s for a in p._actions for s in a.option_strings}
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}".strip())
    walk(parser, "")
    return found


OPTIONS = _options(build_parser())


def flags_of(argv: list[str]) -> set[str]:
    """The flags of the deepest command named at the start of argv."""
    path = ""
    for word in argv:
        if f"{path} {word}".strip() not in OPTIONS:
            break
        path = f"{path} {word}".strip()
    return OPTIONS[path]


@pytest.mark.parametrize("argv, codes, has, limit", CASES)
def test_fuzz_case(argv, codes, has, limit, tmp, capsys):
    argv = [a.replace(T, str(tmp)) for a in argv]
    code, seconds = run_case(argv, limit)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code in codes, f"exit {code}, expected {sorted(codes)}; stderr: {err!r}; stdout tail: {out[-500:]!r}"
    assert seconds < limit
    if code == 0:
        return
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"error is not one line: {err!r}"
    assert lines[0].startswith("onecard"), lines[0]
    if has is not None:
        assert has in lines[0], lines[0]
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", lines[0]))
    unknown = flags - flags_of(argv) - set(argv)  # an unrecognized flag the user typed is echoed back
    assert not unknown, f"the message names flags that `onecard {argv[0]}` lacks: {unknown}: {lines[0]}"


def test_tokenizer_out_file_fails_before_training(tmp, capsys):
    code, _ = run_case(["tokenizer", "train", "--out", str(tmp / "afile")], 2)
    out, err = capsys.readouterr()
    assert code == 2 and "afile" in err and "training" not in out


def test_case_table_is_wide():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 150
    commands = {c.values[0][0] for c in CASES if c.values[0]}
    assert {"train", "report", "sample", "tokenizer", "info", "plan", "bench", "data"} <= commands


# ---------------------------------------------------------------- the console script, once

def test_help_is_quick_and_imports_no_torch(tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "onecard.cli", "--help"], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert result.returncode == 0 and "usage: onecard" in result.stdout and not result.stderr
    assert seconds < 10, f"onecard --help took {seconds:.1f} s"
    probe = subprocess.run([sys.executable, "-c", "import sys, onecard.cli; onecard.cli.build_parser(); "
                            "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0 and probe.stdout.strip() == "False", probe.stdout + probe.stderr


# ---------------------------------------------------------------- the number grammar, as properties

NUMBERISH = st.from_regex(r"\s*[-+]?[0-9_,]*\.?[0-9_]*([eE][-+]?[0-9]{1,4})?[kKmMbBgGtT]?\s*", fullmatch=True)
TEXT = st.one_of(st.text(), NUMBERISH, st.floats().map(repr), st.integers().map(str),
                 st.sampled_from(["inf", "-inf", "nan", "1e309", "1e-300", "infk", "nank", "k", "", " ", "1e18",
                                  "1.0000001e18", "_", ",", "1_000", "٣", "１２", "12 GiB", "8g", "-12GB", "GB"]))


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_parse_number_is_finite_and_bounded_or_a_number_error(text):
    try:
        value = parse_number(text)
    except NumberError:
        return
    assert isinstance(value, float) and math.isfinite(value) and abs(value) <= LARGEST


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_parse_gib_is_finite_and_bounded_or_a_number_error(text):
    try:
        value = parse_gib(text)
    except NumberError:
        return
    assert isinstance(value, float) and math.isfinite(value) and abs(value) <= LARGEST


# each argparse type: what a value it returns must satisfy
BOUNDS = {
    argtypes.positive_int: lambda v: type(v) is int and 0 < v <= argtypes.LARGEST_INT,
    argtypes.non_negative_int: lambda v: type(v) is int and 0 <= v <= argtypes.LARGEST_INT,
    argtypes.positive_float: lambda v: isinstance(v, float) and 0 < v <= LARGEST,
    argtypes.non_negative_float: lambda v: isinstance(v, float) and 0 <= v <= LARGEST,
    argtypes.fraction: lambda v: isinstance(v, float) and 0 < v <= 1,
    argtypes.seed: lambda v: type(v) is int and 0 <= v < 2**63,
    argtypes.temperature: lambda v: isinstance(v, float) and 0 <= v <= 2,
    argtypes.gigabytes: lambda v: isinstance(v, float) and 0 < v <= 1e6,
    argtypes.text_arg: lambda v: isinstance(v, str) and v.strip() != "",
}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(BOUNDS, key=lambda f: f.__name__)), TEXT)
def test_argument_types_return_bounded_values_or_an_argument_type_error(kind, text):
    try:
        value = kind(text)
    except argparse.ArgumentTypeError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert BOUNDS[kind](value), (kind.__name__, text, value)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 999), st.text("0123456789", min_size=1, max_size=6).filter(lambda t: len(t) != 3),
       st.sampled_from(["", "k", "B", "GB"]))
def test_a_decimal_comma_is_refused_never_read_as_thousands(whole, fraction, suffix):
    """'0,30' is 0.30 to half the world: refused with a reason, never taken as 30."""
    with pytest.raises(NumberError, match="decimal point"):
        (parse_gib if suffix == "GB" else parse_number)(f"{whole},{fraction}{suffix if suffix != 'GB' else ''}"
                                                        + ("GB" if suffix == "GB" else ""))


@pytest.mark.parametrize("text,value", [("524,288", 524_288), ("1,000,000.5", 1_000_000.5), ("1,024k", 1_024_000),
                                        ("-2,500", -2_500), ("11,219,763,200", 11_219_763_200)])
def test_commas_grouping_thousands_still_read(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("n, noun, said", [(1, "step", "1 step"), (71680, "step", "71,680 steps"),
                                           (1.0, "day", "1 day"), (2.5, "day", "2.5 days"), (0, "day", "0 days")])
def test_quantity_says_one_in_the_singular(n, noun, said):
    """'1 steps' and '1 days' were printed where one step or one day was planned."""
    assert quantity(n, noun) == said
