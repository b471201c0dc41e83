"""Named feature taps on any ``nn.Module``, with an early stop after the deepest target.

``FeatureEncoder`` wraps a frozen network and a mapping ``feature name -> module path``.
A call returns the outputs of the requested modules by name and stops the forward pass
as soon as the last of them has run, so layers after the deepest target cost nothing.
Hooks exist only during a call, so nothing leaks across reconstructions and a user's
module is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from icnn_pl.errors import ConfigError


class _StopForward(Exception):
    """Raised by the hook of the last requested layer to end the forward pass early."""


class FeatureEncoder(nn.Module):
    """A frozen network read out at named layers.

    Args:
        net: any module; it is put in eval mode with gradients off, and in-place
            activations are made out-of-place (an in-place ReLU would overwrite the
            pre-ReLU features a hook has just captured).
        layer_mapping: feature name -> module path (``{"conv1_1": "features.0"}``).
            Module paths themselves are accepted as names too.
        mean_bgr: mean pixel of the network's input space (BGR, 0-255).
        input_size: (H, W) the network expects.
    """

    def __init__(
        self,
        net: nn.Module,
        layer_mapping: Mapping[str, str] | None = None,
        mean_bgr: Sequence[float] = (104.0, 117.0, 123.0),
        input_size: tuple[int, int] = (224, 224),
    ) -> None:
        super().__init__()
        self.net = freeze(net)
        for m in self.net.modules():
            if getattr(m, "inplace", False):
                m.inplace = False
        self.layer_mapping = dict(layer_mapping or {})
        self.mean_bgr = tuple(float(v) for v in mean_bgr)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self._layers: tuple[str, ...] = ()
        self._order_cache: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._shape_cache: dict[str, tuple[int, ...]] = {}
        self.eval()

    # -- names -------------------------------------------------------------------------
    @property
    def known_layers(self) -> list[str]:
        """Feature names this encoder knows (mapping keys)."""
        return list(self.layer_mapping)

    def module_path(self, name: str) -> str:
        """Module path of a feature name; unknown names fail with the list of valid ones."""
        if name in self.layer_mapping:
            return self.layer_mapping[name]
        modules = dict(self.net.named_modules())
        if name in modules and name != "":
            return name
        known = ", ".join(self.known_layers) or "(no layer mapping given)"
        raise ConfigError(
            f"unknown layer {name!r}: the encoder has no feature or module of that name",
            f"use one of: {known}; or a module path of the network",
        )

    def forward_order(self, names: Iterable[str]) -> tuple[str, ...]:
        """``names`` sorted in the order the network computes them (probed once, cached)."""
        names = tuple(dict.fromkeys(names))
        for n in names:
            self.module_path(n)  # unknown names fail here with the list of valid ones
        key = tuple(sorted(names))
        if key not in self._order_cache:
            order: list[str] = []
            probe = torch.zeros(1, 3, *self.input_size, device=self.device)
            try:
                with torch.no_grad():
                    captured = self._run(probe, names, stop_after=None, on_call=order.append)
            except Exception as exc:
                raise ConfigError(
                    f"the network does not run on a {self.input_size[0]}x{self.input_size[1]}"
                    f" input: {type(exc).__name__}: {exc}",
                    "set network.input_size (input_size=) to the size the target features"
                    " were computed at, usually [224,224] (VGG19 needs at least 32x32)",
                ) from exc
            self._shape_cache.update({n: tuple(t.shape[1:]) for n, t in captured.items()})
            missing = [n for n in names if n not in order]
            if missing:
                raise ConfigError(
                    f"layers {missing} are never computed by the network's forward pass",
                    "check the layer mapping: the module path must be used in forward()",
                )
            self._order_cache[key] = tuple(order)
        return self._order_cache[key]

    def feature_shapes(self, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """Per-image feature shape of each named layer, e.g. (64, 224, 224) or (4096,)."""
        names = list(names)
        if any(n not in self._shape_cache for n in names):
            self._order_cache.pop(tuple(sorted(set(names))), None)
            self.forward_order(names)
        return {n: self._shape_cache[n] for n in names}

    @property
    def device(self) -> torch.device:
        p = next(self.net.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # -- forward -----------------------------------------------------------------------
    def set_layers(self, names: Sequence[str]) -> None:
        """Choose the layers ``forward`` returns (validated and put in forward order)."""
        self._layers = self.forward_order(names)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of ``image`` (B, 3, H, W, Caffe space) at the layers set by ``set_layers``;
        the pass stops after the deepest of them."""
        if not self._layers:
            raise ConfigError("no target layers set on the encoder", "call set_layers(names) first")
        return self._run(image, self._layers, stop_after=self._layers[-1])

    # -- hooks -------------------------------------------------------------------------
    def _run(self, image: torch.Tensor, names: Sequence[str], stop_after: str | None,
             on_call: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
        """One pass with taps on ``names``. The hooks live only for this call, so nothing
        is left on the network (no leak across reconstructions, a user's module stays
        usable); registering ~20 hooks costs microseconds next to the pass itself."""
        captured: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            def hook(_m, _inp, output):
                captured[name] = output
                if on_call is not None:
                    on_call(name)
                if name == stop_after:
                    raise _StopForward

            return hook

        handles = [self.net.get_submodule(self.module_path(n)).register_forward_hook(
            make_hook(n)) for n in names]
        try:
            with contextlib.suppress(_StopForward):
                self.net(image)
        finally:
            for h in handles:
                h.remove()
        return captured

    def train(self, mode: bool = True) -> FeatureEncoder:
        # Frozen: stays in eval mode (dropout off) whatever a trainer asks.
        return super().train(False)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the networks are fixed priors, never trained."""
    module.eval()
    module.requires_grad_(False)
    return module
