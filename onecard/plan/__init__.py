"""The planner: will a model train on a card, how long does it take, what does it cost.

catalog.py      graphics cards, every figure with its vendor source
assumptions.py  every judgement call (MFU, fragmentation, CUDA context, PCIe...), overridable
memory.py       bytes per component of a training step, checked against the real tensors
timing.py       FLOPs, utilization, PCIe and optimizer time, energy
search.py       candidate recipes, the fastest that fits, the best model for a time budget
report.py       text, JSON and a picture
calibrate.py    `onecard bench`: measure the local card and remember it
cli.py          `onecard plan` and `onecard bench` arguments
"""
