"""The encoder's own cost per forward pass, without the network (issue #15 item 6).

    python -m benchmarks.bench_taps --repeats 2000

VGG19 with its 19 taps: the encoder's bookkeeping around one pass (``_run`` with the
network's forward replaced by a no-op), against registering and removing 19 forward hooks,
which the encoder did on every pass before its hooks were kept for its life.
"""

from __future__ import annotations

import argparse
import time

import torch

from icnn_pl.nets import build_encoder
from icnn_pl.nets.vgg import VGG19_LAYERS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    enc = build_encoder("vgg19", input_size=(32, 32))
    names = list(VGG19_LAYERS)
    enc.set_layers(names)
    modules = [enc.net.get_submodule(enc.module_path(n)) for n in names]

    def register_and_remove() -> None:
        for h in [m.register_forward_hook(lambda *_: None) for m in modules]:
            h.remove()

    x = torch.zeros(1, 3, 32, 32)
    enc.net.forward = lambda _x: None  # the encoder's own work only
    rows = {"register + remove 19 hooks (per pass, before)": register_and_remove,
            "encoder bookkeeping per pass, hooks kept (now)":
                lambda: enc._run(x, names, stop_after=None)}
    for label, fn in rows.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        print(f"{label}: {(time.perf_counter() - t0) / args.repeats * 1e6:.1f} us")


if __name__ == "__main__":
    main()
