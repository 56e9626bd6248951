"""A Recipe says how a training run spends memory and time.

The planner predicts each recipe's memory and speed; the trainer executes exactly the recipe it
is given. This module is the single definition both use. Byte layouts are stated here because
the memory model counts them and the trainer allocates them:

params        fp32      weights in fp32 on the GPU (wte in bf16 on CUDA, as nanochat keeps it)
              bf16_sr   weights in bf16 on the GPU, updates applied with stochastic rounding
              cpu_master bf16 weights on the GPU, the fp32 master copy on the CPU
grads         fp32 | bf16   accumulated across micro-batches on the GPU in that dtype
              cpu       each micro-batch's gradient is added into an fp32 buffer on the CPU
optim_states  fp32 | bf16   Muon momentum and AdamW moments in that dtype
              int8      block-wise quantized: 1 byte per element plus one fp32 scale per block
                        of INT8_BLOCK elements (the last block may be short); blocks are cut per
                        tensor; codes (linear for Muon, log for AdamW's moments) in lowbit.py
optim_place   gpu | cpu     where the optimizer states live (cpu: the update runs on the CPU;
                            Muon's Newton-Schulz still runs on the GPU, one matrix at a time)
activations   keep      autograd keeps everything it saves
              selective each block's MLP (with its norm) is recomputed in backward; attention kept
              full      each block is recomputed in backward; only block inputs are kept
              offload   the trunk's saved tensors (not parameters, which stay) go to pinned CPU
                        memory and come back for backward
loss          full      logits (B·T, V) materialized in fp32
              chunked   head + soft-cap + cross-entropy over LOSS_CHUNK_ROWS rows at a time,
                        each chunk recomputed in backward: full logits never exist
              fused     a fused linear + cross-entropy kernel (CUDA only, optional library)
matmul        bf16 | fp8    precision of the block linears' matrix multiplies (fp8: sm_89+)
compile       torch.compile: of the whole model, or, where the recipe's memory rests on hooks in
              backward (grads=cpu folds each gradient away as it appears, activations=offload
              moves saved tensors out), of each block in place: a whole compiled model's backward
              is one step that hands over every gradient at once, a block's only its own

With several cards (torchrun), each parameter is updated by one rank, its owner, which alone
holds its optimizer states (and its fp32 master copy): the states are sharded across the ranks,
whole tensors each, so Muon orthogonalizes whole matrices. shard_owners decides the owners for
the trainer and the planner alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from onecard.errors import UsageError

INT8_BLOCK = 256  # elements per quantization block of 8-bit optimizer states
LOSS_CHUNK_ROWS = 1024  # rows of (B·T) per chunk of the chunked loss

CHOICES: dict[str, tuple[str, ...]] = {
    "params": ("fp32", "bf16_sr", "cpu_master"),
    "grads": ("fp32", "bf16", "cpu"),
    "optim_states": ("fp32", "bf16", "int8"),
    "optim_place": ("gpu", "cpu"),
    "activations": ("keep", "selective", "full", "offload"),
    "loss": ("full", "chunked", "fused"),
    "matmul": ("bf16", "fp8"),
}


@dataclass(frozen=True)
class Recipe:
    name: str = "baseline"
    params: str = "fp32"
    grads: str = "fp32"
    optim_states: str = "fp32"
    optim_place: str = "gpu"
    activations: str = "keep"
    loss: str = "full"
    matmul: str = "bf16"
    micro_batch: int = 8
    seq_len: int = 2048
    compile: bool = False

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise UsageError(f"recipe {key}={value!r} is not one of {', '.join(allowed)}")
        if self.micro_batch <= 0 or self.seq_len <= 0:
            raise UsageError(f"recipe micro_batch and seq_len must be positive, got "
                             f"{self.micro_batch} and {self.seq_len}")
        if self.params == "cpu_master" and self.optim_place != "cpu":
            raise UsageError("params=cpu_master keeps the master weights on the CPU: it needs optim_place=cpu")
        if self.grads == "cpu" and self.optim_place != "cpu":
            raise UsageError("grads=cpu needs optim_place=cpu (the update runs where the gradients are)")

    @property
    def backward_hooks(self) -> bool:
        """Whether the memory rests on hooks in backward: a compiled run compiles block by block."""
        return self.grads == "cpu" or self.activations == "offload"

    @property
    def compiles_per_block(self) -> bool:
        """Compiled block by block (see the module docstring), not as one model."""
        return self.compile and self.backward_hooks

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def with_(self, **changes) -> Recipe:
        return replace(self, **changes)

    def overridden(self, **changes) -> Recipe:
        """The recipe with some memory/time choices changed, named for them: lean+loss=full."""
        if not changes:
            return self
        return replace(self, **changes, name="+".join([self.name, *(f"{k}={v}" for k, v in changes.items())]))


# Named recipes, from the plain nanochat way to the leanest. micro_batch and seq_len are the
# run's to set; these name the memory/time choices.
NAMED: dict[str, Recipe] = {r.name: r for r in [
    Recipe(name="baseline"),
    Recipe(name="recompute", activations="full", loss="chunked"),
    Recipe(name="bf16", params="bf16_sr", grads="bf16", optim_states="bf16",
           activations="selective", loss="chunked"),
    Recipe(name="lean", params="bf16_sr", grads="bf16", optim_states="int8",
           activations="full", loss="chunked"),
    # torch.compile fuses fp8's casts and scalings; eager fp8 measured slower than bf16 (assumptions.py)
    Recipe(name="lean-fp8", params="bf16_sr", grads="bf16", optim_states="int8",
           activations="full", loss="chunked", matmul="fp8", compile=True),
    # bf16 weights and gradients stay on the card, summed there across micro-batches; the fp32
    # master and the optimizer states live in CPU RAM: one transfer per step each way
    Recipe(name="offload-states", params="cpu_master", grads="bf16", optim_states="fp32", optim_place="cpu",
           activations="full", loss="chunked"),
    Recipe(name="offload", params="cpu_master", grads="cpu", optim_states="fp32", optim_place="cpu",
           activations="full", loss="chunked"),
    Recipe(name="offload-max", params="cpu_master", grads="cpu", optim_states="int8", optim_place="cpu",
           activations="offload", loss="chunked"),
]}


def state_elements(numel: int, matrix: bool) -> int:
    """A parameter's optimizer-state elements, what shard_owners balances: Muon keeps one per
    element of a block matrix, AdamW two (its moments) for every other parameter."""
    return numel if matrix else 2 * numel


def shard_owners(costs: list[int], ranks: int) -> list[int]:
    """The rank that updates each parameter, given each one's cost (its optimizer-state elements):
    largest first, each to the rank holding least so far (the lowest such rank). Parameters of
    equal cost are interchangeable, so the ranks' loads depend only on the costs, not their order."""
    loads, owner = [0] * ranks, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = loads.index(min(loads))
        owner[i], loads[rank] = rank, loads[rank] + costs[i]
    return owner


def default_micro_batch(rows: float, most: int) -> int:
    """A micro-batch where no card is planned for: `most` sequences, or the most that divide `rows`
    (a step's sequences on each rank), so that a batch the user chose is a whole number of them."""
    if rows != int(rows) or rows < 1:
        return most  # no micro-batch divides it: the batch check says so in one line
    return max(m for m in range(1, most + 1) if int(rows) % m == 0)


def named_recipe(name: str, **overrides) -> Recipe:
    key = name.strip().lower()
    if key not in NAMED:
        raise UsageError(f"unknown recipe {name!r}: known recipes are {', '.join(NAMED)}")
    return NAMED[key].with_(**overrides)
