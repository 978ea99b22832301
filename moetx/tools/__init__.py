"""Tools over the whole system: `python -m moetx.tools.plan` plans a training step on paper
(memory per device, FLOPs, collective bytes, step time and MFU on a given accelerator) from the
same code a run uses. A command-line level package: it may import every other package, and
nothing imports it."""
