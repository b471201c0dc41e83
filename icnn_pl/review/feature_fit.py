"""Feature-space fit of finished reconstructions (needs the encoder, so it runs at the
end of a job): how well the reconstruction's features match the targets and, when the
true image is known, the true image's features; and identification by one layer's
features."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from icnn_pl.image import to_caffe
from icnn_pl.nets.encoder import FeatureEncoder
from icnn_pl.review.metrics import correlation_matrix, feature_identification


@torch.no_grad()
def encode(encoder: FeatureEncoder, image: np.ndarray, layers: Sequence[str]
           ) -> dict[str, np.ndarray]:
    """Flattened features of one RGB 0-255 image at ``layers``."""
    encoder.set_layers(layers)
    x = to_caffe(image, encoder.mean_bgr).to(encoder.device)
    return {n: t[0].flatten().cpu().numpy() for n, t in encoder(x).items()}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(correlation_matrix(np.ravel(a)[None], np.ravel(b)[None])[0, 0])


def image_feature_fit(
    encoder: FeatureEncoder, recon: np.ndarray, targets: Mapping[str, np.ndarray],
    true: np.ndarray | None = None, ident_layer: str | None = None,
) -> tuple[list[dict[str, float | str]], dict[str, np.ndarray]]:
    """Per-layer rows (layer, corr_target, corr_true) for one image, and its
    ``ident_layer`` features (recon, true) for identification across images."""
    layers = list(targets)
    read = list(dict.fromkeys([*layers, *([ident_layer] if ident_layer else [])]))
    rec = encode(encoder, recon, read)
    tru = encode(encoder, true, read) if true is not None else None
    rows = []
    for n in layers:
        row: dict[str, float | str] = {"layer": n, "corr_target": _corr(rec[n], targets[n])}
        if tru is not None:
            row["corr_true"] = _corr(rec[n], tru[n])
        rows.append(row)
    ident = {}
    if ident_layer and tru is not None:
        ident = {"recon": rec[ident_layer], "true": tru[ident_layer]}
    return rows, ident


def summarize_fit(rows: Sequence[Mapping[str, float | str]]) -> dict[str, float]:
    """Mean over layers: ``feat_corr_target`` and (with true images) ``feat_corr_true``."""
    out = {"feat_corr_target": float(np.nanmean([r["corr_target"] for r in rows]))}
    if rows and "corr_true" in rows[0]:
        out["feat_corr_true"] = float(np.nanmean([r["corr_true"] for r in rows]))
    return out


def identification_by_features(ident: Mapping[str, Mapping[str, np.ndarray]]
                               ) -> dict[str, float]:
    """Pairwise identification of each image among the others by its features."""
    labels = [lab for lab, v in ident.items() if v]
    if len(labels) < 2:
        return {}
    acc = feature_identification(np.stack([ident[lab]["recon"] for lab in labels]),
                                 np.stack([ident[lab]["true"] for lab in labels]))
    return dict(zip(labels, (float(a) for a in acc), strict=True))


def to_mat_vars(rows: Sequence[Mapping[str, float | str]], ident: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray | str]:
    """Feature fit of one image as variables of its ``recon_image-<label>.mat``, so a
    resumed job has it without reading the targets again."""
    out: dict[str, np.ndarray | str] = {
        "feat_layers": ",".join(str(r["layer"]) for r in rows),
        "feat_corr_target": np.array([r["corr_target"] for r in rows], dtype=np.float64),
    }
    if rows and "corr_true" in rows[0]:
        out["feat_corr_true"] = np.array([r["corr_true"] for r in rows], dtype=np.float64)
    if ident:
        out["ident_feat_recon"] = ident["recon"]
        out["ident_feat_true"] = ident["true"]
    return out


def from_mat_vars(data: Mapping[str, np.ndarray]
                  ) -> tuple[list[dict[str, float | str]], dict[str, np.ndarray]] | None:
    """The inverse of ``to_mat_vars`` (None when the file holds no feature fit)."""
    if "feat_layers" not in data:
        return None
    layers = str(np.asarray(data["feat_layers"]).ravel()[0]).split(",")
    target = np.ravel(data["feat_corr_target"])
    true = np.ravel(data["feat_corr_true"]) if "feat_corr_true" in data else None
    rows: list[dict[str, float | str]] = []
    for i, n in enumerate(layers):
        row: dict[str, float | str] = {"layer": n, "corr_target": float(target[i])}
        if true is not None:
            row["corr_true"] = float(true[i])
        rows.append(row)
    ident = {}
    if "ident_feat_recon" in data:
        ident = {"recon": np.ravel(data["ident_feat_recon"]),
                 "true": np.ravel(data["ident_feat_true"])}
    return rows, ident
