"""The methods' pictures reach the loggers that take images, and their per-step figures follow the trainer's
``log_every_n_steps`` (issue #20 item 5)."""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lit_helpers import FamilyModule, quiet_trainer

from lightning_peft import ID3, SaRA

pytest.importorskip("tensorboard")


def events(folder) -> tuple[set[str], dict[str, list[int]]]:
    """Image tags and ``{scalar tag: steps}`` in a TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags["images"]), {t: [e.step for e in acc.Scalars(t)] for t in tags["scalars"]}


def test_pictures_reach_tensorboard_and_figures_follow_the_logging_interval(tmp_path) -> None:
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="", version="run")
    cb = ID3(budget=40, total_steps=3, save_dir=str(tmp_path / "delta"), log_every=100)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, log_every_n_steps=3, logger=logger, callbacks=[cb])
    trainer.fit(FamilyModule("vit", n_batches=6))
    logger.experiment.flush()
    images, scalars = events(tmp_path / "tb" / "run")
    assert "id3/id3_density" in images  # the PNG the callback saved beside the result
    assert scalars["id3/density"] == [2, 5, 6]  # steps 3 and 6 (as self.log counts), and the end of fit


def test_sara_figures_follow_the_logging_interval_in_a_csv_logger(tmp_path) -> None:
    logger = CSVLogger(str(tmp_path), name="", version="run")
    cb = SaRA(fraction=0.1)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0, log_every_n_steps=2, logger=logger, callbacks=[cb])
    trainer.fit(FamilyModule("vit", n_batches=6))
    logger.save()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col, step = header.index("sara/density"), header.index("step")
    logged = [int(r.split(",")[step]) for r in rows[1:] if r.split(",")[col]]
    assert logged and len(logged) <= 4 and logged[:3] == [1, 3, 5]  # every 2nd optimizer step (and the end)


def test_pictures_go_to_log_image_loggers_and_not_to_loggers_without_images(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_peft.callbacks.base import log_picture

    png = tmp_path / "p.png"
    plt.figure(figsize=(1, 1)).savefig(png)
    plt.close("all")

    class WandbStyle:  # WandbLogger.log_image(key, images, step=None)
        def __init__(self) -> None:
            self.calls: list = []

        def log_image(self, key, images, **kwargs) -> None:
            self.calls.append((key, images))

    logger = WandbStyle()
    assert log_picture(logger, "adalora/ranks", png, step=3) and logger.calls == [("adalora/ranks", [str(png)])]
    assert not log_picture(CSVLogger(str(tmp_path)), "adalora/ranks", png, step=3)  # takes no images: skipped
