"""Whether a model directory holds a base or a chat model comes from what it says itself (an onecard
run's stage, a transformers export's recorded phase, the folder nanochat keeps a phase in), never
from words that happen to be in its path."""

import json

import pytest

from onecard.errors import UsageError
from onecard.evaluate import is_chat_model
from onecard.run import model_phase


@pytest.mark.parametrize("folder, phase", [
    ("home/.cache/nanochat/base_checkpoints/d4", "base"),  # "chat" in "nanochat": still a base model
    ("data/database/chatsft_checkpoints/d20", "sft"),  # "base" in "database": still a chat model
    ("x/mid_checkpoints/d20", "mid"),
    ("x/chatrl_checkpoints/d20", "rl"),
    ("my-chat-model-sft", None),  # says nothing about itself
])
def test_nanochat_folders_say_their_phase(tmp_path, folder, phase):
    (tmp_path / folder).mkdir(parents=True)
    assert model_phase(tmp_path / folder) == phase


@pytest.mark.parametrize("config, phase", [({"model_type": "nanochat", "onecard_phase": "sft"}, "sft"),
                                           ({"model_type": "nanochat", "onecard_phase": "base"}, "base"),
                                           ({"model_type": "nanochat"}, None), ("not json", None)])
def test_a_transformers_folder_says_the_phase_it_was_exported_from(tmp_path, config, phase):
    folder = tmp_path / "base_and_chat_words_in_the_name"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert model_phase(folder) == phase


def test_eval_asks_for_tasks_when_a_model_does_not_say_what_it_is(tmp_path):
    (tmp_path / "nanochat/base_checkpoints/d4").mkdir(parents=True)
    assert not is_chat_model({"path": str(tmp_path / "nanochat/base_checkpoints/d4")})
    (tmp_path / "chat-model").mkdir()
    with pytest.raises(UsageError, match="--task"):
        is_chat_model({"path": str(tmp_path / "chat-model")})
