"""``cbd-mlx generate`` and ``cbd-mlx server``: mlx-lm's own commands with the fast CPU setup."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import CBDError, translated
from .gguf import llama_cpp_generate
from .loader import check_model_files, is_hub_id


def _mlx_lm_passthrough(name: str):
    """`cbd-mlx generate|server ARGS`: mlx-lm's own command, started from this
    package so that on Linux MLX runs on OpenBLAS (mlx_lm.generate alone uses
    the wheel's slow reference BLAS: 44 vs 212 prompt tokens/s measured)."""

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []}, add_help_option=False,
                 help=f"mlx_lm.{name} with the fast CPU setup (OpenBLAS on Linux); every option passes through "
                      f"(`cbd-mlx {name} --help` shows mlx-lm's)"
                      + ("; a --model ending in .gguf runs in llama.cpp." if name == "generate" else "."))
    @click.pass_context
    def passthrough(ctx):
        import argparse
        import importlib
        from unittest import mock

        args = list(ctx.args)
        if name == "generate" and _gguf_model(args):
            return _generate_gguf(args)
        _check_model_arg(args)
        if name == "generate" and not any(a == "--model" or a.startswith("--model=") for a in args) \
                and not {"-h", "--help"} & set(args):
            raise CBDError("give --model DIR (an mlx-lm model directory, e.g. one `cbd-mlx init` wrote)")

        def usage_error(parser, message):  # mlx-lm's argparse errors: one line, like ours
            raise CBDError(f"{message} (see `cbd-mlx {name} --help`)")

        port = _option(args, "--port")
        if port is not None and not (port.isdigit() and int(port) <= 65535):
            raise CBDError(f"--port {port} is invalid: give a port number 0..65535")
        for opt in ("--max-tokens", "-m") if name == "generate" else ():
            n = _option(args, opt)
            if n is not None and n.lstrip("-").isdigit() and int(n) < 1:  # mlx-lm runs forever on -1
                raise CBDError(f"{opt} {n} is invalid: give a positive whole number")
        module = importlib.import_module(f"mlx_lm.{name}")
        sys.argv = [f"mlx_lm.{name}", *args]
        with mock.patch.object(argparse.ArgumentParser, "error", usage_error), translated(f"mlx_lm.{name}"):
            module.main()

    return passthrough


def _check_model_arg(args: list[str]) -> None:
    """A --model that is neither a model directory nor a hub id (a mistyped
    path, an adapter folder, a .gguf) gets one line that says what to do,
    before mlx-lm reports it as a network error."""

    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--model=") else args[i + 1] if a == "--model" and i + 1 < len(
            args) else None
        if value is None:
            continue
        p = Path(value).expanduser()
        if p.is_dir() and not (p / "config.json").is_file():
            hint = ("it holds adapters: pass the base model as --model and this folder as --adapter-path, or "
                    "`cbd-mlx finetune --fuse`" if (p / "adapters.safetensors").is_file()
                    else "it has no config.json (an mlx-lm model directory has one)")
            raise CBDError(f"--model {value}: {hint}")
        if p.is_dir():
            check_model_files(p)  # what mlx-lm reads unchecked: config fields, weights headers, tokenizer files
        if p.is_file() and p.suffix == ".gguf":
            raise CBDError(f"--model {value} is a GGUF file: run it with `cbd-mlx generate --model {value}` or "
                           f"llama.cpp, or convert it first (`cbd-mlx convert {value} --out DIR`)")
        if not p.exists() and not is_hub_id(value):
            raise CBDError(f"--model {value} does not exist (and is not a Hugging Face repo id); check the path")


def _option(args: list[str], name: str) -> str | None:
    """The value given to option ``name`` in ``args`` (the last one), None without one."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def _gguf_model(args: list[str]) -> str | None:
    """The --model of ``args`` when it names a .gguf file."""
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--model=") else args[i + 1] if a == "--model" and i + 1 < len(
            args) else None
        if value and value.endswith(".gguf"):
            return value
    return None


def _generate_gguf(args: list[str]) -> None:
    """`cbd-mlx generate --model X.gguf`: the same options as mlx-lm's
    generate (the ones that apply), run by llama.cpp."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, like every other error
            raise CBDError(f"{message} (see `cbd-mlx generate --help`)")

    ap = Parser(prog="cbd-mlx generate", add_help=False)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", "-p", default="hello")
    ap.add_argument("--max-tokens", "-m", type=int, default=100)
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--ignore-chat-template", action="store_true")
    opts, unknown = ap.parse_known_args(args)
    if unknown:
        raise CBDError(f"with a .gguf model, generate takes --prompt, --max-tokens, --temp, --top-p, --seed and "
                       f"--ignore-chat-template; not {' '.join(unknown)}")
    if not Path(opts.model).is_file():
        raise CBDError(f"--model {opts.model} does not exist; check the path")
    if opts.max_tokens < 1 or not (opts.temp >= 0) or not (0 < opts.top_p <= 1):
        raise CBDError("--max-tokens must be >= 1, --temp >= 0 and --top-p in (0, 1]")
    r = llama_cpp_generate(Path(opts.model), opts.prompt, opts.max_tokens, opts.temp, opts.top_p, opts.seed,
                           chat=not opts.ignore_chat_template)
    click.echo("==========")
    click.echo(r["text"])
    click.echo("==========")
    click.echo(f"Generation: {r['tokens']} tokens, {r['tokens_per_s']:.1f} tokens-per-sec (llama.cpp)")


generate_cmd = _mlx_lm_passthrough("generate")
server_cmd = _mlx_lm_passthrough("server")
