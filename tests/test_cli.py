"""Bad input gets one line saying what to do instead, exit code 2, no traceback."""

import subprocess
import sys

import pytest
import torch

from onecard.cli import main
from onecard.errors import UsageError


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(list(argv)))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_info_prints_published_counts(capsys):
    code, out, _ = run_cli(capsys, "info", "--model", "d32")
    assert code == 0
    assert "1,879,048,192" in out and "1.20796e+10" in out
    # 20 tokens per parameter, the published d32 horizon (docs/architecture.md#training-horizon)
    assert "37,580,963,840" in out


@pytest.mark.parametrize("argv, fragment", [
    (["info", "--model", "x32"], "unknown model"),
    (["info", "--depth", "0"], "positive whole number"),
    (["info"], "needs --model"),
    (["train", "--micro-batch", "-4"], "positive whole number"),
    (["train", "--total-batch", "0"], "positive whole number"),
    (["train", "--data", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["train", "--recipe", "turbo"], "unknown recipe"),
    (["sample", "--run-dir", "/nonexistent/run"], "not a directory"),
    (["sample", "/nonexistent/run"], "not a directory"),  # as chat, eval, serve and export take it
    (["sample", "runs/a", "--run-dir", "runs/b"], "two runs given"),
    (["train", "--stpes", "10"], "unrecognized arguments: --stpes 10 (see onecard train --help)"),
    (["plan", "--model", "d20", "--tokens", "38", "B"], "unrecognized arguments: B (see onecard plan --help)"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0]


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_under_torchrun_rank_0_alone_says_a_usage_error(capsys, monkeypatch, rank, said):
    monkeypatch.setenv("RANK", rank)  # every rank parses the same command line: one message is enough
    code, _, err = run_cli(capsys, "train", "--stpes", "10")
    assert code == 2 and ("unrecognized arguments: --stpes" in err) == said and (err == "") != said


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys):
    code, _, err = run_cli(capsys, "train", "--device", "cuda")
    assert code == 2 and "CUDA" in err and len(err.strip().splitlines()) == 1


def test_sample_without_a_run_and_none_under_runs_says_what_to_give(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "sample")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "onecard sample RUN_DIR" in err


def test_a_run_without_final_weights_points_at_its_checkpoints(capsys, tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_000040").mkdir(parents=True)  # stopped before its final weights
    code, _, err = run_cli(capsys, "sample", "--run-dir", str(tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no final weights yet" in err and "step_000040, or finish" in err


def test_a_nanochat_phase_folder_points_at_its_depth_folders(capsys, tmp_path):
    """nanochat keeps chatsft_checkpoints/d20/model_*.pt: the phase folder was called "not a model"."""
    for depth in ("d12", "d20"):
        (tmp_path / "chatsft_checkpoints" / depth).mkdir(parents=True)
        (tmp_path / "chatsft_checkpoints" / depth / "model_000650.pt").write_bytes(b"")
    code, _, err = run_cli(capsys, "chat", str(tmp_path / "chatsft_checkpoints"), "-p", "hi")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds nanochat checkpoint folders: give one of them" in err and "chatsft_checkpoints/d20" in err


def test_a_checkpoint_of_an_unfinished_run_loads_with_the_runs_tokenizer(capsys, tmp_path):
    """What the message above advises works as given: `sft --from RUN/checkpoints/step_N` (no --tokenizer,
    which sft does not take) finds the run's own tokenizer."""
    from onecard.weights import load_weights
    from tests.serve_helpers import TINY

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *TINY, "--save-every-steps", "1"]) == 0
    (run / "model.safetensors").unlink()  # as if it stopped before its final weights
    checkpoint_dir = sorted((run / "checkpoints").glob("step_*"))[-1]
    model, tokenizer, _ = load_weights(checkpoint_dir)
    assert tokenizer.vocab_size == model.config.vocab_size
    capsys.readouterr()
    assert main(["sft", "--from", str(checkpoint_dir), "--run-dir", str(tmp_path / "sft"), "--device", "cpu",
                 "--dry-run"]) == 0, capsys.readouterr().err


def test_empty_data_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_vocabulary_larger_than_corpus_supports(capsys, tmp_path):
    (tmp_path / "tiny.txt").write_text("a small corpus of a few words, a few words only\n" * 20)
    code, _, err = run_cli(capsys, "tokenizer", "train", "--data", str(tmp_path), "--vocab-size", "5000",
                           "--out", str(tmp_path / "tok"))
    assert code == 2 and "vocab" in err.lower() and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("module", ["onecard.cli", "onecard"])  # python -m onecard, as the command
def test_console_script_has_no_traceback(module):
    result = subprocess.run([sys.executable, "-m", module, "info", "--model", "dd"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("onecard: error:") and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["train", "--device", "cpu"], ["sft", "--device", "cpu", "--from", "nowhere"]])
def test_threads_sets_pytorchs_threads_before_anything_runs(monkeypatch, tmp_path, command):
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    main([*command, "--threads", "1", "--run-dir", str(tmp_path / "r"), "--dry-run"])
    assert asked == [1]
    asked.clear()
    main([*command, "--run-dir", str(tmp_path / "r"), "--dry-run"])
    assert asked == []  # PyTorch's own default


def test_a_reader_that_leaves_the_pipe_is_not_an_error():
    """`onecard plan ... | head -1`: the command stops quietly (141, as a shell reports SIGPIPE)."""
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-m", "onecard.cli", "plan", "--model", "d20", "--gpu", "rtx4070"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.readline()
        process.stdout.close()  # the reader has what it wanted
        err = process.stderr.read().decode()
        assert process.wait(60) in (0, 141) and "error" not in err and "Traceback" not in err, err


def test_running_out_of_ram_is_one_line(capsys, monkeypatch):
    import onecard.planning

    def exhausted(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 32768000000 bytes")
    monkeypatch.setattr(onecard.planning, "run_info", exhausted)
    assert main(["info", "--model", "d2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onecard: error: out of memory on this machine") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["sft", "--batch", "2"], ["sft", "--batch", "6"], ["train", "--seq-len", "1024"]])
def test_the_default_micro_batch_fits_a_batch_the_user_set(capsys, tmp_path, argv):
    from tests.serve_helpers import TINY

    base = tmp_path / "base"
    if argv[0] == "sft":
        assert main(["train", "--run-dir", str(base), *TINY]) == 0
        argv = [*argv, "--from", str(base), "--device", "cpu"]
    capsys.readouterr()
    assert main([*argv, "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0, capsys.readouterr().err


def test_a_damaged_gzip_task_file_is_one_line(tmp_path):
    import gzip
    import zlib

    from onecard.chat_tasks import read_rows

    good = gzip.compress(b"".join(b'{"question": "q%d"}\n' % i for i in range(2000)))

    def raises_zlib_error(data: bytes) -> bool:
        try:
            gzip.decompress(data)
        except zlib.error:
            return True
        except (OSError, EOFError):
            return False
        return False
    damaged_copies = (good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:] for i in range(12, len(good)))
    flipped = next(d for d in damaged_copies if raises_zlib_error(d))
    damaged = tmp_path / "arc.jsonl.gz"
    damaged.write_bytes(flipped)
    with pytest.raises(UsageError, match="cannot read"):
        list(read_rows(damaged))


@pytest.mark.parametrize("pattern", ["http://x/{index[0]}", "http://x/{index.foo}", "http://x/{name[x]}"])
def test_base_url_patterns_that_index_into_a_field_are_refused(pattern):
    from onecard.datasources import check_base_url

    with pytest.raises(UsageError, match="may name only"):
        check_base_url(pattern)


@pytest.mark.parametrize("command, default", [(["chat", "nowhere"], [1]), (["sample", "--run-dir", "nowhere"], [1]),
                                              (["eval", "nowhere"], [])])
def test_threads_in_the_commands_that_load_a_model(monkeypatch, tmp_path, command, default):
    """--threads set before the model loads (here: fails to, there being none); chat and sample write one token
    at a time and default to 1 thread as serve does, eval keeps PyTorch's default as train does."""
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--device", "cpu", "--threads", "3"]) == 2
    assert asked == [3]
    asked.clear()
    assert main([*command, "--device", "cpu"]) == 2
    assert asked == default


def test_tokenizer_train_with_no_arguments_works_on_the_embedded_corpus(capsys, tmp_path, monkeypatch):
    """The embedded corpus supports about 50,000 tokens: its default is the demo's vocabulary, not 65,536."""
    from onecard.tokenizer import Tokenizer

    monkeypatch.chdir(tmp_path)
    assert main(["tokenizer", "train"]) == 0, capsys.readouterr().err
    assert Tokenizer.load(tmp_path / "tokenizer").vocab_size == 2048
    before = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    code, _, err = run_cli(capsys, "tokenizer", "train", "--vocab-size", "1024")  # the same --out again
    assert code == 2 and "already holds a tokenizer" in err and "--force" in err
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == before
    assert main(["tokenizer", "train", "--vocab-size", "1024", "--force"]) == 0
    assert Tokenizer.load(tmp_path / "tokenizer").vocab_size == 1024


def test_a_reader_that_leaves_a_training_run_stops_it_as_a_broken_pipe(tmp_path):
    """`onecard train ... 2>&1 | head -8` during training: exit 141, and the run's summary says what
    happened (a pipe, not a disk to free)."""
    import json

    from tests.serve_helpers import TINY

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "onecard.cli", "train", "--run-dir", str(run), *TINY[:-2], "--steps", "400",
            "--eval-every", "5"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for _ in range(8):
        process.stdout.readline()
    process.stdout.close()
    assert process.wait(120) == 141
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "Broken pipe" in summary["message"] and "Free space" not in \
        summary["message"]


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"onecard {version('onecard')}"


@pytest.mark.parametrize("argv", [["train", "--vocab-size", "10", "--steps", "1"],
                                  ["tokenizer", "train", "--vocab-size", "10", "--out", "{tmp}/tok"]])
def test_a_vocabulary_bpe_cannot_make_is_refused_before_any_work(capsys, tmp_path, monkeypatch, argv):
    """'training a 10-token tokenizer ...' was said (and the run described) before the refusal."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert code == 2 and "vocab size must be between 266" in err
    assert "training a" not in out + err and "steps ×" not in out + err and "step ×" not in out + err


def test_sample_says_when_the_prompt_is_cut_to_fit_the_models_positions(capsys, tmp_path):
    """The printed text starts with the whole prompt: a prompt the model read only the end of is said."""
    from tests.serve_helpers import TINY

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *TINY]) == 0  # context 32: 320 positions
    capsys.readouterr()
    code, out, err = run_cli(capsys, "sample", str(run), "--prompt", "def main(argv):", "--max-tokens", "500")
    assert code == 0 and out.startswith("def main(argv):")
    assert "note: the model reads at most 320 positions: the prompt's " in err
    assert "cut to their last 1 and at most 319 tokens follow, not --max-tokens 500" in err
    code, _, err = run_cli(capsys, "sample", str(run), "--prompt", "def main(argv):", "--max-tokens", "3")
    assert code == 0 and err == ""


def test_info_describes_the_2026_family_by_its_own_defaults(capsys):
    """info had no --arch: the nanochat-2026 models (value embeddings, vocabulary 32,768, 12 tokens per
    matrix and lm_head parameter) could not be described. Checked against nanochat's own counts in
    tests/test_model_2026.py; here, that info prints them."""
    from onecard.model_config import ARCH_2026, VOCAB_2026, GPTConfig, param_counts, scaling_params

    code, out, _ = run_cli(capsys, "info", "--model", "d24", "--arch", ARCH_2026)
    config = GPTConfig.from_depth(24, VOCAB_2026, 2048, arch=ARCH_2026)
    assert code == 0 and "vocab 32,768" in out and "value_embeds" in out
    assert f"parameters: {sum(param_counts(config).values()):,}" in out
    assert f"training tokens (12 per matrix and lm_head parameter, {scaling_params(config):,} of them): " \
           f"{12 * scaling_params(config):,}" in out


def test_a_missing_extra_names_the_install_the_readme_gives(monkeypatch, capsys):
    """onecard is installed from its checkout (`pip install -e .`): `pip install 'onecard[serve]'` asked the
    package index for a package of that name, which is not this one."""
    import onecard.serve

    monkeypatch.setattr(onecard.serve, "find_spec", lambda name: None)
    assert main(["serve", "runs/none"]) == 2
    assert "pip install -e '.[serve]'" in capsys.readouterr().err
