"""nanochat-2026 through onecard's machinery: train, resume bitwise, sample with the KV-cache
engine, reload the run, load a checkpoint written as nanochat 92d63d4 writes it."""

import json
import pickle

import pytest
import tiktoken
import torch
from safetensors.torch import load_file

from onecard.data import Corpus, iter_texts
from onecard.engine import Engine, Sampling
from onecard.family import build_model
from onecard.model_2026 import GPT2026
from onecard.model_config import GPTConfig
from onecard.pretrain import train
from onecard.recipe import NAMED
from onecard.run import TrainSettings
from onecard.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from onecard.weights import load_weights
from tests.reference import nanochat

STEPS = 5


@pytest.fixture(scope="module")
def setup():
    corpus = Corpus.embedded()
    tokenizer = Tokenizer.train(iter_texts(corpus, 100_000), 300)
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=3, n_head=2, n_kv_head=1,
                       n_embd=64, arch="nanochat-2026")
    return corpus, tokenizer, config


def run(setup, run_dir, recipe="baseline", **changes):
    corpus, tokenizer, config = setup
    settings = TrainSettings(run_dir=run_dir, steps=STEPS, total_batch=256, seed=3, eval_every=0, eval_batches=1,
                             sample_tokens=4)
    for key, value in changes.items():
        setattr(settings, key, value)
    return train(config, tokenizer, corpus, NAMED[recipe].with_(micro_batch=4, seq_len=32), settings,
                 log=lambda *_: None)


@pytest.mark.parametrize("recipe", ["baseline", "lean"])
def test_stopped_and_resumed_equals_uninterrupted(setup, tmp_path, recipe):
    straight = run(setup, tmp_path / "straight", recipe)
    first = run(setup, tmp_path / "resumed", recipe, stop_after=2)
    assert first["stopped"] == "limit" and first["step"] == 2
    path = tmp_path / "resumed" / "config.json"  # as onecard wrote it before: the classic's rates, not used
    older = json.loads(path.read_text())
    older["train"].update(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    path.write_text(json.dumps(older))
    second = run(setup, tmp_path / "resumed", recipe)
    assert second["stopped"] is None and second["step"] == STEPS
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), \
        load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and "value_embeds.2.weight" in a and "smear_gate.weight" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight["val_bpb_end"] == second["val_bpb_end"]
    assert isinstance(straight["sample"], str) and straight["sample"]
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["model_config"]["arch"] == "nanochat-2026"
    # the family sets its own learning rates: the classic's are not recorded as this run's
    assert [saved["train"][k] for k in ("matrix_lr", "embedding_lr", "unembedding_lr")] == [None] * 3
    model, _, info = load_weights(tmp_path / "straight")
    assert isinstance(model, GPT2026) and info["layout"] == "onecard"


def test_training_lowers_the_loss_and_the_engine_samples(setup, tmp_path):
    result = run(setup, tmp_path / "r", steps=12, eval_every=6)
    assert result["val_bpb_end"] < result["val_bpb_start"]
    engine = Engine(result["model"], setup[1], tools=False)
    outs = engine.complete(setup[1].encode("def ", prepend_bos=True), Sampling(max_tokens=40, seed=1), num_samples=3)
    assert len(outs) == 3 and all(len(o) <= 40 for o in outs)


@torch.no_grad()
def test_engine_batch_equals_one_by_one_greedy(setup):
    # the prefill cache (keys, values and smear's last embedding) copied to every sample
    config = setup[2]
    torch.manual_seed(0)
    model = build_model(config)
    for p in model.parameters():
        p.normal_(0, 0.3)
    engine = Engine(model, setup[1], tools=False)
    prompt = setup[1].encode("import os\n", prepend_bos=True)
    greedy = Sampling(temperature=0.0, max_tokens=20)
    batch = engine.complete(prompt, greedy, num_samples=2)
    ids = list(prompt)
    expected = []
    for _ in range(20):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt == setup[1].bos_id:
            break
        expected.append(nxt)
        ids.append(nxt)
    assert batch[0] == batch[1] == expected


def test_loads_a_nanochat_92d63d4_checkpoint(tmp_path):
    gpt = nanochat("92d63d4", "gpt")
    vocab = 256 + len(SPECIAL_TOKENS)
    ref_config = gpt.GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                               window_pattern="SL")
    ref = gpt.GPT(ref_config)
    torch.manual_seed(0)
    ref.init_weights()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ckpt = tmp_path / "base_checkpoints" / "d2"
    ckpt.mkdir(parents=True)
    torch.save({"_orig_mod." + k: v for k, v in ref.state_dict().items()}, ckpt / "model_000007.pt")
    from dataclasses import asdict
    (ckpt / "meta_000007.json").write_text(json.dumps({"step": 7, "model_config": asdict(ref_config)}))
    enc = tiktoken.Encoding(name="nanochat", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})
    (tmp_path / "tokenizer").mkdir()
    with open(tmp_path / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    model, _, info = load_weights(ckpt)
    assert isinstance(model, GPT2026) and model.config.window_pattern == "SL" and info["step"] == 7
    idx = torch.randint(0, vocab, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), rtol=1e-5, atol=1e-5)


def test_the_2026_family_goes_through_sft_chat_and_export(tmp_path, capsys):
    """The stages after pre-training take this family as they take the classic."""
    from onecard.cli import main

    base, sft, out = tmp_path / "base", tmp_path / "sft", tmp_path / "out"
    assert main(["train", "--arch", "nanochat-2026", "--run-dir", str(base), "--device", "cpu", "--depth", "2",
                 "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len", "32", "--micro-batch", "2",
                 "--total-batch", "128", "--eval-every", "0", "--eval-batches", "1", "--steps", "2"]) == 0
    # nanochat-2026 trains without clipping gradients (base_train.py at karpathy/nanochat 00255c1)
    assert json.loads((base / "config.json").read_text())["train"]["grad_clip"] == 0
    capsys.readouterr()  # resuming it as the other family is refused in one line (it was a traceback)
    assert main(["train", "--arch", "classic", "--run-dir", str(base), "--device", "cpu", "--steps", "3"]) == 2
    assert "model arch nanochat-2026 -> classic" in capsys.readouterr().err
    assert main(["sft", "--from", str(base), "--run-dir", str(sft), "--device", "cpu", "--steps", "2", "--batch", "4",
                 "--micro-batch", "2", "--eval-batches", "1", "--eval-every", "0"]) == 0
    assert json.loads((sft / "config.json").read_text())["model_config"]["arch"] == "nanochat-2026"
    steps = [json.loads(line) for line in (sft / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["lr_multiplier"] for r in steps] == [1.0, 1.0]  # chat_sft.py's: constant for the first half
    assert json.loads((sft / "config.json").read_text())["train"]["grad_clip"] == 0  # unclipped, as chat_sft.py
    capsys.readouterr()
    assert main(["chat", str(sft), "-p", "What is 2 + 3?", "--max-tokens", "6", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["export", str(sft), "--to", "nanochat", str(out)]) == 0


def test_train_help_gives_this_familys_defaults(capsys):
    """train --help named only the classic's batch, ratio and vocabulary, which this family does not use."""
    from onecard.cli import main
    from onecard.model_config import VOCAB_2026
    from onecard.schedule_2026 import RATIO

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "nanochat-2026: its own, growing with depth" in text
    assert f"nanochat-2026: {RATIO} per matrix and lm_head parameter" in text
    assert f"nanochat-2026: {VOCAB_2026}" in text
