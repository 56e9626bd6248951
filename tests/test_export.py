"""`onecard export` and importing a transformers folder, checked by the other side's own code:
Hugging Face transformers' `nanochat` model and tokenizer (AutoModelForCausalLM, AutoTokenizer,
apply_chat_template, and its own TikTokenConverter for the reverse direction), and nanochat's own
checkpoint loader and GPT (../shared/reference/nanochat-fae3aca; skipped, with the reason, where
absent).

Tolerances. transformers' nanochat is onecard's network op for op, except that it computes the
rotary cos/sin tables in the model's dtype (fp32 here) where onecard keeps them in bf16, as
nanochat does. With fp32 tables put into onecard's model (`fp32_rotary`) both sides do the same
float32 arithmetic, and the logits agree to 1e-5 (measured: bitwise on this CPU): that is the proof.
With onecard's own bf16 tables the only difference is the tables' rounding (relative 2^-9 per
entry), which moves the attention scores of unit-RMS queries and keys by up to about
2^-8·sqrt(head_dim); measured here it moves the logits (bounded by ±15) by at most 0.012, asserted
below 0.05. nanochat's GPT keeps bf16 tables too: there the logits are compared bitwise.
"""

from __future__ import annotations

import base64
import json
import pickle

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from onecard import formats
from onecard.cli import main
from onecard.conversations import normalize, prompt_ids, render
from onecard.data import Corpus, iter_texts
from onecard.engine import Engine, Sampling
from onecard.errors import UsageError
from onecard.export import write_hf, write_nanochat
from onecard.family import build_model
from onecard.model import ROTARY_BASE, GPTConfig
from onecard.tokenizer import SPECIAL_TOKENS, Tokenizer
from onecard.weights import load_weights
from tests.reference import nanochat

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")

TINY_TRAIN = ["--device", "cpu", "--depth", "1", "--vocab-size", "300", "--tokenizer-chars", "20000", "--seq-len",
              "32", "--micro-batch", "2", "--total-batch", "128", "--eval-every", "0", "--eval-batches", "1",
              "--steps", "2"]
FP32_ATOL = 1e-5  # same float32 arithmetic on both sides; only kernels' summation order may differ
BF16_TABLE_ATOL = 0.05  # onecard's bf16 rotary tables against transformers' fp32 ones (see the docstring)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", "--run-dir", str(run), *TINY_TRAIN]) == 0
    return run


@pytest.fixture(scope="module")
def hf_dir(run_dir):
    out = run_dir.parent / "hf"
    assert main(["export", str(run_dir), "--to", "hf", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def onecard_model(run_dir):
    return load_weights(run_dir)[:2]


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def fp32_rotary(model):
    """A copy of `model` whose rotary tables are float32, as transformers computes them."""
    copy = build_model(model.config, init=False)
    copy.load_state_dict(model.state_dict())
    channels = torch.arange(0, model.config.head_dim, 2, dtype=torch.float32)
    inv_freq = 1.0 / (ROTARY_BASE ** (channels / model.config.head_dim))
    freqs = torch.outer(torch.arange(copy.rotary_len, dtype=torch.float32), inv_freq)
    copy.cos, copy.sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    return copy.eval()


def random_model(config: GPTConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # the init zeroes the head: logits would all be 0
    return model.eval()


@torch.no_grad()
def logits_of(model, idx):
    """Logits of onecard's or nanochat's GPT (a tensor) or of a transformers model (an output object)."""
    out = model(idx)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


# ---------------------------------------------------------------- onecard -> transformers

def test_export_writes_transformers_nanochat_files(hf_dir, onecard_model):
    model, tokenizer = onecard_model
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                         "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert config["final_logit_softcapping"] == 15.0 and config["hidden_act"] == "relu2"
    assert config["rope_parameters"]["rope_theta"] == 10000.0 and config["tie_word_embeddings"] is False
    assert config["num_attention_heads"] == model.config.n_head and config["dtype"] == "float32"
    assert config["onecard_phase"] == "base"  # what serve, chat and eval read to tell base from chat
    # transformers reads back the same shape
    loaded = transformers.AutoConfig.from_pretrained(hf_dir)
    assert formats.gpt_config(loaded.to_dict()) == model.config


def test_weights_get_the_mode_of_the_files_beside_them(hf_dir, run_dir):
    """safetensors writes 0600; a shared model folder's weights were unreadable to anyone else."""
    for folder in (hf_dir, run_dir, *sorted((run_dir / "checkpoints").iterdir())):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
        assert len(set(modes.values())) == 1, (folder, modes)


def test_transformers_logits_equal_onecard_fp32(onecard_model, hf_model):
    model, _ = onecard_model
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    theirs = logits_of(hf_model, idx)
    torch.testing.assert_close(logits_of(fp32_rotary(model), idx), theirs, rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(logits_of(model, idx), theirs, rtol=0, atol=BF16_TABLE_ATOL)


def test_transformers_greedy_32_tokens_equal_onecard(onecard_model, hf_model, hf_tokenizer):
    model, tokenizer = onecard_model
    prompt = tokenizer.encode("def main():\n    ", prepend_bos=True)
    assert hf_tokenizer("def main():\n    ")["input_ids"] == prompt  # <|bos|> in front, as onecard samples
    # onecard's own sampling path: KV cache, its bf16 rotary tables, greedy, stopping where it stops
    ours = [token for token, _ in (step[0] for step in Engine(model, tokenizer, tools=False).generate(
        prompt, Sampling(temperature=0, max_tokens=32)))]
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert len(ours) == 32 and theirs == ours


def test_bf16_export(run_dir, onecard_model, tmp_path):
    from safetensors.torch import load_file

    assert main(["export", str(run_dir), "--to", "hf", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back, _, _ = load_weights(tmp_path / "bf16")  # and onecard reads it back: the same weights, rounded
    for name, tensor in onecard_model[0].state_dict().items():
        if name not in ("cos", "sin"):
            assert torch.equal(back.state_dict()[name], tensor.bfloat16().float()), name


def test_grouped_query_attention_model_exports_with_equal_logits(onecard_model, tmp_path):
    _, tokenizer = onecard_model
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = random_model(config)
    write_hf(tmp_path, model, tokenizer, "fp32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert theirs.config.num_key_value_heads == 2
    idx = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(fp32_rotary(model), idx), logits_of(theirs, idx), rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(logits_of(model, idx), logits_of(theirs, idx), rtol=0, atol=BF16_TABLE_ATOL)


# ---------------------------------------------------------------- the tokenizer and the chat template

EDGE_TEXTS = [
    "", " ", "  ", "\n", "\r\n\r\n", "\t\t x", "hello world", "Hello, World!!!   \n\n\n  end",
    "1234567890 3.14159 1,000,000 -42 0x1F", "٣٤٥ １２３ ²³ Ⅻ", "héllo wörld ñandú Ærøskøbing",
    "日本語のテキスト、中文，한국어", "🙂🙃 👩‍👩‍👧 🇫🇷", "a\u00a0b\u2009c\u3000d\u200be\u2028f\ufeffg",
    "def f(x):\n    return x ** 2  # square\n", "it's we've they're I'M YOU'LL", "<|bos|", "|>", "e\u0301 \u0627\u0644",
]


@pytest.fixture(scope="module")
def big_tokenizer(tmp_path_factory):
    """A tokenizer with thousands of merges (the demo run's has few), loaded by transformers."""
    tokenizer = Tokenizer.train(iter_texts(Corpus.embedded(), 300_000), 2048)
    folder = tmp_path_factory.mktemp("tok")
    ranks, specials = formats.tokenizer_ranks(tokenizer.enc)
    (folder / "tokenizer.json").write_text(json.dumps(formats.hf_tokenizer_json(ranks, specials,
                                                                                 tokenizer.enc._pat_str)))
    (folder / "tokenizer_config.json").write_text(json.dumps(formats.hf_tokenizer_config(256)))
    return tokenizer, transformers.AutoTokenizer.from_pretrained(folder)


def test_transformers_tokenizer_encodes_as_onecard(big_tokenizer, onecard_model, hf_tokenizer):
    texts = EDGE_TEXTS + [text for text, _ in zip(iter_texts(Corpus.embedded(), 600_000), range(60), strict=False)]
    for ours, theirs in (big_tokenizer, (onecard_model[1], hf_tokenizer)):
        for text in texts:
            ids = theirs(text, add_special_tokens=False)["input_ids"]
            assert ids == ours.encode(text), repr(text[:80])
            assert theirs.decode(ids) == text
        assert theirs.convert_tokens_to_ids(SPECIAL_TOKENS) == [ours.special_id(name) for name in SPECIAL_TOKENS]


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_transformers_tokenizer_encodes_any_text_as_onecard(big_tokenizer, text):
    assume(not any(name in text for name in SPECIAL_TOKENS))  # transformers reads those as special tokens
    ours, theirs = big_tokenizer
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


CONVERSATIONS = {
    "one-question": [{"role": "user", "content": "What is 2 + 2?"}],
    "system-merged": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    "calculator-parts": [{"role": "user", "content": "What is 123 * 45?"},
                         {"role": "assistant", "content": [
                             {"type": "text", "text": "Let me calculate: "}, {"type": "python", "text": "123 * 45"},
                             {"type": "python_output", "text": "5535"}, {"type": "text", "text": " So 5535."}]}],
    "unicode-and-whitespace": [{"role": "user", "content": "  héllo\n\n\tworld 12345  "},
                               {"role": "assistant", "content": "日本語 🙂\n\n- a\n- b  "},
                               {"role": "user", "content": "ok\r\n"}],
}


@pytest.mark.parametrize("generation_prompt", [True, False], ids=["prompt", "no-prompt"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_renders_as_onecard(onecard_model, hf_tokenizer, name, generation_prompt):
    _, tokenizer = onecard_model
    messages = CONVERSATIONS[name]
    out = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    ids = out if isinstance(out, list) else out["input_ids"]
    normalized = normalize(messages, training=False)  # a question alone renders too
    expected = prompt_ids(tokenizer, normalized) if generation_prompt else render(tokenizer, normalized).ids
    assert ids == expected


def test_chat_template_refuses_roles_out_of_order(hf_tokenizer):
    with pytest.raises(Exception, match="alternate"):
        hf_tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "tool", "content": "5"}, {"role": "user", "content": "?"}],
    [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be rude."}, {"role": "user", "content": "?"}],
    [{"role": "system", "content": "Be terse."}],
], ids=["tool-reply", "later-system", "system-alone"])
def test_chat_template_refuses_what_onecard_refuses(hf_tokenizer, messages):
    """Only the user's turns were checked: a tool's or a later system message was rendered as the
    model's own reply, and a system message alone was dropped, where onecard refuses all three."""
    from onecard.conversations import BadConversation

    with pytest.raises(BadConversation):
        normalize(messages, training=False)
    with pytest.raises(Exception, match="alternate|followed by a user"):
        hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------- transformers -> onecard

def _transformers_made_tokenizer(tokenizer: Tokenizer, folder, monkeypatch):
    """The tokenizer as transformers' own converter (TikTokenConverter) makes it, saved by transformers."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local file, cache nothing
    ranks, specials = formats.tokenizer_ranks(tokenizer.enc)
    bpe = folder / "ranks.tiktoken"
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()]
    bpe.write_text("".join(lines))  # tiktoken's .tiktoken format
    converted = TikTokenConverter(vocab_file=str(bpe), pattern=tokenizer.enc._pat_str,
                                  extra_special_tokens=sorted(specials, key=specials.get)).converted()
    bpe.unlink()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|bos|>",
                                                eos_token="<|assistant_end|>")


def test_transformers_saved_model_imports_into_onecard(onecard_model, tmp_path, monkeypatch):
    _, tokenizer = onecard_model
    config = transformers.NanoChatConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32)  # transformers' defaults otherwise
    torch.manual_seed(3)
    theirs = transformers.NanoChatForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path)
    _transformers_made_tokenizer(tokenizer, tmp_path, monkeypatch).save_pretrained(tmp_path)
    ours, imported, info = load_weights(tmp_path)
    assert info["layout"] == "transformers" and ours.config.n_kv_head == 2
    idx = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    # transformers' default rms_norm_eps is 1e-6 where onecard adds float32's 1.2e-7: five norms a layer
    # move these logits by up to ~6e-5 (measured). With transformers' norms given onecard's epsilon
    # the two sides are the same float32 arithmetic again, so that is all the difference there is.
    torch.testing.assert_close(logits_of(fp32_rotary(ours), idx), logits_of(theirs, idx), rtol=0, atol=1e-3)
    torch.testing.assert_close(logits_of(ours, idx), logits_of(theirs, idx), rtol=0, atol=BF16_TABLE_ATOL)
    for module in theirs.modules():
        if hasattr(module, "eps"):
            module.eps = formats.FLOAT32_EPS
    torch.testing.assert_close(logits_of(fp32_rotary(ours), idx), logits_of(theirs, idx), rtol=0, atol=FP32_ATOL)
    for text in EDGE_TEXTS:
        assert imported.encode(text) == tokenizer.encode(text)
    assert [imported.special_id(n) for n in SPECIAL_TOKENS] == [tokenizer.special_id(n) for n in SPECIAL_TOKENS]
    sharded = tmp_path / "sharded"  # a large model comes in shards, named by model.safetensors.index.json
    theirs.save_pretrained(sharded, max_shard_size="100KB")
    (sharded / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and not (sharded / "model.safetensors").exists()
    torch.testing.assert_close(logits_of(load_weights(sharded)[0], idx), logits_of(ours, idx), rtol=0, atol=0)


def test_commands_read_a_transformers_folder(hf_dir, run_dir, tmp_path, capsys):
    sample = ["--prompt", "def ", "--temperature", "0", "--max-tokens", "12", "--device", "cpu"]
    assert main(["sample", "--run-dir", str(run_dir), *sample]) == 0
    from_run = capsys.readouterr().out
    assert main(["sample", str(hf_dir), *sample]) == 0  # the directory as an argument, as other commands take it
    assert capsys.readouterr().out == from_run
    assert main(["chat", str(hf_dir), "-p", "hello", "--temperature", "0", "--max-tokens", "4",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["train", "--init-from", str(hf_dir), "--run-dir", str(tmp_path / "more"), "--device", "cpu",
                 "--micro-batch", "2", "--total-batch", "128", "--eval-every", "0", "--eval-batches", "1",
                 "--steps", "1"]) == 0
    assert (tmp_path / "more" / "model.safetensors").exists()


# ---------------------------------------------------------------- onecard -> nanochat, read by nanochat

def test_nanochat_loader_reads_the_export(run_dir, onecard_model, tmp_path, monkeypatch):
    checkpoint_manager = nanochat("fae3aca", "checkpoint_manager")
    model, tokenizer = onecard_model
    gqa = random_model(GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                                 n_embd=64))
    assert main(["export", str(run_dir), "--to", "nanochat", str(tmp_path / "base")]) == 0
    write_nanochat(tmp_path / "gqa", gqa, tokenizer, "fp32", "sft", 7, {"path": "test", "layout": "onecard"})
    idx = torch.randint(0, tokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(4))
    for base, phase, ours in ((tmp_path / "base", "base", model), (tmp_path / "gqa", "sft", gqa)):
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
        theirs, their_tokenizer, meta = checkpoint_manager.load_model(phase, "cpu", phase="eval")
        assert meta["model_config"] == ours.config.to_dict()
        torch.testing.assert_close(logits_of(theirs, idx), logits_of(ours, idx), rtol=0, atol=0)  # same bf16 tables
        text = "Hello wörld 12345\n\n  def f(): pass"
        assert their_tokenizer.encode(text) == tokenizer.encode(text)
        assert their_tokenizer.get_bos_token_id() == tokenizer.bos_id


def test_a_nanochat_export_is_named_by_the_step_its_weights_are_from(run_dir, tmp_path, capsys):
    """nanochat loads the highest model_NNNNNN.pt: a file named by the planned horizon would win wrongly."""
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    config = json.loads((run / "config.json").read_text())
    assert config["results"]["steps"] == step == 2
    config["train"]["steps"], config["results"] = 400, None  # resumed for 400 steps, stopped before they ended
    (run / "config.json").write_text(json.dumps(config))
    for source, out in ((run, "from-run"), (checkpoint, "from-checkpoint")):
        assert main(["export", str(source), "--to", "nanochat", str(tmp_path / out), "--tokenizer",
                     str(run / "tokenizer")]) == 0
        assert [p.name for p in (tmp_path / out / "base_checkpoints" / "d1").glob("model_*")] == ["model_000002.pt"]
    save_file(load_file(run / "model.safetensors"), run / "model.safetensors")  # as written before the step was kept
    capsys.readouterr()
    assert main(["export", str(run), "--to", "nanochat", str(tmp_path / "old")]) == 2
    assert "export one of its checkpoints" in capsys.readouterr().err


def test_eval_of_a_base_model_trained_elsewhere_asks_for_a_corpus_or_the_bundle(run_dir, tmp_path, capsys,
                                                                                monkeypatch):
    """A nanochat base checkpoint knows no training corpus: bits per byte, its default, failed after the
    model had loaded; now the defaults leave it out, and with no CORE bundle either, the user is told."""
    out = tmp_path / "cache" / "nanochat"
    assert main(["export", str(run_dir), "--to", "nanochat", str(out)]) == 0
    monkeypatch.chdir(tmp_path)  # no data/eval_bundle here
    capsys.readouterr()
    assert main(["eval", str(out / "base_checkpoints" / "d1"), "--device", "cpu"]) == 2
    assert "no known training corpus: give --data" in capsys.readouterr().err


def test_nanochat_2026_model_exports_to_nanochat_not_to_transformers(onecard_model, tmp_path, monkeypatch):
    """transformers' nanochat is the classic; nanochat's own code from 92d63d4 reads the 2026 family."""
    _, tokenizer = onecard_model
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1,
                       n_embd=128, arch="nanochat-2026")
    torch.manual_seed(5)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # its init zeroes some matrices and sets the scalars to 0 or 1
    with pytest.raises(UsageError, match="arch"):
        write_hf(tmp_path / "hf", model, tokenizer, "fp32")
    assert not (tmp_path / "hf").exists()
    checkpoint_manager = nanochat("92d63d4", "checkpoint_manager")
    write_nanochat(tmp_path / "nc", model, tokenizer, "fp32", "base", 3, {"path": "test", "layout": "onecard"})
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    theirs, _, meta = checkpoint_manager.load_model("base", torch.device("cpu"), phase="eval")
    assert meta["model_config"]["window_pattern"] == config.window_pattern and "arch" not in meta["model_config"]
    idx = torch.randint(0, tokenizer.vocab_size, (2, 64), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(logits_of(theirs, idx), logits_of(model, idx), rtol=0, atol=0)


# ---------------------------------------------------------------- refusals

def test_export_refuses_a_folder_with_files_unless_forced(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--to", "hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not empty" in err and "--force" in err
    assert main(["export", str(run_dir), "--to", "hf", str(out), "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "model.safetensors").exists()
    assert main(["export", str(tmp_path), "--to", "hf", str(tmp_path / "x")]) == 2
    assert "not a model" in capsys.readouterr().err
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").mkdir()  # what cannot be replaced is named, not its folder
    assert main(["export", str(run_dir), "--to", "hf", str(out), "--force"]) == 2
    assert f"cannot write {out / 'model.safetensors'}: Is a directory" in capsys.readouterr().err


def test_phase_with_the_transformers_format_is_refused_not_ignored(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", "hf", str(out), "--phase", "sft"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--phase sft is for --to nanochat" in err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("field, value", [
    ("tie_word_embeddings", True), ("attention_bias", True), ("hidden_act", "gelu"),
    ("final_logit_softcapping", 30.0), ("intermediate_size", 100), ("rms_norm_eps", 1e-3),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 500000.0}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), ("model_type", "llama"),
])
def test_import_names_the_field_onecard_cannot_express(hf_dir, tmp_path, field, value):
    for file in hf_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    name = "rope_type" if field == "rope_parameters" and value["rope_type"] != "default" else field
    name = "rope_theta" if field == "rope_parameters" and name == field else name
    with pytest.raises(UsageError, match=name):
        load_weights(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"normalizer": {"type": "NFC"}}, "normalizes"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}},
     "pre-tokenizers"),
    ({"added_tokens": []}, "special tokens"),
])
def test_import_refuses_a_tokenizer_that_would_encode_otherwise(hf_dir, tmp_path, change, message):
    for file in hf_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    data = json.loads((hf_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**data, **change}))
    with pytest.raises(UsageError, match=message):
        load_weights(tmp_path)


def test_import_refuses_pickled_weights_without_opening_them(hf_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(UsageError, match="pytorch_model.bin"):
        load_weights(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("to, fails, error", [
    ("hf", "safetensors", "Error while serializing: I/O error: No space left on device (os error 28)"),
    ("hf", "safetensors", "Error while serializing: I/O error: Permission denied (os error 13) at path \"x\""),
    ("nanochat", "torch", "[enforce fail at inline_container.cc:672] . unexpected pos 3072 vs 2966"),
], ids=["hf-full-disk", "hf-read-only", "nanochat-full-disk"])
def test_a_write_that_fails_is_one_line_and_leaves_no_temporary(run_dir, tmp_path, capsys, monkeypatch, to, fails,
                                                                error):
    """A full disk or a read-only folder: safetensors and torch.save raise their own errors, which came out
    as a traceback with exit code 1, leaving the temporary file on the full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    def refuse(*_args, **_kwargs):
        raise SafetensorError(error) if fails == "safetensors" else RuntimeError(error)
    if fails == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    else:
        save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: refuse() if isinstance(obj, dict) else save(obj, f))
    assert main(["export", str(run_dir), "--to", to, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"onecard: error: cannot write {tmp_path / 'out'}")
    assert "os error" in error or "unexpected pos" in err
    assert not list((tmp_path / "out").rglob("*.tmp"))


@pytest.mark.parametrize("to", ["hf", "nanochat"])
def test_an_export_cut_short_is_not_taken_for_a_whole_model(run_dir, tmp_path, monkeypatch, to):
    """Cut before its last file, an export was a folder that onecard and transformers both loaded: the
    transformers one with no chat template, bos or eos; the nanochat one with no token_bytes.pt."""
    def cut(*_args, **_kwargs):
        raise KeyboardInterrupt
    if to == "hf":
        monkeypatch.setattr(formats, "hf_tokenizer_config", cut)
    else:
        monkeypatch.setattr(Tokenizer, "token_bytes", cut)
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--to", to, str(out)]) == 130
    if to == "nanochat":  # both loaders need meta_<step>.json beside the weights
        assert not list(out.rglob("meta_*.json"))
        return
    with pytest.raises(UsageError):
        load_weights(out)
    with pytest.raises(ValueError):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_force_does_not_hide_the_export_behind_another_step_or_tokenizer(run_dir, tmp_path, capsys):
    """nanochat loads a folder's highest step: --force over an export of step 30 wrote step 2 beside it, and
    nanochat and onecard loaded step 30 with the new run's tokenizer, which it does not belong to."""
    out = tmp_path / "nc"
    assert main(["export", str(run_dir), "--to", "nanochat", str(out)]) == 0
    folder = out / "base_checkpoints" / "d1"
    for name in ("model", "meta"):  # as an export of a longer run left them
        (folder / f"{name}_000002.{'pt' if name == 'model' else 'json'}").rename(
            folder / f"{name}_000030.{'pt' if name == 'model' else 'json'}")
    capsys.readouterr()
    assert main(["export", str(run_dir), "--to", "nanochat", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model_000030.pt, which nanochat would load instead" in err
    other = Tokenizer.train(iter_texts(Corpus.embedded(), 60_000), 300)  # the run's is from its first 20,000
    other.save(out / "tokenizer")
    assert main(["export", str(run_dir), "--to", "nanochat", str(out), "--force", "--phase", "sft"]) == 2
    assert "is another tokenizer, which base_checkpoints/d1/model_000030.pt reads" in capsys.readouterr().err
    assert not (out / "chatsft_checkpoints").exists() and Tokenizer.load(out / "tokenizer").enc.name == other.enc.name


def test_force_does_not_write_over_the_run_that_holds_the_source(run_dir, tmp_path, capsys):
    """OUT_DIR the run of the checkpoint exported: --force replaced the run's own config.json and weights."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = (run / "model.safetensors").read_bytes()
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert main(["export", str(checkpoint), "--to", "hf", str(run), "--force"]) == 2
    assert "holds the model being exported" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before and "model_type" not in (run / "config.json").read_text()


def test_import_refuses_a_config_its_weights_do_not_fill_before_building_it(hf_dir, tmp_path):
    for file in hf_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3  # damaged; 100_000 took hours of building before the weights said no
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="do not belong together"):
        load_weights(tmp_path)


def test_a_nanochat_base_directory_is_pointed_to_its_checkpoints(run_dir, tmp_path):
    """The export says NANOCHAT_BASE_DIR=OUT_DIR; given to onecard, that folder was 'not a model'."""
    assert main(["export", str(run_dir), "--to", "nanochat", str(tmp_path / "nc")]) == 0
    with pytest.raises(UsageError, match="give one of its checkpoint folders, .*base_checkpoints/d1"):
        load_weights(tmp_path / "nc")


def test_force_adds_a_later_step_beside_an_earlier_one_and_drops_the_replaced_scores(run_dir, tmp_path):
    """nanochat keeps a run's steps in one folder and loads the highest: a later export may join them.
    eval.json there scored the model replaced, and goes."""
    out = tmp_path / "nc"
    assert main(["export", str(run_dir), "--to", "nanochat", str(out)]) == 0
    folder = out / "base_checkpoints" / "d1"
    for name in ("model_000002.pt", "meta_000002.json"):
        (folder / name).rename(folder / name.replace("000002", "000001"))
    (folder / "eval.json").write_text('{"tasks": {"arc-easy": {"accuracy": 0.9}}}')  # step 1's scores
    assert main(["export", str(run_dir), "--to", "nanochat", str(out), "--force"]) == 0
    assert load_weights(folder)[2]["step"] == 2
    assert not (folder / "eval.json").exists()  # the next eval would have merged step 1's scores with step 2's
    hf = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", "hf", str(hf)]) == 0
    (hf / "eval.json").write_text('{"tasks": {}}')
    assert main(["export", str(run_dir), "--to", "hf", str(hf), "--force"]) == 0
    assert not (hf / "eval.json").exists()


def test_nanochat_meta_reads_under_any_locale_from_a_non_ascii_path(run_dir, tmp_path):
    """nanochat (fae3aca) opens meta_*.json without an encoding, in the locale's: exported from a run
    under a non-ASCII path, the meta held that path in UTF-8 and nanochat's loader failed under an
    ASCII locale (UnicodeDecodeError) or read it garbled under another. json's own escapes keep it ASCII."""
    import shutil

    run = tmp_path / "rün 模型"
    shutil.copytree(run_dir, run)
    assert main(["export", str(run), "--to", "nanochat", str(tmp_path / "nc")]) == 0
    meta = next((tmp_path / "nc" / "base_checkpoints" / "d1").glob("meta_*.json"))
    assert json.loads(meta.read_bytes().decode("ascii"))["onecard"]["exported_from"] == str(run)


def test_the_nanochat_hint_is_a_shell_word_nanochat_finds_from_its_own_folder(run_dir, tmp_path, capsys, monkeypatch):
    """The closing line said NANOCHAT_BASE_DIR=OUT_DIR as given: a path with a space split into two
    words in a shell, and a relative one pointed nanochat's scripts, run from their checkout, elsewhere."""
    import shlex

    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run_dir), "--to", "nanochat", "my models/nc"]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    words = shlex.split(hint.partition("use it with nanochat: ")[2])
    assert words[0] == f"NANOCHAT_BASE_DIR={tmp_path / 'my models' / 'nc'}"
