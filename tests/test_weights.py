"""Loading a checkpoint directory that the test writes in nanochat's own layout."""

import json
import pickle

import pytest
import tiktoken
import torch

from onecard.errors import UsageError
from onecard.model import GPTConfig, build_model
from onecard.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN
from onecard.weights import load_weights


def write_nanochat_dir(root, config, steps=(2, 5)):
    """base_checkpoints/d2/{model,optim,meta}_{step:06d}.* and tokenizer/tokenizer.pkl, as nanochat writes."""
    ckpt = root / "base_checkpoints" / "d2"
    ckpt.mkdir(parents=True)
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding(name="nanochat", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})
    (root / "tokenizer").mkdir()
    with open(root / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    models = {}
    for step in steps:
        torch.manual_seed(step)
        model = build_model(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # as saved from a compiled model
        state["_orig_mod.transformer.wte.weight"] = state["_orig_mod.transformer.wte.weight"].bfloat16()
        torch.save(state, ckpt / f"model_{step:06d}.pt")
        torch.save([{}], ckpt / f"optim_{step:06d}.pt")
        meta = {"step": step, "model_config": config.to_dict(), "user_config": {}}
        (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(meta))
        models[step] = model
    return ckpt, models


def test_loads_newest_nanochat_checkpoint(tmp_path):
    config = GPTConfig(sequence_len=32, vocab_size=256 + len(SPECIAL_TOKENS), n_layer=2, n_head=2, n_kv_head=1,
                       n_embd=64)
    ckpt, models = write_nanochat_dir(tmp_path, config)
    model, tokenizer, info = load_weights(ckpt)
    assert info["layout"] == "nanochat" and info["step"] == 5
    assert tokenizer.vocab_size == config.vocab_size and tokenizer.bos_id == 256
    original = models[5]
    with torch.no_grad():  # nanochat stored wte in bf16: compare against the same rounding
        original.transformer.wte.weight.copy_(original.transformer.wte.weight.bfloat16().float())
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(idx), original(idx), rtol=0, atol=0)
    assert tokenizer.decode(tokenizer.encode("héllo wörld")) == "héllo wörld"


def test_refuses_a_model_file_that_would_run_code(tmp_path):
    config = GPTConfig(sequence_len=32, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    ckpt, _ = write_nanochat_dir(tmp_path, config, steps=(1,))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    with open(ckpt / "model_000009.pt", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    (ckpt / "meta_000009.json").write_text(json.dumps({"model_config": config.to_dict()}))
    with pytest.raises(UsageError, match="plain weights") as refused:
        load_weights(ckpt)
    assert not marker.exists()
    # one line, with torch's reason and without its advice to turn weights_only off
    assert "\n" not in str(refused.value) and "weights_only` set to `False" not in str(refused.value)
    (ckpt / "model_000009.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="plain weights: EOFError$"):
        load_weights(ckpt)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(UsageError, match="neither"):
        load_weights(tmp_path)
    with pytest.raises(UsageError, match="not a directory"):
        load_weights(tmp_path / "missing")


@pytest.mark.parametrize("pattern", [5, ["S", "L"], {"S": 1}])
def test_a_window_pattern_that_is_not_text_is_refused_in_one_line(tmp_path, pattern):
    config = GPTConfig(sequence_len=32, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    ckpt, _ = write_nanochat_dir(tmp_path, config, steps=(1,))
    meta = json.loads((ckpt / "meta_000001.json").read_text())
    meta["model_config"]["window_pattern"] = pattern  # a damaged meta: it was an AttributeError's traceback
    (ckpt / "meta_000001.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="window_pattern .* must be letters S and L"):
        load_weights(ckpt)


def test_a_nanochat_between_the_two_architectures_is_named_not_a_key_dump(tmp_path):
    """A checkpoint with the later parameters but a meta without window_pattern (nanochat versions
    between the classic GPT and 92d63d4) was refused with torch's long unexpected-keys message."""
    config = GPTConfig(sequence_len=32, vocab_size=265, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    ckpt, models = write_nanochat_dir(tmp_path, config, steps=(1,))
    state = {"_orig_mod." + k: v for k, v in models[1].state_dict().items()}
    state["_orig_mod.resid_lambdas"] = torch.ones(1)
    torch.save(state, ckpt / "model_000001.pt")
    with pytest.raises(UsageError, match="later nanochat's parameters .* not the versions between them$") as refused:
        load_weights(ckpt)
    assert "Unexpected key" not in str(refused.value)
