"""The runtime's command line: `ggufile run -m MODEL …` and, inside a built executable, `./model …`.

Both are the same click command. In an executable the model is embedded (no -m) and the
build-time default arguments apply on every start, merged with the user's (baked_args.py).
Started with no mode (-p, --chat, --server, ...) on a terminal it chats there with the server
in the background, as llamafile does; without a terminal it prints the usage.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from ggufile.runtime.errors import DEBUG_ENV, GGUFileError, unexpected_error_line
from ggufile.runtime.sampling import SamplingParams
from ggufile.runtime.server.slots import DEFAULT_PARALLEL


def sampling_options(f):
    """Options shared by every command that generates text."""
    decorators = [
        click.option("--temp", "temperature", type=click.FloatRange(0, 10), default=0.8, show_default=True,
                     help="Sampling temperature; 0 is greedy and deterministic."),
        click.option("--top-k", type=click.IntRange(0), default=40, show_default=True, help="0 disables."),
        click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.05, show_default=True),
        click.option("--repeat-penalty", type=click.FloatRange(0, 10), default=1.0, show_default=True),
        click.option("--repeat-last-n", type=click.IntRange(0), default=64, show_default=True),
        click.option("-s", "--seed", type=click.IntRange(0, 2**63 - 1), default=None,
                     help="Random seed for reproducible sampling."),
    ]
    for decorate in reversed(decorators):
        f = decorate(f)
    return f


def model_options(f):
    """Options that say which model to load and how."""
    decorators = [
        click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False), default=None,
                     help="GGUF model file (not needed inside a built executable)."),
        click.option("-c", "--ctx-size", type=click.IntRange(0, 1 << 20), default=4096, show_default=True,
                     help="Context size in tokens; 0 means the model's training context."),
        click.option("-t", "--threads", type=click.IntRange(1, 1024), default=None,
                     help="Worker threads (default: all cores)."),
    ]
    for decorate in reversed(decorators):
        f = decorate(f)
    return f


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("-p", "--prompt", default=None, help="Complete this prompt and stream the text to stdout.")
@click.option("-f", "--file", "prompt_file", type=click.File("r", encoding="utf-8"), default=None,
              help="Read the prompt from a file.")
@click.option("-n", "--n-predict", type=click.IntRange(-1), default=-1, show_default=True,
              help="Tokens to generate; -1 runs until the model stops or the context is full.")
@sampling_options
@click.option("--chat", "-cnv", is_flag=True, help="Chat in the terminal (keeps the conversation).")
@click.option("--system", default=None, help="System prompt for --chat.")
@click.option("--server", is_flag=True, help="Serve the web UI and an OpenAI-compatible API.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Server address (0.0.0.0 shares it on your network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", default=None, help="Require this Bearer key on API requests.")
@click.option("-a", "--alias", default=None, help="The model name the server reports (default: the model's own).")
@click.option("-np", "--parallel", type=click.IntRange(1, 64), default=DEFAULT_PARALLEL, show_default=True,
              help="Server slots: requests answered at once, their tokens batched in one step.")
@click.option("--embeddings", is_flag=True, help="Also serve /v1/embeddings (mean-pooled hidden states).")
@click.option("--nobrowser", is_flag=True, help="Do not open a browser when the server starts.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Let web pages from this origin call the API (repeatable; default: same origin only).")
@click.option("--info", is_flag=True, help="Describe the model and exit.")
@click.option("--verify", "verify_model", is_flag=True,
              help="Check the embedded model's sha256 first (reads it all); exit 1 if it is corrupted.")
@click.option("--perplexity", is_flag=True,
              help="Perplexity of the model on the text of -f, like llama-perplexity (-c is the chunk size, default 512).")
@click.option("--display-prompt/--no-display-prompt", default=True, show_default=True,
              help="Echo the prompt before the completion.")
@click.option("-v", "--verbose", is_flag=True, help="Print timings to stderr.")
@click.pass_context
def run_command(ctx, model_path, ctx_size, threads, prompt, prompt_file, n_predict, chat, system,
                server, host, port, api_key, alias, parallel, embeddings, nobrowser, cors_origins, info, verify_model,
                perplexity, display_prompt, verbose, **sampling):
    """Run a GGUF model: complete a prompt (-p), chat (--chat) or serve (--server).

    With none of these, on a terminal: chat there, with the server in the background."""
    embedded = ctx.obj
    if verify_model:
        _verify(embedded, model_path)
        if prompt is None and prompt_file is None and not (chat or server or info or perplexity):
            return
    if threads:
        os.environ["GGUFILE_THREADS"] = str(threads)  # read by the kernels' thread pool at import
    if prompt_file is not None:
        try:
            prompt = prompt_file.read()
        except UnicodeDecodeError as err:
            raise GGUFileError(f"-f {prompt_file.name}: not UTF-8 text (byte offset {err.start})") from None
    for name, text in (("-p/--prompt", prompt), ("--system", system)):
        check_utf8(name, text)
    if info:
        _print_info(embedded, model_path)
        return
    if perplexity:
        _perplexity(embedded, model_path, prompt, ctx_size)
        return
    bare = prompt is None and not chat and not server
    if bare and not (sys.stdin.isatty() and sys.stdout.isatty()):
        click.echo(_short_help(embedded, model_path, ctx))
        return
    engine = _open_engine(embedded, model_path, ctx_size)
    if ctx_size > engine.n_ctx and ctx.get_parameter_source("ctx_size") is not ParameterSource.DEFAULT:
        click.echo(f"warning: -c {ctx_size} is past the model's training context ({engine.n_ctx} tokens); "
                   f"using {engine.n_ctx}", err=True)
    params = SamplingParams(**sampling)
    if alias:
        engine.model_name = alias
    # The sampling flags and -n are the defaults of API requests that leave them out (llama-server).
    api_defaults = dict(defaults=_api_defaults(params, n_predict), embeddings=embeddings, parallel=parallel)
    if server:
        from ggufile.runtime.server.app import serve

        serve(engine, host=host, port=port, api_key=api_key, open_browser=not nobrowser,
              allowed_origins=tuple(cors_origins), log=_log_line, **api_defaults)
    elif chat or bare:
        _chat(engine, params, system, n_predict, bare and dict(host=host, port=port, api_key=api_key,
                                                               allowed_origins=tuple(cors_origins), **api_defaults))
    else:
        complete(engine, prompt, params, n_predict, display_prompt, verbose)


def _api_defaults(params: SamplingParams, n_predict: int):
    from ggufile.runtime.server.schema import Defaults

    return Defaults(params, n_predict if n_predict >= 0 else None)


def _log_line(text: str) -> None:
    """The server's lines (its URL first) reach a pipe at once, not when the buffer fills."""
    print(text, flush=True)


def _chat(engine, params, system, n_predict, background_server: dict | None) -> None:
    """The terminal chat; on a bare start, with the server (and its web page) in the background."""
    from ggufile.runtime.chat_repl import chat

    if not background_server:
        chat(engine, params, system, n_predict)
        return
    from ggufile.runtime.server.background import BackgroundServer

    server = BackgroundServer(engine, **background_server).start()
    try:
        chat(engine, params, system, n_predict,
             banner_extra=f"Web UI and OpenAI API: {server.url} (open it in a browser; it stops with the chat)")
    finally:
        server.stop()


def _verify(embedded, model_path) -> None:
    if embedded is None or model_path is not None:
        raise GGUFileError("--verify checks the model inside an executable; this run has none")
    if not embedded.verify():
        raise GGUFileError(f"{embedded.path}: checksum MISMATCH, the embedded model is corrupted "
                           "(get a fresh copy)")
    click.echo(f"{embedded.path}: OK (sha256 {embedded.sha256})", err=True)


def check_utf8(option: str, text: str | None) -> None:
    """Arguments that were not UTF-8 reach Python as lone surrogates; say so in one line."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start].encode("utf-8", "surrogateescape")
        raise GGUFileError(f"{option} is not valid UTF-8 (byte 0x{bad.hex()} at character {err.start}); "
                           "use a UTF-8 terminal or -f FILE") from None


def _perplexity(embedded, model_path, text, ctx_size) -> None:
    from ggufile.runtime.perplexity import report_perplexity

    if text is None:
        raise GGUFileError("--perplexity needs a text: -f FILE")
    chunk = ctx_size or 512
    engine = _open_engine(embedded, model_path, chunk)
    report_perplexity(engine.model, engine.tokenizer, text, chunk, None)


def _open_engine(embedded, model_path, ctx_size):
    from ggufile.runtime.engine import Engine

    n_ctx = ctx_size
    if ctx_size == 0:
        n_ctx = 1 << 20  # clipped to the model's training context by the engine
    if embedded is not None and model_path is None:
        return Engine.open(embedded.path, embedded.offset, embedded.size, n_ctx=n_ctx,
                           name=getattr(embedded, "name", None))
    if model_path is None:
        raise GGUFileError("no model given: use -m MODEL.gguf")
    return Engine.open(model_path, n_ctx=n_ctx)


def complete(engine, prompt: str, params: SamplingParams, n_predict: int, display_prompt: bool,
             verbose: bool) -> None:
    """Stream a plain completion of `prompt` to stdout."""
    ids = engine.tokenize(prompt)
    out = sys.stdout
    if display_prompt:
        out.write(prompt)
        out.flush()
    t0 = time.perf_counter()
    n_out = 0
    t_first = None
    for chunk in engine.generate(ids, params, max_tokens=n_predict):
        if t_first is None:
            t_first = time.perf_counter()
        n_out += chunk.token_id is not None and chunk.finish_reason is None
        out.write(chunk.text)
        out.flush()
    out.write("\n")
    out.flush()
    if verbose and t_first is not None:
        t_end = time.perf_counter()
        decode_s = t_end - t_first
        click.echo(f"prompt: {len(ids)} tokens in {t_first - t0:.3f} s "
                   f"({len(ids) / max(t_first - t0, 1e-9):.1f} tok/s); "
                   f"generated: {n_out} tokens in {decode_s:.3f} s "
                   f"({n_out / max(decode_s, 1e-9):.1f} tok/s)", err=True)


def _print_info(embedded, model_path) -> None:
    from ggufile.runtime.gguf.reader import GGUFReader
    from ggufile.runtime.gguf.info import describe_gguf

    if embedded is not None and model_path is None:
        info = embedded.describe()
    elif model_path is not None:
        info = describe_gguf(GGUFReader(model_path))
    else:
        raise GGUFileError("no model given: use -m MODEL.gguf")
    for key, value in info.items():
        click.echo(f"{key:>16}: {value}")


def _short_help(embedded, model_path, ctx) -> str:
    if embedded is None:
        return ctx.get_help()
    prog = ctx.find_root().info_name or "model"
    name = getattr(embedded, "name", None) or "the embedded model"
    return "\n".join([
        f"{prog}: {name}, packed into one executable by ggufile.",
        "",
        f"  ./{prog} -p \"Once upon a time\"     complete a prompt",
        f"  ./{prog} --chat                     chat in the terminal",
        f"  ./{prog} --server                   web UI + OpenAI-compatible API on http://127.0.0.1:8080",
        f"  ./{prog} --info                     what is inside",
        f"  ./{prog} --help                     every option",
    ])


@click.command("tokenize")
@click.option("-m", "--model", "model_path", type=click.Path(dir_okay=False), required=True, help="GGUF model file.")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS/special tokens the model's metadata asks for.")
@click.option("--special", is_flag=True, help="Parse control tokens such as <|im_start|> in the text.")
@click.argument("text")
def tokenize_command(model_path, no_bos, special, text):
    """Print the token ids of TEXT as a JSON list (like llama.cpp's llama-tokenize)."""
    from ggufile.runtime.gguf.reader import GGUFReader
    from ggufile.runtime.tokenizer.tokenizer import Tokenizer

    from ggufile.runtime import kernels

    tok = Tokenizer.from_metadata(GGUFReader(model_path, scan_strings=kernels.string_scanner()).metadata)
    click.echo(json.dumps(tok.encode(text, add_special=not no_bos, parse_special=special)))


def program_name(embedded) -> str:
    """What usage and error lines call us: the executable's own file name, whichever launcher ran
    it (the cached launcher's runtime is a file called ggufile-runtime in a cache folder)."""
    if embedded is not None:
        return Path(embedded.path).name
    return os.path.basename(sys.argv[0]) or "ggufile"


def _truncated(embedded) -> bool:
    """Whether the file we run from no longer holds our model (cut short under us)."""
    if embedded is None:
        return False
    try:
        return os.stat(embedded.path).st_size < embedded.offset + embedded.size
    except OSError:
        return True


def main(argv: list[str] | None = None, embedded=None) -> int:
    """Entry point of the executable (embedded model) and of `python -m ggufile.runtime`."""
    from ggufile.runtime.baked_args import merge, option_table

    argv = list(sys.argv[1:] if argv is None else argv)
    if embedded is not None:
        argv = merge(list(getattr(embedded, "default_args", []) or []), argv, option_table(run_command))
    try:
        run_command.main(args=argv, prog_name=program_name(embedded), standalone_mode=False, obj=embedded)
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.Abort:  # click's word for KeyboardInterrupt, and for an EOFError ...
        if _truncated(embedded):  # ... which a lazy import from our truncated .pyz raises
            from ggufile.runtime.watch import changed_message

            click.echo(f"Error: {changed_message(embedded.path)}", err=True)
            return 1
        return 130
    except GGUFileError as err:
        click.echo(f"Error: {err}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 -- a guest on someone's machine: one line, not a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        click.echo(f"Error: {unexpected_error_line(err)}", err=True)
        return 1
    return 0
