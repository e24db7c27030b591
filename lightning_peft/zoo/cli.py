"""``lightning-peft zoo list | search | info | download | push | rm``: the zoo from the command line.

Local entries by default; ``--hub`` (with ``--namespace`` / ``--endpoint``) works on the Hub.
Tables are drawn with rich; Hub downloads show huggingface_hub's progress bars.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from lightning_peft.zoo import EntryError, EntryInfo, FingerprintMismatchError, HubError, HubZoo, LocalZoo

__all__ = ["main"]


def _zoo(args: argparse.Namespace) -> LocalZoo | HubZoo:
    if args.hub:
        return HubZoo(namespace=args.namespace, endpoint=args.endpoint)
    return LocalZoo(args.root)


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
    parser = argparse.ArgumentParser(prog="lightning-peft zoo", description="Publish, find and fetch adapters.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hub", action="store_true", help="use the Hugging Face Hub instead of the local zoo")
    common.add_argument("--root", help="local zoo directory (default: $LIGHTNING_PEFT_ZOO or the user cache)")
    common.add_argument("--namespace", help="Hub user or organisation (default: your login)")
    common.add_argument("--endpoint", help="Hub URL (default: huggingface_hub's, i.e. $HF_ENDPOINT)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="list entries")
    p = sub.add_parser("search", parents=[common], help="search entries by name, method, base model")
    p.add_argument("query", nargs="?")
    p.add_argument("--method")
    p.add_argument("--base-model")
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
    p = sub.add_parser("push", parents=[common], help="publish an entry folder (one built by ZooPublisher/build_entry)")
    p.add_argument("folder")
    p.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a zoo command; returns the exit code (errors are printed as one line, not a traceback)."""
    args = _parser().parse_args(argv)
    zoo = _zoo(args)
    try:
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
            path = zoo.download(args.name, args.revision)
            if args.to:
                shutil.copytree(path, args.to, dirs_exist_ok=True)
                path = Path(args.to)
            print(path)
        elif args.command == "push":
            revision = zoo.publish(args.folder, args.name)
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
    except (EntryError, FingerprintMismatchError, HubError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
