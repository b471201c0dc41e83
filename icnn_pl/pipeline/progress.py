"""Lightning callbacks that show a reconstruction while it runs: the iteration and loss on
the job's progress bar, and display snapshots every K iterations."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from PIL import Image
from tqdm.auto import tqdm

from icnn_pl.image import display_image, from_caffe
from icnn_pl.pipeline.outputs import ReconOutputs
from icnn_pl.review.gallery import save_png


class IterationProgress(pl.Callback):
    """Shows the iteration and loss of the image in flight on the job's progress bar."""

    def __init__(self, bar: tqdm, every: int = 10) -> None:
        self.bar, self.every = bar, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if module.runs_to_completion or step % self.every and step != module.trainer_steps:
            return
        last = module.last_loss
        loss = float(last.sum()) if last is not None else float("nan")
        self.bar.set_postfix_str(f"it {step}/{module.trainer_steps} loss={loss:.4g}")


class Snapshots(pl.Callback):
    """Saves display images of the reconstruction every ``every`` iterations (GD methods)
    to ``<subject>/<roi>/snapshots/<label>/<iteration>.png``."""

    def __init__(self, outputs: ReconOutputs, labels: list[str], every: int) -> None:
        self.outputs, self.labels, self.every = outputs, labels, every

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if module.runs_to_completion or step % self.every:
            return
        images = from_caffe(module(), module.encoder.mean_bgr)
        for label, image in zip(self.labels, images, strict=True):
            path = self.outputs.dir / "snapshots" / label / f"{step:05d}.png"
            save_png(Image.fromarray(display_image(image)), path)
