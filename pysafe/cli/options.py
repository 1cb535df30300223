"""Shared CLI options and the error boundary (the mergekit pattern: options as decorators)."""

from __future__ import annotations

import dataclasses
import functools
import sys
import traceback
import typing

import click

from pysafe.errors import PysafeError, printable


def debug_option(f):
    return click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(f)


def option_flag(f) -> str:
    """The command-line name of dataclass field ``f``: its ``flag`` metadata, else ``--field-name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _click_type(f, kind):
    if "choices" in f.metadata:
        return click.Choice(list(f.metadata["choices"]))
    if "range" in f.metadata:
        lo, hi, lo_open, hi_open = f.metadata["range"]
        cls = click.IntRange if kind is int else click.FloatRange
        return cls(lo, hi, min_open=lo_open, max_open=hi_open)
    return {int: int, float: float, str: str}[kind]


def _field_kind(f, hints) -> type:
    """bool, int, float or str: the field's annotation with an optional ``| None`` removed."""
    hint = hints[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if len(args) != 1 or args[0] not in (bool, int, float, str):
        raise TypeError(f"{f.name}: cannot make a command-line option of type {hint}")
    return args[0]


def dataclass_options(cls, *, into: str, help_overrides: dict | None = None):
    """Decorator adding one click option per field of dataclass ``cls`` (name, default, help text and
    choices or range from the fields' metadata; booleans become ``--x/--no-x``). The command receives the
    values as one ``cls`` instance in the keyword ``into``; its ``validate()`` runs first and a ValueError
    is shown as a usage error on the flag its message starts with."""
    help_overrides = help_overrides or {}
    hints = typing.get_type_hints(cls)
    decorators = []
    for f in dataclasses.fields(cls):
        kind, flag = _field_kind(f, hints), option_flag(f)
        help_ = help_overrides.get(f.name, f.metadata.get("help"))
        if help_ is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text in its metadata")
        if kind is bool:
            decorators.append(click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=True,
                                           help=help_))
        else:
            decorators.append(click.option(flag, f.name, type=_click_type(f, kind), default=f.default,
                                           show_default=f.default is not None, metavar=f.metadata.get("metavar"),
                                           help=help_))
    names = [f.name for f in dataclasses.fields(cls)]
    flags = {f.name: option_flag(f) for f in dataclasses.fields(cls)}

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            obj = cls(**{n: kwargs.pop(n) for n in names})
            try:
                obj.validate()
            except ValueError as exc:  # the messages start with the field's name: show it as the flag
                field_name = str(exc).split(" ", 1)[0]
                hint = f"'{flags[field_name]}'" if field_name in flags else None
                raise click.BadParameter(str(exc), param_hint=hint) from None
            return command(*args, **{into: obj}, **kwargs)

        for d in reversed(decorators):
            wrapper = d(wrapper)
        return wrapper

    return decorate


progress_option = click.option(
    "--progress/--no-progress", default=None,
    help="Progress bars (default: when stderr is a terminal; --progress into a log or pipe writes a plain line "
         "every PYSAFE_PROGRESS_INTERVAL seconds, default 30).")


def report_options(f):
    """``--overwrite``, ``--progress/--no-progress`` and ``--plots/--no-plots`` of a command writing a report folder."""
    f = click.option("--plots/--no-plots", default=True, show_default=True, help="Write plots/*.png.")(f)
    f = progress_option(f)
    return click.option("--overwrite", is_flag=True,
                        help="Replace the pysafe outputs in a non-empty --out, in one rename; your other files there "
                             "are kept.")(f)


def cache_options(f):
    """``--cache DIR`` / ``--no-cache``: the base-decomposition cache; :func:`open_base_cache` reads them."""
    f = click.option("--no-cache", is_flag=True, help="Neither read nor write the base-decomposition cache.")(f)
    return click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
                        help="Directory caching W_base's decompositions across runs, so that comparing several "
                             "fine-tunes against one base computes the base SVDs once (default: "
                             "$XDG_CACHE_HOME/pysafe, else ~/.cache/pysafe; bounded to PYSAFE_CACHE_MAX_GB, default "
                             "16, least recently used first).")(f)


def open_base_cache(cache_dir, no_cache):
    """The :class:`~pysafe.svdcache.BaseCache` of ``--cache``/``--no-cache`` (None for ``--no-cache``)."""
    if no_cache and cache_dir is not None:
        raise click.UsageError("--cache and --no-cache contradict each other; pass one")
    from pysafe.svdcache import BaseCache

    return None if no_cache else BaseCache(cache_dir)


def echo_cache(cache, debug: bool) -> None:
    """One line on stderr with the cache's hits and writes (and its notes with --debug)."""
    if cache is None:
        return
    c = cache.summary()
    ignored = f", {c['notes']} cache notes (--debug shows them)" if c["notes"] and not debug else ""
    click.echo(f"base decompositions: {c['hits']} from cache, {c['writes']} stored ({c['dir']}){ignored}", err=True)
    if debug:
        for note in cache.notes:
            click.echo(f"cache: {note}", err=True)


def ray_option(what: str):
    """``--ray ADDRESS``: run on a Ray cluster (pysafe.distributed); ``what`` says what one task is."""
    return click.option("--ray", "ray", default=None, metavar="ADDRESS",
                        help=f"Spread the work over a Ray cluster, {what}: local[:N] starts N local worker processes "
                             "(default: one per core), auto / HOST:PORT / ray://HOST:PORT connects to a running "
                             "cluster whose machines see the checkpoints at the same paths. Same results as without "
                             "it. Needs pysafe[ray].")


def device_option(help: str = "torch device (cpu, cuda, cuda:N).", default: str = "cpu"):
    """``--device``: the torch device of a lab or activation command; check it with :func:`check_device`."""
    return click.option("--device", default=default, show_default=True, help=help)


def check_device(device: str) -> None:
    """Raise DeviceUnavailableError (one line, exit 1) when ``device`` is a CUDA device torch cannot see."""
    import torch

    from pysafe.errors import DeviceUnavailableError

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"--device {device}: torch sees no CUDA device on this machine")


def handle_errors(f):
    """Turn expected errors into one line on stderr and exit code 1; --debug shows the traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        try:
            return f(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (PysafeError, FileNotFoundError, FileExistsError, ValueError, OSError) as exc:
            if debug:
                traceback.print_exc()
            raise click.ClickException(_one_line(exc)) from None
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, never a crash
            if debug:
                traceback.print_exc()
            raise click.ClickException(f"internal error ({type(exc).__name__}): {_one_line(exc)}; "
                                       "rerun with --debug for the traceback") from None

    return wrapper


def _one_line(exc: BaseException) -> str:
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
        msg = f"{exc.filename}: {exc.strerror or msg}"
    # one line, and nothing that a terminal would act on (a tensor name may hold ESC or NUL)
    return printable(" ".join(msg.split())) or type(exc).__name__
