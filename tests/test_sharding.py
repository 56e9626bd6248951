"""Optimizer states sharded across data-parallel ranks: each parameter has one owner rank that alone
holds its states (and master copy). Checked here without a process group: the ranks' layouts,
built side by side, against one card's, and against the planner's count. tests/test_distributed.py
trains with them on two gloo ranks."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from onecard.distributed import World
from onecard.family import build_model, build_optimizer
from onecard.model_config import GPTConfig
from onecard.plan.persistent import persistent_bytes
from onecard.recipe import named_recipe, shard_owners

CLASSIC = GPTConfig(sequence_len=16, vocab_size=80, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
NANOCHAT_2026 = GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          arch="nanochat-2026")
RECIPES = ["baseline", "lean", "offload-states", "offload-max"]


@given(st.lists(st.integers(0, 10**6), max_size=40), st.integers(1, 8), st.randoms())
def test_owners_balance_and_depend_only_on_the_costs(costs, ranks, random):
    owners = shard_owners(costs, ranks)
    assert len(owners) == len(costs) and all(0 <= o < ranks for o in owners)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(ranks)]
    # greedy largest-first: no rank holds more than an even share plus one parameter
    assert max(loads) <= sum(costs) / ranks + max(costs, default=0)
    shuffled = list(costs)
    random.shuffle(shuffled)
    again = shard_owners(shuffled, ranks)
    assert [sum(c for c, o in zip(shuffled, again, strict=True) if o == r) for r in range(ranks)] == loads


def layouts(config: GPTConfig, recipe_name: str, ranks: int):
    torch.manual_seed(0)
    model = build_model(config)
    recipe = named_recipe(recipe_name, micro_batch=2, seq_len=16)
    one = build_optimizer(copy.deepcopy(model), recipe)
    each = [build_optimizer(copy.deepcopy(model), recipe, world=World(rank, ranks)) for rank in range(ranks)]
    return one, each


@pytest.mark.parametrize("config", [CLASSIC, NANOCHAT_2026], ids=["classic", "nanochat-2026"])
@pytest.mark.parametrize("recipe_name", RECIPES)
def test_the_ranks_hold_one_cards_states_between_them_and_the_planner_counts_the_busiest(config, recipe_name):
    one, each = layouts(config, recipe_name, 2)
    owned = [{i for i, slot in enumerate(opt.slots) if slot.owned} for opt in each]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(len(one.slots)))
    assert owned[0] and owned[1]
    whole = one.state_bytes()
    held = [opt.state_bytes() for opt in each]
    states = [h["optimizer"]["device"] + h["optimizer"]["cpu"] for h in held]
    masters = [h["weights"]["cpu"] for h in held]
    assert sum(states) == whole["optimizer"]["device"] + whole["optimizer"]["cpu"]
    assert sum(masters) == whole["weights"]["cpu"]
    for h in held:  # every rank keeps the whole model and its gradient buffers
        assert h["weights"]["device"] == whole["weights"]["device"] and h["grads"] == whole["grads"]
    busiest = max(range(2), key=lambda r: states[r] + masters[r])
    planned = persistent_bytes(config, one.recipe, "cpu", shards=2)
    assert planned.optimizer + planned.host_optimizer == states[busiest]
    assert planned.host_weights == masters[busiest]


@pytest.mark.parametrize("recipe_name", ["lean", "offload-states"])
def test_a_rank_loads_its_share_of_one_cards_checkpoint(recipe_name):
    """A checkpoint holds every state (gathered onto rank 0 with several ranks): a rank takes what it owns."""
    one, each = layouts(CLASSIC, recipe_name, 2)
    torch.manual_seed(1)
    for slot in one.slots:  # a step's worth of states on one card; the ranks' are still zero
        slot.param.grad = torch.randn_like(slot.param)
    one.accumulate()
    one.step()
    saved = one.state_dict()
    for rank in each:
        rank.load_state_dict(saved)
        for part_one, part_rank in zip(one.optimizers, rank.optimizers, strict=True):
            for p_one, p_rank in zip(part_one.params(), part_rank.params(), strict=True):
                if not part_rank.slots[p_rank].owned:
                    assert p_rank not in part_rank.stored
                    continue
                for key, value in part_one.state[p_one].items():
                    if isinstance(value, torch.Tensor):
                        torch.testing.assert_close(part_rank.state[p_rank][key], value, rtol=0, atol=0)


def test_a_parameters_stochastic_rounding_does_not_depend_on_which_rank_owns_it():
    """Each bf16_sr parameter rounds with its own generator: its update is bitwise the same on one
    card and on whichever rank owns it, and stepping leaves the global RNG, which every rank must
    keep equal (a checkpoint holds rank 0's), alone."""
    torch.manual_seed(0)
    one, each = layouts(CLASSIC, "lean", 2)
    for opt in [one, *each]:
        torch.manual_seed(1)
        for slot in opt.slots:
            slot.param.grad = torch.randn_like(slot.param)
        opt.accumulate()
        before = torch.get_rng_state()
        opt.step()
        assert torch.equal(torch.get_rng_state(), before)
    for i, slot in enumerate(one.slots):
        [owner] = [rank for rank in each if rank.slots[i].owned]
        assert torch.equal(owner.slots[i].param, slot.param)
