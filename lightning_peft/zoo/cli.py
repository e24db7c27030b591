"""``lightning-peft zoo list | search | info | download | export | push | rm``: the zoo from the command line.

Local entries by default; ``--hub`` (with ``--namespace`` / ``--endpoint`` / ``--timeout``) works on
the Hub. Tables are drawn with rich; Hub downloads show huggingface_hub's progress bars. Every error
is one line on stderr and exit code 2 (``LIGHTNING_PEFT_DEBUG=1`` shows the traceback instead).

This module imports no Lightning: the ``lightning-peft`` console script dispatches ``zoo`` here
before the training stack is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from lightning_peft.fileio import staged_dir, storage_error
from lightning_peft.zoo import EntryInfo, HubZoo, LocalZoo, publish_folder

__all__ = ["main"]


def _zoo(args: argparse.Namespace) -> LocalZoo | HubZoo:
    if args.hub:
        return HubZoo(namespace=args.namespace, endpoint=args.endpoint, timeout=args.timeout)
    return LocalZoo(args.root)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not str(err).strip():
        text = type(err).__name__
    elif isinstance(err, OSError) and err.strerror and type(err).__str__ is OSError.__str__:
        text = f"{err.strerror}: {err.filename}" if err.filename else err.strerror  # not "[Errno 13] ..."
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _copy_to(source: Path, to: str) -> Path:
    """Copy an entry folder into ``to`` atomically (a staged folder renamed into place)."""
    target = Path(to)
    try:
        with staged_dir(target) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    except shutil.Error as err:  # copytree collects its errors: report the first
        first = err.args[0][0] if err.args and err.args[0] else ("", "", str(err))
        raise storage_error(OSError(first[2]), target, "copying the entry") from err
    except OSError as err:
        raise storage_error(err, target, "copying the entry") from err
    return target


def _table(rows: list[EntryInfo], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("name", "revision", "method", "base model", "metrics", "created"):
        table.add_column(column, overflow="fold", no_wrap=column in ("name", "revision"))
    for r in rows:
        shown = {k: v for k, v in r.metrics.items() if k.startswith(("val", "test"))} or r.metrics
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items()))
        table.add_row(r.name, r.revision[:12], r.method, r.base_model or "", metrics, r.created[:16].replace("T", " "))
    Console().print(table)
    if not rows:
        print("no entries")


def _parser() -> argparse.ArgumentParser:
    from lightning_peft.exporting import FORMATS  # the export command's formats (exporting builds on the zoo)

    parser = argparse.ArgumentParser(prog="lightning-peft zoo", description="Publish, find and fetch adapters.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hub", action="store_true", help="use the Hugging Face Hub instead of the local zoo")
    common.add_argument("--root", help="local zoo directory (default: $LIGHTNING_PEFT_ZOO or the user cache)")
    common.add_argument("--namespace", help="Hub user or organisation (default: your login)")
    common.add_argument("--endpoint", help="Hub URL (default: huggingface_hub's, i.e. $HF_ENDPOINT)")
    common.add_argument(
        "--timeout", type=float, help="seconds to wait for the Hub (default: $LIGHTNING_PEFT_HUB_TIMEOUT or 10)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="list entries")
    p = sub.add_parser(
        "search", parents=[common], help="search entries (case-insensitive; the same locally and on the Hub)"
    )
    p.add_argument("query", nargs="?", help="a substring of the name, method, base model or a tag")
    p.add_argument("--method", help="lora, adalora, lisa, hft, id3, sara, ssf or spiel, in any case")
    p.add_argument("--base-model", help="a substring of the base model's id")
    for name, text in (
        ("info", "show an entry's manifest"),
        ("download", "fetch an entry (verified)"),
        ("rm", "delete an entry"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("name")
        if name != "rm":
            p.add_argument("--revision")
    sub.choices["download"].add_argument("--to", help="copy the entry into this folder")
    sub.choices["rm"].add_argument("--yes", action="store_true", help="do not ask")
    p = sub.add_parser("export", parents=[common], help="merge an entry (or a result folder) into its base model")
    p.add_argument("name", help="a zoo entry name, an entry folder or a callback's save_dir")
    p.add_argument("--revision")
    p.add_argument("--base", required=True, help="the base model: a local model folder, a Hub id or timm:NAME")
    p.add_argument("--out", required=True, help="a new folder for the merged model")
    p.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="the model's own format (auto); diffusers-lora: a UNet LoRA unmerged; peft-shira: ID3/SaRA/SpIEL for peft",
    )
    p.add_argument("--allow-base-mismatch", action="store_true", help="skip the base fingerprint check")
    p = sub.add_parser(
        "push", parents=[common], help="publish an entry folder: ZooPublisher's, build_entry's or a callback's save_dir"
    )
    p.add_argument("folder")
    p.add_argument("name")
    p.add_argument("--base-model", help="name the base model (a Hub id, a path) in the card and manifest")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a zoo command; returns the exit code (errors are printed as one line on stderr, exit code 2)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - every error is one line; LIGHTNING_PEFT_DEBUG=1 shows the traceback
        if os.environ.get("LIGHTNING_PEFT_DEBUG"):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    zoo = _zoo(args)
    if args.command == "list":
        where = zoo.root if isinstance(zoo, LocalZoo) else (zoo.endpoint or "the Hugging Face Hub")
        _table(zoo.list(), f"lightning-peft zoo: {where}")
    elif args.command == "search":
        _table(zoo.search(args.query, method=args.method, base_model=args.base_model), "search results")
    elif args.command == "info":
        from lightning_peft.zoo import read_manifest

        path = zoo.download(args.name, args.revision)
        manifest = read_manifest(path)
        manifest["base_model"]["fingerprint"] = manifest["base_model"]["fingerprint"]["sha256"]
        print(json.dumps({"location": str(path), **manifest}, indent=2))
    elif args.command == "download":
        if args.to and Path(args.to).exists() and not Path(args.to).is_dir():  # before any download
            raise NotADirectoryError(f"--to {args.to} exists and is a file: pass a folder (new or existing)")
        path = zoo.download(args.name, args.revision)
        print(_copy_to(path, args.to) if args.to else path)
    elif args.command == "export":
        from lightning_peft.exporting import export

        out = export(
            args.name,
            args.out,
            base=args.base,
            revision=args.revision,
            zoo=zoo,
            format=args.format,
            allow_base_mismatch=args.allow_base_mismatch,
        )
        print(f"exported to {out}")
    elif args.command == "push":
        revision = publish_folder(args.folder, args.name, zoo=zoo, base_model=args.base_model)
        print(f"published {args.name} revision {revision}")
    elif args.command == "rm":
        if not args.yes:
            if sys.stdin is None or not sys.stdin.isatty():
                print("error: rm deletes every revision; pass --yes to confirm", file=sys.stderr)
                return 2
            if input(f"delete {args.name} and all its revisions? [y/N] ").strip().lower() != "y":
                print("nothing deleted")
                return 1
        zoo.rm(args.name)
        print(f"deleted {args.name}")
    return 0
