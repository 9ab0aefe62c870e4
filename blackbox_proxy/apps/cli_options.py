"""The ``blackbox-proxy`` options that several commands share, each flag defined once.

- :func:`tuner_options` adds what builds a tuner (hosted API, small models) to generate, batch
  and serve; :func:`tuner_kwargs` picks those values out for the tuner's constructor.
- :func:`generation_options` adds the :class:`~blackbox_proxy.request.GenerationRequest`
  fields as flags, their defaults taken from the request object (generate and batch take all of
  them, serve and the harness commands a few with their own defaults);
  :func:`request_options` turns their values back into GenerationRequest keywords.
- :func:`load_serve_config` reads serve's ``--config FILE``.
- :func:`server_key_options` / :func:`server_key`: a server's own client key, from the
  environment, a file or (with a warning: it shows in ``ps``) the command line.

Left out: checking values. Click only parses types (and a range where a flag names one, e.g.
ports 1-65535); GenerationRequest and the tuner check the rest, so a flag, a batch line and an
HTTP body get the same messages. The commands themselves live in :mod:`blackbox_proxy.apps.cli`.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import _constants as C
from ..errors import ConfigurationError
from ..hosts.client import DIALECTS
from ..request import STRATEGIES, GenerationRequest
from ..types import MODES

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def setup_logging(verbose: int) -> None:
    """``-v``: INFO, ``-vv``: DEBUG, else warnings only, on stderr."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

# ----- the tuner ------------------------------------------------------------------------------
TUNER_KEYS = ("base_url", "api_key", "model", "mode", "expert", "expert_adapter", "anti_expert", "top_k",
              "hosted_tokenizer", "dialect", "device", "expert_render", "anti_expert_render", "cache", "timeout",
              "max_retries", "chat_template", "scorer_url", "stream_chunks")
_RENDERS = click.Choice(["auto", "chat", "raw"])


def tuner_options(fn: Any, *, hosted_key_flag: str = "--api-key") -> Any:
    """Options that build the tuner (values named as :data:`TUNER_KEYS`); serve spells the
    hosted key ``--hosted-api-key`` because its own ``--api-key`` guards the server."""
    options = [
        click.option("--base-url", envvar="OPENAI_BASE_URL",
                     help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 [env OPENAI_BASE_URL]"),
        click.option(hosted_key_flag, "api_key", envvar="OPENAI_API_KEY",
                     help="API key of the hosted API [env OPENAI_API_KEY, preferred: a flag shows in `ps`]; never logged"),
        click.option("--model", default=None, help="hosted model name (required except with --strategy white-box)"),
        click.option("--mode", type=click.Choice(MODES), default="completions",
                     show_default=True, help="how the API continues a partial answer (chat: it cannot; "
                     "it is asked by instruction to copy the answer so far and go on)"),
        click.option("--expert", default=None, help="expert: local HF model folder or name (the tuned small model)"),
        click.option("--expert-adapter", default=None, type=click.Path(exists=True, file_okay=False),
                     help="instead of --expert: a LoRA adapter folder applied over --anti-expert (one model in memory)"),
        click.option("--anti-expert", required=True, help="anti-expert: the same small model before tuning"),
        click.option("--top-k", type=click.IntRange(min=1), default=None,
                     help="candidates per position asked of the API [default: 20; 5 on OpenAI's /v1/completions]"),
        click.option("--hosted-tokenizer", default=None,
                     help="the hosted tokenizer (found by default through the host's tokenize route or tiktoken's model "
                          "table): tiktoken:o200k_base, an OpenAI model name, an HF tokenizer folder, or 'none' for "
                          "text prompts"),
        click.option("--dialect", type=click.Choice(list(DIALECTS)), default=None,
                     help="the hosted server's quirks: openai, vllm, llama.cpp, deepseek, mistral "
                          "(detected from /v1/models when left out)"),
        click.option("--expert-render", type=_RENDERS, default="auto", show_default=True,
                     help="expert prompt rendering: chat template or raw text; auto = as the hosted model sees it "
                          "(raw in completions mode, chat template in the chat modes)"),
        click.option("--anti-expert-render", type=_RENDERS, default="auto", show_default=True,
                     help="the same for the anti-expert (with --expert-adapter one choice applies to both)"),
        click.option("--chat-template", default=None, type=click.Path(dir_okay=False),
                     help="a Jinja chat template file for chat messages sent to a completions host (default: the "
                          "hosted tokenizer's, else the expert's)"),
        click.option("--scorer-url", envvar="BLACKBOX_PROXY_SCORER_URL", default=None,
                     help="a vLLM server that serves the small models; --expert and --anti-expert then name its "
                          "models (e.g. a LoRA module and its base) [env BLACKBOX_PROXY_SCORER_URL]"),
        click.option("--device", default=None, help="torch device for the small models (default: cuda, mps, else cpu)"),
        click.option("--cache", "cache", default=None, type=click.Path(dir_okay=False),
                     help="SQLite response cache: identical API requests are answered from it, not paid twice"),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=C.DEFAULT_TIMEOUT,
                     show_default=True, callback=_finite, help="seconds per API request"),
        click.option("--max-retries", type=click.IntRange(min=0), default=C.MAX_RETRIES, show_default=True,
                     help="retries of a failed API request (429/5xx/timeouts/connection errors)"),
        click.option("--stream-chunks/--no-stream-chunks", "stream_chunks", default=None,
                     help="speculative: stream each chunk call and close it at the first rejected draft [default: on "
                          "where the host streams logprobs (OpenAI, vLLM, this project's servers)]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _finite(_: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Click's FloatRange lets nan through (every comparison with it is false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value}", param=param)
    return value


def tuner_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """The tuner's constructor arguments among a command's values."""
    return {k: values[k] for k in TUNER_KEYS}


# ----- generation options: GenerationRequest's fields as flags --------------------------------
# Flag name = "--" + field name with dashes; default = the request object's, unless a command
# changes it. Listed in the order --help shows them.
GENERATION_OPTIONS: dict[str, dict[str, Any]] = {
    "alpha": dict(type=float, show_default=True, help="strength of the expert/anti-expert offset"),
    "max_tokens": dict(type=int, show_default=True),
    "temperature": dict(type=float, show_default=True, help="0 = greedy"),
    "top_p": dict(type=float, show_default=True),
    "seed": dict(type=int, help="seed for sampling"),
    "stop": dict(multiple=True, help="stop string (repeatable)"),
    "strategy": dict(
        type=click.Choice([*STRATEGIES, "white-box"]), show_default=True,
        help="auto: speculative where the host continues a prefix at temperature 0 or 1, else per-step (plain "
             "--mode chat: the answer so far is copied by instruction, greedy speculative, else per-step); "
             "per-step: one API call per token; speculative: API-drawn chunks accepted or resampled, a fraction "
             "of a call per token (greedy: exactly per-step's text); resample: whole answers reweighted; "
             "white-box: exact, base model local (--base)"),
    "chunk": dict(type=int, help="speculative: tokens per API call [default: adaptive, 4-32]"),
    "samples": dict(type=int, help="resample: whole answers drawn per prompt [default: 16]"),
    "tail_calls": dict(type=int, show_default=True,
                       help="speculative: most API calls per rejection that probe beyond the top-k (logit_bias; "
                            "0 = candidates only)"),
    "drafts": dict(type=int, help="speculative: most drafts per API call (n choices, verified as a tree) "
                                  "[default: greedy adaptive 1-4, sampling 1]"),
}


def generation_options(*names: str, **changes: dict[str, Any]) -> Decorator:
    """A decorator adding the generation options ``names`` (all of them when none are named);
    ``changes`` replace one flag's settings for this command, e.g.
    ``generation_options("max_tokens", max_tokens=dict(default=256))``.

    >>> command = click.command()(generation_options("max_tokens", "stop")(lambda **values: None))
    >>> [(p.name, p.default) for p in command.params]
    [('max_tokens', 64), ('stop', ())]
    """
    chosen = names or tuple(GENERATION_OPTIONS)
    wrong = sorted(set(chosen) - set(GENERATION_OPTIONS) | set(changes) - set(chosen))
    if wrong:  # a programming error, caught when the CLI module is imported
        raise ValueError(f"not generation options of this command: {wrong}")

    def decorate(fn: Any) -> Any:
        for name in reversed(chosen):
            default = GenerationRequest.model_fields[name].default
            settings = {"default": default, **GENERATION_OPTIONS[name], **changes.get(name, {})}
            fn = click.option("--" + name.replace("_", "-"), name, **settings)(fn)
        return fn

    return decorate


def request_options(values: dict[str, Any]) -> dict[str, Any]:
    """The generation options among a command's values, as :class:`GenerationRequest` keywords
    (an option left out is None: the request's default).

    >>> request_options({"max_tokens": 8, "stop": (), "verbose": 0})
    {'max_tokens': 8, 'stop': None}
    """
    options = {name: values[name] for name in GENERATION_OPTIONS if name in values}
    if "stop" in options:
        options["stop"] = list(options["stop"]) or None
    return options


# ----- serve --config FILE ----------------------------------------------------------------------
_NOT_IN_CONFIG = ("api_key", "server_api_key", "verbose")  # keys stay in the environment


def load_serve_config(ctx: click.Context, _: Any, path: str | None) -> str | None:
    """``--config FILE``: TOML whose keys are the option names; flags given on the command line win.
    Keys are read at the top level or under a ``[serve]`` table; secrets stay in the environment."""
    if not path:
        return path
    import tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML ({exc})") from None
    data = data.get("serve", data)
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "api_key" in values or "hosted_api_key" in values:
        raise click.BadParameter(f"{path} holds an API key; keep keys in the environment "
                                 "(OPENAI_API_KEY, BLACKBOX_PROXY_SERVER_KEY), not in files")
    # every option of the command can be set, so a new flag needs no second list
    known = [p.name for p in ctx.command.params if p.expose_value and p.name not in _NOT_IN_CONFIG]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise click.BadParameter(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


# ----- a server's own client key ----------------------------------------------------------------
SERVER_KEY_ENV = "BLACKBOX_PROXY_SERVER_KEY"
PORT = click.IntRange(1, 65535)


def server_key_options(fn: Any) -> Any:
    """``--api-key`` (or the environment) and ``--api-key-file``: the key clients must send."""
    fn = click.option("--api-key-file", "server_api_key_file", type=click.Path(dir_okay=False), default=None,
                      help="read the client key from this file (its first line)")(fn)
    return click.option("--api-key", "server_api_key", envvar=SERVER_KEY_ENV, default=None,
                        help=f"require `Authorization: Bearer KEY` from clients (401 otherwise) [env {SERVER_KEY_ENV}, "
                             "preferred: a flag shows in `ps`; or --api-key-file]")(fn)


def server_key(ctx: click.Context, key: str | None, key_file: str | None) -> str | None:
    """The server's client key, or None for an open server: ``--api-key-file`` or the
    environment, or ``--api-key`` on the command line with a warning (other users see it in
    ``ps``). An empty or unreadable key is a :class:`ConfigurationError`."""
    given = ctx.get_parameter_source("server_api_key") == click.core.ParameterSource.COMMANDLINE
    if key_file is not None:
        if given:
            raise ConfigurationError("pass --api-key or --api-key-file, not both")
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigurationError(f"cannot read --api-key-file {key_file} ({reason})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigurationError(f"--api-key-file {key_file} is empty; put the key on its first line")
        if not key.isascii() or not key.isprintable():
            raise ConfigurationError(f"--api-key-file {key_file} holds characters an HTTP header cannot carry; "
                                     "use printable ASCII")
        return key
    if key is None:
        return None
    if not key.strip():
        raise ConfigurationError("--api-key is empty; pass a key, or leave the option out for an open server")
    if not key.isascii() or not key.strip().isprintable():
        raise ConfigurationError("--api-key holds characters an HTTP header cannot carry; use printable ASCII")
    if given:
        click.echo(f"warning: --api-key on the command line shows in `ps` to every user of this machine; set "
                   f"{SERVER_KEY_ENV} or pass --api-key-file instead", err=True)
    return key.strip()
