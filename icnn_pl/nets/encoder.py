"""Named feature taps on any ``nn.Module``, with an early stop after the deepest target.

``FeatureEncoder`` wraps a frozen network and a mapping ``feature name -> module path``.
A call returns the outputs of the requested modules by name and stops the forward pass
as soon as the last of them has run, so layers after the deepest target cost nothing.

Module paths are dotted (``features.0``) or bracketed as bdpy writes them
(``features[0]``, ``classifier[6]``). A module that returns a tuple or list (attention
blocks return ``(output, weights)``) gives its first tensor, or the element a trailing
index names when that index is not a child module: ``blocks.3.attn[1]``.

Each tapped module gets one forward hook, registered the first time the layer is used
and kept for the encoder's life (not re-registered every pass); it does nothing unless
this encoder is running, and all are removed when the encoder is garbage-collected or
``remove_hooks()`` is called, so nothing accumulates on a module reused by many encoders.

The image is always in Caffe space (BGR, 0-255, mean-subtracted), the space of every
method, clip and evaluation here; a network trained on another input (``input_space``:
``rgb_imagenet`` for torchvision models, ``rgb_127_128`` for EfficientNet-Lite, or any
channel order, range, mean and std: ``icnn_pl.nets.input_space``) gets the image converted
in the encoder's input step, one per-channel multiply-add (and a channel flip for RGB).
"""

from __future__ import annotations

import contextlib
import difflib
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from icnn_pl.errors import ConfigError, one_line
from icnn_pl.nets.input_space import INPUT_SPACES, InputSpace, affine_tensors, parse_input_space

__all__ = ["INPUT_SPACES", "FeatureEncoder", "InputSpace", "Tap", "freeze", "parse_tap"]

_PATH_TOKEN = re.compile(r"\[\s*(-?\d+)\s*\]|([^.\[\]]+)|(\.)")
# Messages of torch errors that mean the input is too small or of the wrong size.
_SIZE_ERROR = re.compile(
    r"input size|output size|kernel size|padded input|shapes cannot be multiplied|"
    r"size mismatch|must match the size|spatial|Expected .*size", re.IGNORECASE)


class _StopForward(Exception):
    """Raised by the hook of the last requested layer to end the forward pass early."""


@dataclass(frozen=True)
class Tap:
    """Where a feature is read: a module (dotted path) and indices into its output."""

    path: str
    select: tuple[int, ...] = ()


def parse_tap(net: nn.Module, spec: str) -> Tap:
    """``features[0]`` / ``features.0`` -> module ``features.0``; a trailing ``[i]`` that is
    not a child module selects element ``i`` of the output (``blocks.3.attn[0]``), except
    on containers (Sequential, ModuleList), where it must be a child."""
    parts: list[str | int] = []
    pos = 0
    for m in _PATH_TOKEN.finditer(spec):
        if m.start() != pos:
            break
        pos = m.end()
        if m.group(1) is not None:
            parts.append(int(m.group(1)))
        elif m.group(2) is not None:
            parts.append(m.group(2).strip())
    if pos != len(spec) or not parts or isinstance(parts[0], int):
        raise ConfigError(f"layer path {spec!r} is not a module path",
                          "write it as features.0 or features[0] (blocks.3.attn[0] picks an"
                          " element of a module's tuple output)")
    module, path = net, []
    for i, part in enumerate(parts):
        child = str(part)
        if child in module._modules:
            module = module._modules[child]
            path.append(child)
        elif isinstance(part, int) and all(isinstance(p, int) for p in parts[i:]) \
                and not isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            return Tap(".".join(path), tuple(int(p) for p in parts[i:]))
        else:
            return _unknown_path(net, spec)
    return Tap(".".join(path))


def _unknown_path(net: nn.Module, spec: str) -> Tap:
    paths = [n for n, _ in net.named_modules() if n]
    close = difflib.get_close_matches(spec.replace("[", ".").replace("]", ""), paths, n=5)
    hint = f"close: {', '.join(close)}" if close else f"e.g. {', '.join(paths[:6])}"
    raise ConfigError(f"the network has no module {spec!r}",
                      f"map the layer to a module path of the network ({hint}); print"
                      " dict(net.named_modules()) for all of them")


def _pick(output: object, select: tuple[int, ...], name: str) -> torch.Tensor:
    """The tensor a tap reads from a module's output."""
    for i in select:
        if not isinstance(output, tuple | list) or not -len(output) <= i < len(output):
            raise ConfigError(f"layer {name!r}: the module's output has no element [{i}]",
                              "index the tuple/list the module returns, or drop the index")
        output = output[i]
    if not select and isinstance(output, tuple | list):
        output = next((o for o in output if isinstance(o, torch.Tensor)), output)
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"layer {name!r}: the module returns {type(output).__name__}, not a"
                          " tensor", "map the layer to a module returning a tensor (or a"
                          " tuple: name the element with [i])")
    return output


@dataclass
class _Taps:
    """What this encoder's hooks read; they act only while ``active`` (one pass)."""

    wanted: dict[str, list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    active: bool = False
    stop_after: str | None = None
    on_call: Callable[[str], None] | None = None

    def hook(self, path: str) -> Callable:
        def on_output(_module: nn.Module, _inp: object, output: object) -> None:
            if not self.active:
                return
            stop = False
            for name, select in self.wanted.get(path, ()):
                self.captured[name] = _pick(output, select, name)
                if self.on_call is not None:
                    self.on_call(name)
                stop = stop or name == self.stop_after
            if stop:
                raise _StopForward

        return on_output


def _remove_handles(handles: dict) -> None:
    for h in handles.values():
        h.remove()
    handles.clear()


class FeatureEncoder(nn.Module):
    """A frozen network read out at named layers.

    Args:
        net: any module; it is put in eval mode with gradients off, and in-place
            activations are made out-of-place (an in-place ReLU would overwrite the
            pre-ReLU features a hook has just captured).
        layer_mapping: feature name -> module path (``{"conv1_1": "features.0"}``, or
            bdpy's ``features[0]``). Module paths themselves are accepted as names too.
        mean_bgr: mean pixel of the image space (BGR, 0-255): the image is Caffe space.
        input_size: (H, W) the network expects.
        input_space: what the network takes: ``"caffe_bgr"`` (the Caffe-space image, as
            VGG19 from the Caffe weights), ``"rgb_imagenet"`` (torchvision models: RGB in
            [0, 1] normalised by the ImageNet mean and std), ``"rgb_127_128"``
            (EfficientNet-Lite), a mapping ``{channels, range, mean, std}`` or an
            ``InputSpace`` (``icnn_pl.nets.input_space``).
    """

    def __init__(
        self,
        net: nn.Module,
        layer_mapping: Mapping[str, str] | None = None,
        mean_bgr: Sequence[float] = (104.0, 117.0, 123.0),
        input_size: tuple[int, int] = (224, 224),
        input_space: str | Mapping | InputSpace = "caffe_bgr",
    ) -> None:
        super().__init__()
        self.space = space = parse_input_space(input_space)
        self.net = freeze(net)
        for m in self.net.modules():
            if getattr(m, "inplace", False):
                m.inplace = False
        self.layer_mapping = dict(layer_mapping or {})
        self.mean_bgr = tuple(float(v) for v in mean_bgr)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.input_space = space.name
        self._identity_input = space.is_identity(self.mean_bgr)
        self._layers: tuple[str, ...] = ()
        self._order_cache: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._shape_cache: dict[str, tuple[int, ...]] = {}
        self._taps = _Taps()
        self._tap_of: dict[tuple[str, str | None], Tap] = {}
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._plans: dict[tuple, tuple[dict, list]] = {}
        self._space_consts: dict[tuple, tuple[torch.Tensor, ...]] = {}
        weakref.finalize(self, _remove_handles, self._handles)
        self.eval()

    # -- names -------------------------------------------------------------------------
    @property
    def known_layers(self) -> list[str]:
        """Feature names this encoder knows (mapping keys)."""
        return list(self.layer_mapping)

    def tap(self, name: str) -> Tap:
        """Module and output element of a feature name; unknown names and paths fail with
        the valid ones."""
        spec = self.layer_mapping.get(name)
        key = (name, spec)
        if key not in self._tap_of:
            if spec is None:
                modules = dict(self.net.named_modules())
                if name == "" or (name not in modules and "[" not in name):
                    known = ", ".join(self.known_layers) or "(no layer mapping given)"
                    raise ConfigError(
                        f"unknown layer {name!r}: the encoder has no feature or module of"
                        " that name", f"use one of: {known}; or a module path of the network")
                spec = name
            self._tap_of[key] = parse_tap(self.net, spec)
        return self._tap_of[key]

    def module_path(self, name: str) -> str:
        """Module path (dotted) of a feature name."""
        return self.tap(name).path

    def forward_order(self, names: Iterable[str]) -> tuple[str, ...]:
        """``names`` sorted in the order the network computes them (probed once, cached)."""
        names = tuple(dict.fromkeys(names))
        for n in names:
            self.tap(n)  # unknown names and paths fail here with the valid ones
        key = tuple(sorted(names))
        if key not in self._order_cache:
            order: list[str] = []
            probe = torch.zeros(1, 3, *self.input_size, device=self.device)
            with self._locate_failure(), torch.no_grad():
                captured = self._run(probe, names, stop_after=None, on_call=order.append)
            self._shape_cache.update({n: tuple(t.shape[1:]) for n, t in captured.items()})
            missing = [n for n in names if n not in order]
            if missing:
                raise ConfigError(
                    f"layers {missing} are never computed by the network's forward pass",
                    "check the layer mapping: the module path must be used in forward()",
                )
            self._order_cache[key] = tuple(order)
        return self._order_cache[key]

    @contextlib.contextmanager
    def _locate_failure(self):
        """Turn an error of the probing pass into one naming the module that raised it and
        the original message; torch's size errors are blamed on the input size."""
        stack: list[str] = []  # modules entered and not yet left

        def enter(name: str) -> Callable:
            def pre_hook(*_: object) -> None:
                stack.append(name)
            return pre_hook

        def leave(*_: object) -> None:
            stack.pop()

        handles = []
        for name, m in self.net.named_modules():
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
        try:
            yield
        except ConfigError:
            raise
        except Exception as exc:
            where = stack[-1] if stack else ""
            module = self.net.get_submodule(where) if where else self.net
            at = f"in module {where or '(the whole network)'!r} ({type(module).__name__})"
            what = one_line(exc)
            h, w = self.input_size
            if _SIZE_ERROR.search(str(exc)):
                raise ConfigError(
                    f"the network does not run on a {h}x{w} input {at}: {what}",
                    "set network.input_size (input_size=) to the size the target features"
                    " were computed at, usually [224,224] (VGG19 needs at least 32x32)",
                ) from exc
            raise ConfigError(
                f"running the network on a 1x3x{h}x{w} probe failed {at}: {what}",
                "check the network (network.module and its arguments, the weights) and that"
                " its forward() takes one image tensor",
            ) from exc
        finally:
            for handle in handles:
                handle.remove()

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

    def network_input(self, image: torch.Tensor) -> torch.Tensor:
        """The Caffe-space image as the network takes it (see ``input_space``)."""
        if self._identity_input:
            return image
        key = (image.device, image.dtype)
        if key not in self._space_consts:  # made once per device (no copy every pass)
            self._space_consts[key] = affine_tensors(self.space, self.mean_bgr, image)
        scale, shift = self._space_consts[key]
        x = torch.addcmul(shift, image, scale)
        return x.flip(1) if self.space.channels == "rgb" else x

    # -- hooks -------------------------------------------------------------------------
    def _run(self, image: torch.Tensor, names: Sequence[str], stop_after: str | None,
             on_call: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
        """One pass reading ``names``. The hooks stay registered between passes (one per
        tapped module); only what they read changes."""
        taps = self._taps
        key = (tuple(names), tuple(self.layer_mapping.get(n) for n in names))
        plan = self._plans.get(key)
        if plan is None or any(h.id not in m._forward_hooks for m, h in plan[1]):
            plan = self._plans[key] = self._plan(names)
        wanted, hooked = plan
        for module, handle in hooked:
            hooks = module._forward_hooks
            if next(reversed(hooks)) != handle.id:
                # ours runs after any hook added since (as one registered for this pass
                # would): a hook of the user's on the deepest layer still sees its output
                hooks.move_to_end(handle.id)
        taps.wanted, taps.stop_after, taps.on_call = wanted, stop_after, on_call
        taps.captured, taps.active = {}, True
        try:
            with contextlib.suppress(_StopForward):
                self.net(self.network_input(image))
            return taps.captured
        finally:
            taps.active, taps.captured, taps.on_call = False, {}, None

    def _plan(self, names: Sequence[str]) -> tuple[dict, list]:
        """What the hooks read for ``names`` (module path -> names and output indices),
        and the tapped modules with their hooks, registered here the first time."""
        wanted: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        for n in names:
            tap = self.tap(n)
            wanted.setdefault(tap.path, []).append((n, tap.select))
        hooked = []
        for path in wanted:
            module = self.net.get_submodule(path) if path else self.net
            handle = self._handles.get(path)
            if handle is None or handle.id not in module._forward_hooks:
                handle = self._handles[path] = module.register_forward_hook(self._taps.hook(path))
            hooked.append((module, handle))
        return wanted, hooked

    def remove_hooks(self) -> None:
        """Remove this encoder's hooks from the network now (they come back on next use)."""
        _remove_handles(self._handles)

    def train(self, mode: bool = True) -> FeatureEncoder:
        # Frozen: stays in eval mode (dropout off) whatever a trainer asks.
        return super().train(False)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the networks are fixed priors, never trained."""
    module.eval()
    module.requires_grad_(False)
    return module
