"""``blackbox-proxy``: the command line. Every user error is one line on stderr and exit 1.

The product's commands:
    generate      proxy-tuned generation against an OpenAI-compatible endpoint
    batch         many prompts from JSONL, resumable, results appended as they finish
    serve         the proxy-tuned model as an OpenAI-compatible server
    serve-model   serve a local Hugging Face causal LM with OpenAI's API (logprobs included)
    eval          task suites x systems (:mod:`.eval_command`)

Each command parses its flags, builds what it runs (a
:class:`~blackbox_proxy.request.GenerationRequest`, a tuner, a server) and reports. Left out:
the shared flags (:mod:`blackbox_proxy.apps.cli_options`), checking option values (the request
object and the tuner do it), the harness's ``demo`` and ``compare`` (``harness/commands.py``,
added to this group by ``blackbox_proxy/__main__.py``, the installed ``blackbox-proxy``), and
anything heavy at import time: torch and the servers load inside the command that needs them,
so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import click

from ..errors import ConfigurationError, ProxyTuningError
from ..request import STRATEGIES, GenerationRequest
from .cli_options import (PORT, generation_options, load_serve_config, request_options, server_key,
                          server_key_options, setup_logging, tuner_kwargs, tuner_options)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class _Group(click.Group):
    """Turns library errors into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ProxyTuningError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="blackbox-proxy")
def main() -> None:
    """Proxy-tune a hosted LLM you can only reach through an OpenAI-style API.

    Small local models steer it: an expert (a small model after tuning) and its anti-expert
    (the same small model before tuning). Their log-probability difference is added to the
    hosted model's top-k logprobs at every position (Liu et al. 2024).
    """


@main.command()
@tuner_options
@click.option("--base", default=None, help="white-box strategy: the large model, local (HF folder or name)")
@click.option("--prompt", required=True, help="prompt text (sent as the user message in chat modes)")
@generation_options()
@click.option("--json", "as_json", is_flag=True,
              help="print text, usage and trace as one strict JSON object (a -inf logprob is null)")
@click.option("-v", "--verbose", count=True, help="log progress (-vv for debug)")
def generate(**o: Any) -> None:
    """Generate proxy-tuned text (per-step: one API call per token; speculative: per chunk).

    \b
    Example:
      blackbox-proxy generate --base-url http://127.0.0.1:8000/v1 --model tiny \\
        --expert ./expert --anti-expert ./base --prompt "Question: 2+3?" --max-tokens 16
    """
    setup_logging(o["verbose"])
    options = request_options(o)
    if o["strategy"] == "white-box":
        if not o["base"]:
            raise ConfigurationError("the white-box strategy needs the large model locally: pass --base MODEL")
        if o["scorer_url"]:
            raise ConfigurationError("--scorer-url is for the black-box strategies; white-box runs all three models here")
        # white-box decodes token by token locally: the per-step options, no chunk or samples
        request = GenerationRequest.build(prompt=o["prompt"], **dict(options, strategy=None, chunk=None, samples=None))
        from ..whitebox import WhiteBoxTuner

        white = WhiteBoxTuner(base=o["base"], expert=o["expert"], expert_adapter=o["expert_adapter"],
                              anti_expert=o["anti_expert"], device=o["device"], expert_render=o["expert_render"],
                              anti_expert_render=o["anti_expert_render"])
        [result] = white.generate(request=request)
    else:
        if o["base"]:
            raise ConfigurationError("--base is for --strategy white-box; black-box strategies reach the large model "
                                     "through --base-url/--model")
        if not o["model"]:
            raise ConfigurationError("no hosted model name: pass --model NAME")
        # checked before the hosted API is reached or a model loads
        request = GenerationRequest.build(prompt=o["prompt"], **options)
        from ..tuner import ProxyTuner

        with ProxyTuner(**tuner_kwargs(o), check_hosted=True) as tuner:
            result = tuner.generate(request=request)
    _report(result, as_json=o["as_json"])


def _report(result: Any, *, as_json: bool) -> None:
    """The text on stdout and a usage line on stderr, or everything as one JSON object."""
    if as_json:
        from .batch import json_line

        click.echo(json_line(result.to_dict()), nl=False)
        return
    click.echo(result.text)
    u = result.usage
    accepted = f", {u.acceptance_rate:.0%} of drafts accepted" if u.acceptance_rate is not None else ""
    if result.ess is not None:
        accepted += f", ESS {result.ess:.1f} of {len(result.samples)} samples"
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    probes = f" ({u.tail_calls} beyond the top-k)" if u.tail_calls else ""
    cached = f" ({u.cached_prompt_tokens} prompt tokens cached)" if u.cached_prompt_tokens else ""
    click.echo(
        f"[{u.generated_tokens} tokens, {u.api_calls} API calls{probes}{accepted}, {u.prompt_tokens}+{u.completion_tokens} "
        f"billed tokens{cached}, {u.api_seconds:.2f} s API, {u.scoring_seconds:.2f} s scoring, finish={result.finish_reason}]",
        err=True,
    )


@main.command()
@tuner_options
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False),
              help='JSONL, one prompt per line: {"id": ..., "prompt": ...} or {"id": ..., "messages": [...]}')
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="JSONL results, appended as prompts finish; ids already there are skipped (resume)")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="prompts in flight at once")
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="a malformed line or a failed prompt: stop the run, or report it and go on")
@click.option("--trace", is_flag=True, help="write each result's settings and per-step trace too")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@generation_options()
@click.option("-v", "--verbose", count=True, help="log progress (-vv for debug)")
def batch(**o: Any) -> None:
    """Run many prompts from a JSONL file; re-running the same command resumes.

    Each result is appended to --output (and flushed) as soon as it is done. After a crash or
    Ctrl-C, the same command skips the ids already written and finishes the rest. A line's own
    max_tokens/alpha/temperature/top_p/seed/stop/strategy/chunk/samples override the options.

    \b
    Example:
      blackbox-proxy batch --base-url http://127.0.0.1:8000/v1 --model tiny \\
        --expert ./expert --anti-expert ./base --input prompts.jsonl --output results.jsonl
    """
    setup_logging(o["verbose"])
    from .batch import run_batch

    summary = run_batch(
        o["input_path"], o["output_path"], tuner=tuner_kwargs(o), concurrency=o["concurrency"],
        on_error=o["on_error"], progress=False if o["no_progress"] else None, trace=o["trace"],
        **request_options(o),
    )
    parts = [f"{summary.written} written", f"{summary.skipped_done} already done"]
    if summary.bad_lines:
        parts.append(f"{summary.bad_lines} malformed line(s) skipped")
    if summary.failed:
        parts.append(f"{summary.failed} failed (see {summary.errors_path}; run again to retry them)")
    click.echo(f"[{summary.total} prompts: {', '.join(parts)}; results in {o['output_path']}]", err=True)
    if summary.failed:
        sys.exit(1)


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), callback=load_serve_config, is_eager=True,
              expose_value=False, help="TOML file with these settings (keys as option names, e.g. alpha = 1.5); flags win")
@functools.partial(tuner_options, hosted_key_flag="--hosted-api-key")
@click.option("--name", default=None, help="model name clients use [default: MODEL-proxy-tuned]")
@click.option("--host", default="127.0.0.1", show_default=True, help="bind address (loopback unless told otherwise)")
@click.option("--port", type=PORT, default=8080, show_default=True)
@server_key_options
@generation_options(  # the defaults a request's extra body fields override
    "strategy", "alpha", "chunk", "max_tokens",
    strategy=dict(type=click.Choice(STRATEGIES), help="default strategy (a request's extra field `strategy` overrides it)"),
    alpha=dict(help="default alpha (extra field `alpha`)"),
    chunk=dict(help="speculative chunk [default: adaptive]"),
    max_tokens=dict(default=256, help="max_tokens when a request gives none"))
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=1 << 20, show_default=True)
@click.option("--batch-scoring/--no-batch-scoring", default=True, show_default=True,
              help="concurrent generations share the local small models' forwards (throughput); off: each "
                   "answer's floats depend on its request alone, bit for bit, whatever else runs (docs/deploy.md)")
@click.option("-v", "--verbose", count=True)
def serve(**o: Any) -> None:
    """Serve the proxy-tuned model as an OpenAI-compatible API (completions, chat, streaming).

    Any OpenAI client can then use the tuned model: point its base URL at this server and ask
    for model NAME. Per request, the extra body fields alpha, strategy and chunk override the
    defaults.

    \b
    Example:
      OPENAI_API_KEY=sk-... blackbox-proxy serve --base-url https://api.example.com/v1 \\
        --model base-model --expert ./tuned --anti-expert ./base --port 8080
      curl http://127.0.0.1:8080/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "base-model-proxy-tuned", "prompt": "Hello", "max_tokens": 16}'
    """
    setup_logging(o["verbose"])
    # The server's defaults, its key and its port are checked before the hosted API is probed or
    # a model loads: a bad value fails now, not in every request's answer.
    GenerationRequest.check_defaults(alpha=o["alpha"], strategy=o["strategy"], chunk=o["chunk"],
                                     max_tokens=o["max_tokens"])
    if o["max_tokens"] > o["max_tokens_limit"]:
        raise ConfigurationError(f"--max-tokens {o['max_tokens']} (for requests that give none) is above "
                                 f"--max-tokens-limit {o['max_tokens_limit']}; lower it or raise the limit")
    key = server_key(click.get_current_context(), o["server_api_key"], o["server_api_key_file"])
    from .loopback import UVICORN_OPTIONS, check_port

    check_port(o["host"], o["port"])
    import uvicorn

    from ..hosts.client import HostedClient
    from ..tuner import AsyncProxyTuner
    from .tuned_server import create_tuned_app

    kwargs = tuner_kwargs(o)
    # Reach the hosted API once before loading models: a bad URL, key or model fails here.
    probe = HostedClient(model=kwargs["model"], base_url=kwargs["base_url"], api_key=kwargs["api_key"],
                         mode=kwargs["mode"], dialect=kwargs["dialect"], timeout=kwargs["timeout"],
                         max_retries=kwargs["max_retries"])
    probe.check()
    probe.close()
    # the dialect found now holds for the server's life: a replica whose first request met a failing
    # /v1/models would otherwise guess another from the host name (and answer differently)
    kwargs["dialect"] = kwargs["dialect"] or probe.dialect
    tuner = AsyncProxyTuner(**kwargs, batch_scoring=o["batch_scoring"])
    name = o["name"] or f"{o['model']}-proxy-tuned"
    app = create_tuned_app(tuner, name=name, api_key=key, alpha=o["alpha"], strategy=o["strategy"],
                           chunk=o["chunk"], default_max_tokens=o["max_tokens"],
                           max_tokens_limit=o["max_tokens_limit"], max_body_bytes=o["max_body_bytes"])
    click.echo(f"serving {name} (hosted {o['model']} at {tuner.client.base_url}, {o['strategy']}, alpha {o['alpha']:g}) "
               f"at http://{o['host']}:{o['port']}/v1 (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=o["host"], port=o["port"], log_level="warning" if o["verbose"] == 0 else "info",
                **UVICORN_OPTIONS)


@main.command("serve-model")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="bind address (loopback unless told otherwise)")
@click.option("--port", type=PORT, default=8000, show_default=True)
@click.option("--name", default=None, help="model name clients use (default: the folder name)")
@click.option("--max-top-logprobs", type=click.IntRange(min=0), default=20, show_default=True,
              help="cap on logprobs/top_logprobs")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=4096, show_default=True,
              help="cap on max_tokens per request")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
              help="larger request bodies get a 413")
@server_key_options
@click.option("--cache-slots", type=click.IntRange(min=1), default=32, show_default=True,
              help="KV caches kept for interleaved clients (one per concurrent generation is ideal)")
@click.option("--device", default=None, help="torch device (default: cuda, mps, else cpu)")
@click.option("--logprobs-after-bias", is_flag=True,
              help="report the logprobs of the logit_bias-ed distribution, as some hosts do (default: the model's "
                   "own, as OpenAI and vLLM report them); to test clients against both")
@click.option("--openai-like", is_flag=True,
              help="behave as OpenAI's chat models: chat completions only, its fields only (others get its 400), "
                   "a trailing assistant message answered with a new turn; keep --max-top-logprobs 20")
@click.option("-v", "--verbose", count=True)
def serve_model(model: str, host: str, port: int, name: str | None, max_top_logprobs: int,
                max_tokens_limit: int, max_body_bytes: int, server_api_key: str | None,
                server_api_key_file: str | None, cache_slots: int, device: str | None, logprobs_after_bias: bool,
                openai_like: bool, verbose: int) -> None:
    """Serve a local Hugging Face causal LM with OpenAI's API, logprobs included.

    \b
    Example:
      blackbox-proxy serve-model ./my-model --port 8000
      curl http://127.0.0.1:8000/v1/models
    """
    setup_logging(verbose)
    api_key = server_key(click.get_current_context(), server_api_key, server_api_key_file)
    from .loopback import UVICORN_OPTIONS, check_port

    check_port(host, port)  # before the model loads
    import uvicorn

    from ..errors import ModelLoadError
    from ..local.runner import ModelRunner
    from .model_server import create_app

    try:
        runner = ModelRunner.from_pretrained(model, name=name, device=device, cache_slots=cache_slots,
                                             logprobs_after_bias=logprobs_after_bias)
    except ProxyTuningError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load {model!r} ({type(exc).__name__}); pass a local Hugging Face model folder") from exc
    app = create_app(runner, max_top_logprobs=max_top_logprobs, max_tokens_limit=max_tokens_limit,
                     api_key=api_key, max_body_bytes=max_body_bytes, openai_like=openai_like)
    click.echo(f"serving {runner.name} at http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning" if verbose == 0 else "info", **UVICORN_OPTIONS)


from .eval_command import eval_command  # noqa: E402 - the command is defined in its own module

main.add_command(eval_command)


if __name__ == "__main__":  # pragma: no cover
    main()
