"""onecard's model in other people's formats: Hugging Face transformers' `nanochat` model type and
nanochat's own checkpoint layout. Plain data conversions (names, configs, tokenizer files); the
files are written by onecard/export.py and read by onecard/weights.py.

transformers' nanochat (transformers >= 5.0, models/nanochat) is the same network as onecard's
GPT: norm after the embedding, rotary (half-split) then parameter-free RMSNorm on queries and
keys, ReLU² MLP of width 4·n_embd, untied head, logits soft-capped at 15, no biases. Two numeric
differences, neither expressible in its config, both small (tests/test_export.py measures them):
  * onecard (as nanochat) keeps its rotary cos/sin tables in bf16; transformers computes them in
    the model's dtype (fp32 tables in an fp32 model, bf16 tables in a bf16 one).
  * RMSNorm's epsilon: onecard's F.rms_norm uses the input dtype's machine epsilon; transformers
    adds `rms_norm_eps` (default 1e-6). The export writes float32's epsilon, which is onecard's
    own value in fp32; an import accepts any epsilon up to MAX_RMS_NORM_EPS.
"""

from __future__ import annotations

import re
from pathlib import Path

from onecard.errors import UsageError
from onecard.model import LOGIT_SOFTCAP, ROTARY_BASE
from onecard.model_config import GPTConfig
from onecard.tokenizer import SPECIAL_TOKENS

HF_MODEL_TYPE = "nanochat"
HF_ARCHITECTURE = "NanoChatForCausalLM"
FLOAT32_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps: what F.rms_norm adds in fp32
MAX_RMS_NORM_EPS = 1e-5  # a larger epsilon changes the network: onecard's norm cannot add it
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

# ---------------------------------------------------------------- parameter names

_HF_LAYER = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
             "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_ONECARD_LAYER = {hf: ours for ours, hf in _HF_LAYER.items()}
_LAYER_KEY = re.compile(r"^(transformer\.h|model\.layers)\.(\d+)\.(.+)\.weight$")


def _rename(name: str, embed: tuple[str, str], prefixes: tuple[str, str], layer: dict[str, str],
            refusal: str) -> str:
    """A parameter name from one naming (embed[0], prefixes[0], layer's keys) to the other."""
    if name == embed[0]:
        return embed[1]
    if name == "lm_head.weight":
        return name
    found = _LAYER_KEY.match(name)
    if not found or found.group(1) != prefixes[0] or found.group(3) not in layer:
        raise UsageError(f"parameter {name!r} {refusal}")
    return f"{prefixes[1]}.{found.group(2)}.{layer[found.group(3)]}.weight"


def hf_name(name: str) -> str:
    """onecard (= nanochat) parameter name -> transformers' name."""
    return _rename(name, ("transformer.wte.weight", "model.embed_tokens.weight"), ("transformer.h", "model.layers"),
                   _HF_LAYER, "has no place in transformers' nanochat model")


def onecard_name(name: str) -> str:
    """transformers' nanochat parameter name -> onecard's."""
    return _rename(name, ("model.embed_tokens.weight", "transformer.wte.weight"), ("model.layers", "transformer.h"),
                   _ONECARD_LAYER, "of the transformers model has no place in onecard's model "
                   "(biases, norm weights and tied heads are not part of it)")


# ---------------------------------------------------------------- config.json

def hf_config(config: GPTConfig, specials: dict[str, int], dtype: str = "fp32") -> dict:
    """transformers' config.json for a model of this shape; UsageError for one it cannot express."""
    arch = getattr(config, "arch", "classic")
    if arch != "classic":
        raise UsageError(f"the model's arch is {arch!r}: transformers' nanochat model type is the classic "
                         "architecture (nanochat fae3aca) and cannot express it; export it --to nanochat instead")
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": FLOAT32_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(ROTARY_BASE)},
        "final_logit_softcapping": float(LOGIT_SOFTCAP),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": specials["<|bos|>"],
        "eos_token_id": specials["<|assistant_end|>"],
        "pad_token_id": specials["<|assistant_end|>"],
        "dtype": DTYPES[dtype],
    }


def _rope_theta(data: dict, where: str) -> object:
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UsageError(f"{where}: rope_parameters is not an object")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UsageError(f"{where}: rope_parameters.rope_type is {rope.get('rope_type', rope.get('type'))!r} "
                         "(scaled rotary); onecard's model has plain rotary only and cannot express it")
    return rope.get("rope_theta", data.get("rope_theta", ROTARY_BASE))


def gpt_config(data: object, where: str = "config.json") -> GPTConfig:
    """A transformers nanochat config.json -> GPTConfig, or UsageError naming the field onecard's
    model cannot express."""
    if not isinstance(data, dict) or data.get("model_type") != HF_MODEL_TYPE:
        raise UsageError(f"{where}: model_type is {data.get('model_type') if isinstance(data, dict) else None!r}, "
                         f"not {HF_MODEL_TYPE!r}: onecard reads transformers' nanochat models only")
    hidden, heads = data.get("hidden_size"), data.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        raise UsageError(f"{where}: hidden_size and num_attention_heads must be whole numbers")
    fixed = {  # field: (its value in this file, the value onecard's network has)
        "hidden_act": (data.get("hidden_act", "relu2"), "relu2"),
        "final_logit_softcapping": (data.get("final_logit_softcapping", LOGIT_SOFTCAP), LOGIT_SOFTCAP),
        "tie_word_embeddings": (data.get("tie_word_embeddings", False), False),
        "attention_bias": (data.get("attention_bias", False), False),
        "intermediate_size": (data.get("intermediate_size", 4 * hidden), 4 * hidden),
        "head_dim": (data.get("head_dim") or hidden // heads, hidden // heads),
        "rope_theta": (_rope_theta(data, where), ROTARY_BASE),
    }
    for field, (value, wanted) in fixed.items():
        if value != wanted:
            raise UsageError(f"{where}: {field} is {value!r}; onecard's model has {wanted!r} and cannot express it")
    eps = data.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not 0 <= eps <= MAX_RMS_NORM_EPS:
        raise UsageError(f"{where}: rms_norm_eps is {eps!r}; onecard's norm adds float32's epsilon and cannot "
                         f"express more than {MAX_RMS_NORM_EPS:g}")
    return GPTConfig(sequence_len=data.get("max_position_embeddings", 2048), vocab_size=data.get("vocab_size"),
                     n_layer=data.get("num_hidden_layers"), n_head=heads,
                     n_kv_head=data.get("num_key_value_heads") or heads, n_embd=hidden)


def generation_config(specials: dict[str, int]) -> dict:
    """Stop where onecard's engine stops: at <|assistant_end|> or a new document's <|bos|>."""
    return {"bos_token_id": specials["<|bos|>"],
            "eos_token_id": [specials["<|assistant_end|>"], specials["<|bos|>"]],
            "pad_token_id": specials["<|assistant_end|>"]}


# ---------------------------------------------------------------- the tokenizer, in `tokenizers` JSON

def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every pair (left, right) whose concatenation is a token, in the order tiktoken prefers them:
    by the rank of what they make (tiktoken merges the pair whose result has the lowest rank)."""
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort(key=lambda item: item[:3])
    return [(left, right) for *_, left, right in found]


def hf_tokenizer_json(ranks: dict[bytes, int], specials: dict[str, int], pattern: str) -> dict:
    """A `tokenizers` BPE tokenizer that encodes as tiktoken does with these ranks and pattern:
    the same split regex, byte-level pieces, a whole piece that is a token taken as it is
    (ignore_merges, as tiktoken does), otherwise the lowest-ranked merge first. Plain text gets a
    <|bos|> in front, as onecard's documents have."""
    alphabet = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    bos = "<|bos|>"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in sorted(specials.items(),
                                                                                       key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [specials[bos]], "tokens": [bos]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])},
                  "merges": [f"{text(left)} {text(right)}" for left, right in _merges(ranks)]},
    }


# The chat template: onecard.conversations.render as Jinja. A system message joins the first user
# message with a blank line; an assistant's content is text or a list of parts (text, python,
# python_output); roles must alternate, user first (a tool's or a later system message is refused, as onecard does).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- if system and not messages -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ... after an optional system message') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + (system if loop.first else '') + message['content'] + '<|user_end|>' -}}"
    "{%- elif message['content'] is string -%}"
    "{{- '<|assistant_start|>' + message['content'] + '<|assistant_end|>' -}}"
    "{%- else -%}{{- '<|assistant_start|>' -}}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def hf_tokenizer_config(sequence_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": sequence_len * 10,  # onecard's rotary tables reach 10x the training context
        "chat_template": CHAT_TEMPLATE,
    }


def read_hf_tokenizer(path: Path, data: dict) -> tuple[dict[bytes, int], dict[str, int], str]:
    """A `tokenizers` byte-level BPE tokenizer.json (as transformers writes for nanochat), parsed
    into `data` by the caller -> (tiktoken ranks, special tokens, split pattern). UsageError if
    tiktoken would encode otherwise; `path` names the file in messages."""
    try:
        pattern = _split_pattern(data)
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"its model is {model.get('type')}, not byte-level BPE")
        specials = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
        unicode_to_byte = {c: b for b, c in byte_to_unicode().items()}
        ranks = {bytes(unicode_to_byte[c] for c in token): int(i) for token, i in model["vocab"].items()
                 if token not in specials}  # some files list the added tokens in the vocabulary too
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"{path} is not a byte-level BPE tokenizer onecard can run ({error})") from None
    missing = [name for name in SPECIAL_TOKENS if name not in specials]
    if missing:
        raise UsageError(f"{path} lacks nanochat's special tokens {', '.join(missing)}")
    return ranks, specials, pattern


def _split_pattern(data: dict) -> str:
    """The split regex of a tokenizer that encodes as tiktoken does: no normalizer, one Split by a
    regex, then byte-level mapping without a regex or prefix space of its own. ValueError otherwise."""
    if data.get("normalizer"):
        raise ValueError("it normalizes text first (tiktoken does not)")
    pre = data["pre_tokenizer"]
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds != ["Split", "ByteLevel"] or "Regex" not in steps[0].get("pattern", {}):
        raise ValueError(f"its pre-tokenizers are {kinds}, not a regex Split then ByteLevel")
    if steps[1].get("use_regex") or steps[1].get("add_prefix_space"):
        raise ValueError("its ByteLevel step splits or adds a prefix space of its own")
    return steps[0]["pattern"]["Regex"]


def tokenizer_ranks(enc) -> tuple[dict[bytes, int], dict[str, int]]:
    """(mergeable ranks, special tokens) of a tiktoken Encoding, through its public methods."""
    specials = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
    special_ids = set(specials.values())
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special_ids}
    return ranks, specials

