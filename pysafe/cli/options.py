"""Shared CLI options and the error boundary (the mergekit pattern: options as decorators)."""

from __future__ import annotations

import functools
import sys
import traceback

import click

from pysafe.errors import PysafeError, printable


def debug_option(f):
    return click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(f)


def threads_option(f):
    return click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Worker threads for the core and BLAS (0: all cores).")(f)


def seed_option(f):
    return click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Seed of the randomized SVD (results are deterministic per seed and thread count).")(f)


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
