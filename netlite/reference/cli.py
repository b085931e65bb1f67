"""``netlite reference`` and ``netlite validate`` (docs/cli.md).

::

    netlite reference --out DIR [--layers T1,T2] [--dtype float64] [--no-check]
    netlite validate --corpus DIR --framework torch|jax|netlite
                     [--impl module:function] [--engine numpy|numba]
                     [--layers T1,T2] [--dtype float64|float32] [--json]

Both are delegated sub-tools of the ``netlite`` command (like
``convert-mnist``): every argument after the command goes to the parsers
here.  ``validate`` exits with 0 when every case passed (or matched a
documented surrogate), 1 when a case failed or errored or the corpus or
implementation could not be loaded, 2 on a usage error.
"""

import argparse
import importlib
import json
import os
import sys

from netlite.errors import NetliteError


def _layers(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def _size(directory):
    total = 0
    for entry in os.scandir(directory):
        if entry.is_file():
            total += entry.stat().st_size
    return total


def reference_parser():
    p = argparse.ArgumentParser(
        prog="netlite reference",
        allow_abbrev=False,
        description="Write the reference-gradient corpus: float64 cases (inputs, "
        "params, outputs, upstream gradients and gradients) for every "
        "layer with a backward, as safetensors files and a manifest.",
        epilog="See docs/reference.md.",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the corpus directory (created if needed)",
    )
    p.add_argument(
        "--layers",
        type=_layers,
        default=None,
        metavar="T1,T2",
        help="only these layer types (default: all)",
    )
    p.add_argument(
        "--dtype",
        default="float64",
        choices=("float64",),
        help="the dtype of the stored tensors (float64)",
    )
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the finite-difference check of every stored gradient",
    )
    return p


def main_reference(argv=None):
    """``netlite reference``; returns the exit status."""
    args = reference_parser().parse_args(argv)
    try:
        # The module, not the function that netlite.reference exports under
        # the same name.
        write_module = importlib.import_module("netlite.reference.write")
        records = write_module.write(
            args.out, layers=args.layers, dtype=args.dtype, check=args.check
        )
    except (NetliteError, OSError, ValueError, ImportError) as exc:
        print(f"netlite reference: error: {exc}", file=sys.stderr)
        return 1
    types = sorted({r.layer_type for r in records})
    print(
        f"Wrote {len(records)} cases of {len(types)} layer types to {args.out} "
        f"({_size(args.out) / 1024:.0f} KiB)"
    )
    return 0


def validate_parser():
    p = argparse.ArgumentParser(
        prog="netlite validate",
        allow_abbrev=False,
        description="Hold an implementation of netlite's layers, written in "
        "PyTorch, JAX or netlite itself, to a reference corpus: its "
        "outputs and its autograd gradients against the stored ones.",
        epilog="Exit status: 0 all cases passed (or matched a documented "
        "surrogate), 1 a case failed or errored, or the corpus could not "
        "be read. See docs/reference.md.",
    )
    p.add_argument(
        "--corpus",
        required=True,
        metavar="DIR",
        help="a corpus written by netlite reference",
    )
    p.add_argument(
        "--framework",
        required=True,
        choices=("torch", "jax", "netlite"),
        help="the implementation's framework (its autograd computes "
        "the gradients; netlite: the implementation's own)",
    )
    p.add_argument(
        "--impl",
        metavar="MODULE:FUNCTION",
        help="the implementation: impl(case) -> outputs (module:function "
        "or path/to/file.py:function); default for --framework "
        "netlite: netlite's own layers",
    )
    p.add_argument(
        "--engine",
        choices=("numpy", "numba"),
        default=None,
        help="--framework netlite: the CPU engine (default numpy)",
    )
    p.add_argument(
        "--layers",
        type=_layers,
        default=None,
        metavar="T1,T2",
        help="only the cases of these layer types",
    )
    p.add_argument(
        "--dtype",
        default="float64",
        choices=("float64", "float32"),
        help="give the implementation inputs in this dtype and hold it "
        "to the cases' tolerance for it (default float64)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of tables"
    )
    return p


def main_validate(argv=None):
    """``netlite validate``; returns the exit status."""
    parser = validate_parser()
    args = parser.parse_args(argv)
    if args.impl is None and args.framework != "netlite":
        parser.error(f"--framework {args.framework} needs --impl MODULE:FUNCTION")
    if args.engine is not None and args.framework != "netlite":
        parser.error("--engine applies to --framework netlite only")
    from netlite.reference.impl import load_impl
    from netlite.reference.validate import validate

    try:
        impl = load_impl(args.impl) if args.impl else None
    except Exception as exc:  # the user's module may raise anything on import
        print(
            f"netlite validate: error: --impl {args.impl}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    try:
        report = validate(
            args.corpus,
            impl,
            args.framework,
            layers=args.layers,
            dtype=args.dtype,
            engine=args.engine,
        )
    except (NetliteError, OSError, ValueError, ImportError) as exc:
        print(f"netlite validate: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=1, sort_keys=True))
    else:
        print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_validate())
