"""The defaults every command shares, in one place (docs/architecture.md and docs/time.md say
where each comes from)."""

TOTAL_BATCH = 524_288  # tokens per optimizer step: nanochat's base training
VOCAB_SIZE = 65_536  # nanochat's tokenizer: 2**16 tokens
SEQ_LEN = 2048  # nanochat's context
RATIO = 20  # training tokens per parameter (Chinchilla, as nanochat)
PRICE = 0.15  # per kWh: an example tariff, override with --price (docs/time.md#tariff)
CURRENCY = "USD"
EVAL_EVERY = 250
EVAL_BATCHES = 8
SAVE_EVERY_MIN = 30.0
KEEP = 3

# The embedded default: small enough to train in a few minutes on two CPU cores.
DEMO = dict(n_layer=4, n_embd=128, n_head=2, seq_len=128, vocab_size=2048, micro_batch=8,
            total_batch=4096, steps=300, eval_every=50, tokenizer_chars=3_000_000)


def is_demo_shape(config) -> bool:
    """A model of the demo's shape (a resumed demo is still the demo, not a d4 of width 256)."""
    return (config.n_layer, config.n_embd, config.n_head) == (DEMO["n_layer"], DEMO["n_embd"], DEMO["n_head"])


def model_name(config) -> str:
    """What a model is called in what onecard says: "d20", or "demo model" for the demo's shape."""
    return "demo model" if is_demo_shape(config) else f"d{config.n_layer}"
