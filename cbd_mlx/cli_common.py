"""Option types and helpers shared by the ``cbd-mlx`` commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .arch.shapes import MAX_DIMS
from .save import refuse_existing

# the generator to name in hints: mlx-lm's own on a Mac; elsewhere the same command started with
# OpenBLAS loaded (mlx_lm.generate alone runs on the wheel's reference BLAS: 29 vs 478 prompt tokens/s)
GENERATE = "mlx_lm.generate" if sys.platform == "darwin" else "cbd-mlx generate"

SHAPE_OPTIONS = ("layers", "hidden", "ffn", "heads", "kv_heads")
DTYPE_CHOICE = click.Choice(["float32", "bfloat16", "float16"])


class Finite(click.FloatRange):
    """A finite float in a range (click's FloatRange lets NaN through)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if v != v or v in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


class Alpha(click.ParamType):
    """--alpha: a number in [0, 1], 'auto' or 'distance'."""

    name = "ALPHA|auto|distance"

    def convert(self, value, param, ctx):
        if value is None or value in ("auto", "distance"):
            return value
        return Finite(0.0, 1.0).convert(value, param, ctx)


class LayerCount(click.ParamType):
    """--num-layers: -1 (all) or a positive count."""

    name = "N|-1"

    def convert(self, value, param, ctx):
        v = click.INT.convert(value, param, ctx)
        if v != -1 and v < 1:
            self.fail(f"{v} layers: give a positive count, or -1 for all layers", param, ctx)
        return v


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
SEQ_LEN = click.IntRange(min=2)
LR = Finite(0.0, 1.0, min_open=True)  # learning rates
WEIGHT = Finite(0.0)  # loss weights, weight decay
TEMPERATURE = Finite(0.0, min_open=True)
FRACTION = Finite(0.0, 1.0, max_open=True)


def shape_options(f):
    """--layers/--hidden/--ffn/--heads/--kv-heads: pin dimensions of the shape."""
    for name in reversed(SHAPE_OPTIONS):
        f = click.option(
            f"--{name.replace('_', '-')}", name, type=click.IntRange(min=1, max=MAX_DIMS[name]), default=None,
            help=f"Pin the target's {name.replace('_', ' ')} (the solver picks the rest).",
        )(f)
    return f


def say(msg: str) -> None:
    """A line on stderr, never glued to a progress bar: open bars are cleared first and drawn again after."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        click.echo(msg, err=True)


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing --out before any work is done."""
    refuse_existing(out, force)


def train_options(f=None, lr: float | None = 1e-3):
    """Options shared by distill / recover (``@train_options`` or ``@train_options(lr=...)``;
    lr None: the command picks it by the model's size)."""
    if f is None:
        return lambda g: train_options(g, lr)
    opts = [
        click.option("--tokens", type=POSITIVE, required=True, help="Training tokens (all processes together)."),
        click.option("--batch-size", type=POSITIVE, default=4, show_default=True),
        click.option("--seq-len", type=SEQ_LEN, default=256, show_default=True),
        click.option("--grad-accum", type=POSITIVE, default=1, show_default=True),
        click.option("--lr", type=LR, default=lr, show_default=lr is not None,
                     help=None if lr is not None else "[default: by the model's size: 1e-4 up to 80M parameters, "
                                                      "3e-5 from 135M, log-linear between (measured)]"),
        click.option("--weight-decay", type=WEIGHT, default=0.01, show_default=True),
        click.option("--eval-every", type=POSITIVE, default=50, show_default=True, help="Held-out loss every N steps."),
        click.option("--save-every", type=POSITIVE, default=50, show_default=True, help="Checkpoint every N steps."),
        click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f
