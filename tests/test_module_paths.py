"""The old import paths of split modules keep serving the same objects (issue #19: no user import breaks)."""

from __future__ import annotations

import importlib

import pytest

OLD_PATHS = {
    "lightning_peft.tasks.text": [
        "DEFAULT_DOC_MODULES",
        "MINILM_PACKAGE",
        "CausalLMModule",
        "DocstringCorpusDataModule",
        "SentenceClassifier",
        "SentimentTemplatesDataModule",
        "TextClassificationModel",
        "bundled_minilm_path",
        "docstring_corpus",
        "encoder_tokenizer",
        "head_only_accuracy",
        "_NEGATIVE",
        "_POSITIVE",
    ],
    "lightning_peft.zoo.hub": ["DEFAULT_TIMEOUT", "TIMEOUT_ENV", "HubError", "HubUnreachableError", "HubZoo"],
    "lightning_peft.distributed": ["seeded_generator", "stable_seed"],
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_old_paths_re_export_the_moved_names(path: str) -> None:
    module = importlib.import_module(path)
    for name in OLD_PATHS[path]:
        obj = getattr(module, name)
        home = getattr(obj, "__module__", None)
        if home is not None and home != path:  # moved: the old path serves the very object of its new home
            assert getattr(importlib.import_module(home), name) is obj, (path, name)
    public = [n for n in OLD_PATHS[path] if not n.startswith("_")]
    assert set(public) <= set(module.__all__), set(public) - set(module.__all__)


def test_text_and_word_order_walk_the_same_documented_objects() -> None:
    import textwrap

    from lightning_peft.tasks.docstrings import documented_objects

    plain = documented_objects(textwrap)
    with_methods = documented_objects(textwrap, methods=True)
    assert plain[0] is textwrap and textwrap.TextWrapper in plain and textwrap.dedent in plain
    assert textwrap.TextWrapper.wrap in with_methods and textwrap.TextWrapper.wrap not in plain
    assert [o for o in with_methods if o in plain] == plain  # methods are inserted, the order of the rest is kept
    after_class = with_methods[with_methods.index(textwrap.TextWrapper) + 1]
    assert after_class in vars(textwrap.TextWrapper).values()  # a class's methods come right after it
