"""The reconstruction as a ``LightningModule``: one image (or a batch) per module.

Data flow of one iteration::

    parameter (pixels, or generator code) -> [generator -> crop] -> image
    -> encoder taps (stops after the deepest target) -> objective (weighted per-layer
    losses) -> backward -> update (optimizer + iCNN steps, or L-BFGS-B)

The only trainable tensor is ``self.param.value``. The frozen encoder and generator are
held by reference (not registered as submodules): they are built once per job and shared
by every reconstruction, and Lightning would otherwise move them back to the CPU at the
end of every fit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch

from icnn_pl.engine import interrupt
from icnn_pl.engine.icnn_steps import GDSteps
from icnn_pl.engine.lbfgsb import check_one_problem, check_transforms, runs_to_completion
from icnn_pl.engine.objective import Objective
from icnn_pl.engine.params import GeneratorCode, Parameterization
from icnn_pl.engine.schedules import Linear, apply_schedules
from icnn_pl.engine.seeds import image_generators
from icnn_pl.image import from_caffe
from icnn_pl.nets.encoder import FeatureEncoder

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass
class ReconResult:
    """What a reconstruction returns, per image of the batch."""

    images: np.ndarray  # (B, H, W, 3) RGB float32, 0-255 scale, not clipped
    loss_history: np.ndarray  # (B, n_evals) float32: before each update / per evaluation
    codes: np.ndarray | None  # (B, D) final generator code (DGN methods)
    n_evals: int
    stop_reason: str = ""  # why the optimiser stopped: scipy's message, or the budget


class Reconstruction(pl.LightningModule):
    """Reconstruct images whose encoder features match the objective's targets.

    Args:
        param: what is optimised (``PixelImage`` or ``GeneratorCode``).
        encoder: frozen ``FeatureEncoder``.
        objective: targets, layer weights, masks and loss type.
        optimizer: factory ``(params, **kw) -> Optimizer``; an optimizer with
            ``runs_to_completion`` (L-BFGS-B) runs the whole minimisation in one step.
        n_iter: iterations (gradient methods) or ``maxiter`` (L-BFGS-B, set on its factory).
        schedules: per-iteration linear schedules of optimizer hyper-parameters (lr, momentum).
        steps: the iCNN per-iteration operations (normalisation, decay, blur, ...).
        return_last_forward: return the image of the last forward pass (before the final
            update) and the code that produced it, as the reference DGN-GD does.
        labels: image names, used as logging keys.
        seed: the job seed: image i's random moves (jitter offsets, random transforms)
            come from its own generator, seeded from this seed and ``labels[i]``.
        transforms: ``(image, rngs) -> image`` the encoder sees instead of the image
            (``RandomTransforms``: transformation robustness); the result is untransformed.
    """

    def __init__(
        self,
        param: Parameterization,
        encoder: FeatureEncoder,
        objective: Objective,
        optimizer: OptimizerFactory,
        n_iter: int,
        schedules: Mapping[str, Linear] | None = None,
        steps: GDSteps | None = None,
        return_last_forward: bool = False,
        labels: Sequence[str] | None = None,
        seed: int = 0,
        transforms: Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]
        | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.param = param
        self.objective = objective
        self._encoder = (encoder,)
        self._optimizer_factory = optimizer
        self._completes = runs_to_completion(optimizer)
        self.n_iter = int(n_iter)
        self.schedules = dict(schedules or {})
        self.steps = steps
        if steps is not None:
            steps.check(param)
        check_one_problem(optimizer, param.value.shape[0])
        self.return_last_forward = return_last_forward
        self.labels = list(labels) if labels is not None else [
            str(i) for i in range(param.value.shape[0])]
        self._rngs = image_generators(seed, self.labels, "moves")
        self.transforms = transforms
        check_transforms(optimizer, transforms)
        self._history: list[torch.Tensor] = []
        self._last_image: torch.Tensor | None = None
        self._last_code: torch.Tensor | None = None
        self._final: ReconResult | None = None  # made at the end of training (on_train_end)
        self._stop_reason = ""  # set by a run-to-completion optimizer (scipy's message)

    @property
    def encoder(self) -> FeatureEncoder:
        return self._encoder[0]

    @property
    def runs_to_completion(self) -> bool:
        """Whether one optimizer step runs the whole minimisation (L-BFGS-B)."""
        return self._completes

    @property
    def trainer_steps(self) -> int:
        """Trainer steps: one per iteration, or one for a run-to-completion optimizer."""
        return 1 if self.runs_to_completion else self.n_iter

    @property
    def last_loss(self) -> torch.Tensor | None:
        """Loss per image (B,) of the latest evaluation (on the device), None before any."""
        return self._history[-1] if self._history else None

    # -- Lightning hooks ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # No-ops after the first image of a job: the shared nets stay on the device.
        self.encoder.to(self.device)
        if isinstance(self.param, GeneratorCode):
            self.param.generator.to(self.device)
        self.encoder.set_layers(self.objective.layers)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Box-bounded optimizers take the bounds; the others are projected after each step.
        kwargs = {"bounds": [self.param.bounds()]} if self.runs_to_completion else {}
        return self._optimizer_factory([self.param.value], **kwargs)

    def forward(self) -> torch.Tensor:
        """The current image (Caffe space) the encoder sees."""
        return self.param()

    def compute_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss per image (B,) and the image it was computed on."""
        image = self.param()
        seen = image if self.transforms is None else self.transforms(image, self._rngs)
        return self.objective(self.encoder(seen)), image

    def training_step(self, t: int, batch_idx: int = 0) -> None:
        opt = self.optimizers()
        if self.runs_to_completion:
            opt.step(closure=self._closure)
            result = getattr(opt.optimizer, "result", None)
            self._stop_reason = str(getattr(result, "message", "") or "")
        else:
            self._gradient_step(opt, int(t))
        if self.logger is None or not _logs_this_step(self.trainer):
            return
        last = self.last_loss  # self.log copies each value: only on steps that are written
        self.log_dict({f"loss/{lab}": last[i] for i, lab in enumerate(self.labels)},
                      on_step=True, logger=True, batch_size=len(self.labels))

    def _closure(self) -> torch.Tensor:
        # every iteration (and L-BFGS evaluation) starts here: where a Ctrl-C stops cleanly
        interrupt.check()
        self.param.value.grad = None
        loss, image = self.compute_loss()
        self._record(loss, image)
        total = loss.sum()
        self.manual_backward(total)
        return total

    def _gradient_step(self, opt, t: int) -> None:
        apply_schedules(opt.optimizer, self.schedules, t, self.n_iter)
        steps = self.steps
        shift = steps.shift(self.param, opt.optimizer, self._rngs) if steps else None
        self._closure()
        feature_grad = steps.transform_grad(self.param, t, self.n_iter) if steps else None
        opt.step()
        if steps is not None:
            steps.after_step(self.param, opt.optimizer, t, self.n_iter, shift, feature_grad)
        else:
            self.param.project_()

    def _record(self, loss: torch.Tensor, image: torch.Tensor) -> None:
        # Kept on the device: no host sync in the loop.
        self._history.append(loss.detach())
        if self.return_last_forward:  # float32 (under bf16-mixed the generator's is bf16)
            self._last_image = image.detach().float()
            self._last_code = self.param.value.detach().clone()

    # -- results --------------------------------------------------------------------------
    def on_train_end(self) -> None:
        # Before Lightning's teardown, which may move the module (and the code) to another
        # device than the generator's: the result is made while everything is in place.
        self._final = None
        self._final = self.result()

    @torch.no_grad()
    def result(self) -> ReconResult:
        """Final images (RGB, 0-255, unclipped), loss history and codes; after a fit, the
        result made when training ended, whatever was done to the module since."""
        if self._final is not None:
            return self._final
        if self.return_last_forward and self._last_image is not None:
            image, code = self._last_image, self._last_code
        else:
            image = self.param()
            code = self.param.value.detach() if isinstance(self.param, GeneratorCode) else None
        history = (torch.stack(self._history, dim=1) if self._history
                   else torch.zeros(image.shape[0], 0))
        return ReconResult(
            images=from_caffe(image, self.encoder.mean_bgr),
            loss_history=history.float().cpu().numpy(),
            codes=None if code is None else code.float().cpu().numpy(),
            n_evals=history.shape[1],
            stop_reason=self.stop_reason,
        )

    @property
    def stop_reason(self) -> str:
        """Why the optimisation stopped: ``interrupted`` (Ctrl-C), scipy's message for
        L-BFGS-B (e.g. ``CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL``), else
        ``iteration budget`` (gradient methods run all their iterations)."""
        trainer = self._trainer
        if trainer is not None and trainer.interrupted:
            return "interrupted"
        if self._stop_reason:
            return self._stop_reason
        return f"iteration budget ({self.n_iter} iterations)"


def _logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the Trainer writes logged values at this step (every ``log_every_n_steps``
    and at the end)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
