"""Bad-input catalogue: each case is one bad input given to the real entry point
(``python train_recon.py ...``, many commands per interpreter via ``run_many``).

Every case checks what the user gets: a non-zero exit, one message that names the file or
key and says how to fix it, no traceback, and the image that an earlier run finished left
byte-for-byte and mtime-for-mtime as it was. The inputs are three images in the lab's
bdpy layout (conv1 features at 64x64): ``img_a`` is finished before the run, ``img_b``
carries the defect, ``img_c`` is fine. Exit codes:

* 2: stopped before any reconstruction (bad setting, data tree, weights, output dir);
* 1: the bad image was reported and skipped, the others finished, failures listed at the
  end (Hydra's own errors, such as an unknown config option, also exit 1);
* 0: the "must work" inputs at the end of the catalogue.

``python tests/test_bad_input_catalogue.py`` runs the catalogue and prints one line per
case with the message the user sees. Cases tested end to end elsewhere are listed in
``ELSEWHERE``, not run twice.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hdf5storage
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from pipeline_helpers import (
    CONV1,
    SIZE,
    TINY,
    many_results,
    output_of,
    start_many,
    tiny_net,
    with_defaults,
    write_decoded_bdpy,
    write_images,
    write_std_ref,
)

pytestmark = pytest.mark.slow

LABELS = ("img_a", "img_b", "img_c")
FINISHED, BAD, GOOD = LABELS
COMMON = [*TINY, "method=icnn_gd", "layers=conv1", "logger=csv"]
BASE = {
    "decoded": [*COMMON, "data=decoded", "data.root={dec}", "data.std_ref={std}"],
    "images": [*COMMON, "data=true_features", "data.root={images}"],
}
SUBJECT = {"decoded": "sub-01", "images": "true_features"}


# -- writing the defects -------------------------------------------------------------------
def feat_file(dec: Path, label: str = BAD, layer: str = "conv1_1") -> Path:
    return dec / layer / "sub-01" / "VC" / "decoded_features" / f"{label}.mat"


def rewrite_feat(dec: Path, change: Callable[[np.ndarray], np.ndarray],
                 layer: str = "conv1_1") -> None:
    path = feat_file(dec, layer=layer)
    scipy.io.savemat(path, {"feat": change(scipy.io.loadmat(path)["feat"])})


def set_first(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(a: np.ndarray) -> np.ndarray:
        a.flat[0] = value
        return a
    return change


def truncate(path: Path, keep: int = 4000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def as_v73_truncated(dec: Path) -> None:
    path = feat_file(dec)
    feat = scipy.io.loadmat(path)["feat"]
    path.unlink()  # hdf5storage appends to an existing file
    hdf5storage.savemat(str(path), {"feat": feat}, format="7.3")
    truncate(path)


def two_folds(dec: Path) -> None:
    for layer in CONV1:
        roi = dec / layer / "sub-01" / "VC"
        for fold in ("cv-fold1", "cv-fold2"):
            shutil.copytree(roi / "decoded_features", roi / fold / "decoded_features")
        shutil.rmtree(roi / "decoded_features")


def write_text(name: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / name).write_text(text)


def act_range(values: list[str]) -> Callable[[Path], None]:
    return write_text("act_range.txt", " ".join(values) + "\n")


def std_file(**stds: float) -> Callable[[Path], None]:
    return lambda root: scipy.io.savemat(root / "std.mat", {k: np.float64(v)
                                                             for k, v in stds.items()})


def other_arch_weights(root: Path) -> None:
    torch.save(tiny_net(0).state_dict(), root / "other_arch.pt")


def truncated_weights(root: Path) -> None:
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, root / "vgg19.pt")
    truncate(root / "vgg19.pt", keep=200)


def png(root: Path, name: str, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array, mode).save(root / "images" / name)


def non_rgb_images(root: Path) -> None:
    shutil.rmtree(root / "images")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    png(root, "gray.png", gray)
    png(root, "rgba.png", rng.integers(0, 256, (40, 40, 4), dtype=np.uint8))
    Image.fromarray(gray).convert("P").save(root / "images" / "palette.png")
    png(root, "gray16.png", (gray.astype(np.uint16) * 257))
    Image.fromarray(gray).convert("CMYK").save(root / "images" / "cmyk.jpg")


def read_only_dir(root: Path) -> None:
    (root / "ro").mkdir()
    (root / "ro").chmod(0o555)


# -- the catalogue ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    what: str  # the bad input, in words
    args: tuple[str, ...]  # overrides; {dec} {images} {std} {in} {run} are filled in
    names: str  # what the message must name (a file, key or value), same placeholders
    code: int = 2
    make: Callable[[Path], None] | None = None  # writes the defect into the case's inputs
    data: str = "decoded"
    hydra: bool = False  # Hydra's own message (lists the options, no "fix:" line)


def case(what: str, *args: str, names: str, **kw: Any) -> Case:
    return Case(what, args, names, **kw)


CASES: dict[str, Case] = {
    # data tree (decoded features, bdpy layout)
    "subject_absent": case("subject with no features", "subject=7", names="sub-07"),
    "roi_absent": case("ROI with no features", "roi=V1", names="V1"),
    "layer_absent": case("layer with no features", "layers=conv1-3",
                         "data.std_correction=none", "data.std_ref=null", names="conv2_1"),
    "layer_partial": case("a layer present for some images but not others",
                          names="conv1_2 lacks img_b",
                          make=lambda r: feat_file(r / "decoded", layer="conv1_2").unlink()),
    "fold_absent": case("unknown fold", "data.fold=cv-fold9", names="cv-fold9"),
    "folds_ambiguous": case("several folds and none chosen", names="data.fold",
                            make=lambda r: two_folds(r / "decoded")),
    "labels_absent": case("a label with no features", "data.labels=[img_x]", names="img_x"),
    "std_ref_missing_layer": case("reference-std file without a target layer",
                                  "data.std_ref={in}/std.mat", names="conv1_2",
                                  make=std_file(conv1_1=3.0)),
    "std_ref_zero": case("reference std of 0", "data.std_ref={in}/std.mat", names="conv1_2",
                         make=std_file(conv1_1=3.0, conv1_2=0.0)),
    "std_ref_not_mat": case("reference-std file that is not a .mat",
                            "data.std_ref={in}/std.mat", names="{in}/std.mat",
                            make=write_text("std.mat", "conv1_1 3.0\n")),
    # feature files: the bad image is skipped, the others finish (exit 1)
    "mat_without_feat": case(".mat without `feat`", code=1, names=str(feat_file(Path("{dec}"))),
                             make=lambda r: scipy.io.savemat(feat_file(r / "decoded"),
                                                             {"x": np.zeros(3)})),
    "mat_not_a_mat": case("corrupt .mat (not a MATLAB file)", code=1,
                          names=str(feat_file(Path("{dec}"))),
                          make=lambda r: feat_file(r / "decoded").write_bytes(b"junk" * 99)),
    "mat_truncated_v5": case("truncated .mat (v5)", code=1, names=str(feat_file(Path("{dec}"))),
                             make=lambda r: truncate(feat_file(r / "decoded"))),
    "mat_truncated_v73": case("truncated .mat (v7.3 / HDF5)", code=1,
                              names=str(feat_file(Path("{dec}"))),
                              make=lambda r: as_v73_truncated(r / "decoded")),
    "features_nan": case("NaN in the features", code=1, names=str(feat_file(Path("{dec}"))),
                         make=lambda r: rewrite_feat(r / "decoded", set_first(np.nan))),
    "features_inf": case("inf in the features", code=1, names=str(feat_file(Path("{dec}"))),
                         make=lambda r: rewrite_feat(r / "decoded", set_first(np.inf))),
    "features_nan_fail_fast": case("NaN in the features, fail_fast=true (stop at the first)",
                                   "fail_fast=true", names=str(feat_file(Path("{dec}"))),
                                   make=lambda r: rewrite_feat(r / "decoded", set_first(np.nan))),
    "feature_shape_one_image": case("one image's features of another shape (fc vector)",
                                    code=1, names=str(feat_file(Path("{dec}"), layer="conv1_2")),
                                    make=lambda r: rewrite_feat(
                                        r / "decoded", lambda a: np.ones((1, 100), np.float32),
                                        layer="conv1_2")),
    "feature_shape_network": case("features made at another input size than the network's",
                                  "network.input_size=[32,32]", names="network.input_size"),
    "target_all_zero": case("all-zero target with inverse-norm layer weights", code=1,
                            names="layer conv1_2 is all zeros for image(s) ['img_b']",
                            make=lambda r: rewrite_feat(r / "decoded", np.zeros_like,
                                                        layer="conv1_2")),
    # weights and generator files
    "weights_other_arch": case("network weights of another architecture",
                               "network.weights={in}/other_arch.pt", names="{in}/other_arch.pt",
                               make=other_arch_weights),
    "generator_weights_other_arch": case("generator weights of another architecture",
                                         "method=icnn_dgn_gd",
                                         "generator.weights={in}/other_arch.pt",
                                         names="'relu7' architecture", make=other_arch_weights),
    "weights_truncated": case("truncated weight file", "network.weights={in}/vgg19.pt",
                              names="{in}/vgg19.pt", make=truncated_weights),
    "act_range_negative": case("act_range with a negative value", "method=icnn_dgn_gd",
                               "generator.act_range={in}/act_range.txt",
                               names="{in}/act_range.txt: value 4096 is negative",
                               make=act_range(["1"] * 4095 + ["-1"])),
    "act_range_not_numbers": case("act_range with text", "method=icnn_dgn_gd",
                                  "generator.act_range={in}/act_range.txt",
                                  names="{in}/act_range.txt: value 3",
                                  make=act_range(["1", "2", "abc"])),
    # image folders (data=true_features)
    "images_empty": case("empty image folder", "data.root={in}/empty", names="{in}/empty",
                         data="images", make=lambda r: (r / "empty").mkdir()),
    "image_unreadable": case("unreadable image", data="images", code=1,
                             names="{images}/img_b.png",
                             make=lambda r: (r / "images" / "img_b.png").write_bytes(b"no")),
    "image_tiny": case("tiny image (2x2)", data="images", code=1, names="{images}/img_b.png",
                       make=lambda r: png(r, "img_b.png", np.zeros((2, 2, 3), np.uint8))),
    "stimuli_absent": case("stimulus folder that does not exist", "data.stimuli={in}/none",
                           names="data.stimuli"),
    # config values: an unknown option of each group (method: test_pipeline_run BAD) ...
    **{f"unknown_{group}": case(f"unknown {group} option", f"{group}=bogus", code=1, hydra=True,
                                names=f"Could not find '{group}/bogus'")
       for group in ("optimizer", "network", "generator", "layers", "layer_weights", "data",
                     "logger", "trainer", "experiment")},
    # ... and values inside the groups
    "layer_weights_mode": case("unknown layer weighting", "layer_weights.mode=bogus",
                               names="layer_weights.mode"),
    "method_init": case("unknown initial image", "method.init=bogus", names="method.init"),
    "method_loss_type": case("unknown loss", "method.loss_type=l3", names="method.loss_type"),
    "network_input_size": case("input size not [h, w]", "network.input_size=[64]",
                               names="network.input_size"),
    "network_too_small": case("input size too small for VGG19", "network.input_size=[8,8]",
                              names="8x8 input"),
    "network_mean": case("image mean not three numbers", "network.mean_bgr=[104,117]",
                         names="network.mean_bgr"),
    "network_arch": case("unknown network architecture", "network.arch=resnet50",
                         names="resnet50"),
    "seed_not_int": case("seed not an integer", "seed=abc", names="seed"),
    "generator_bounds": case("generator bounds not a range", "method=icnn_dgn_gd",
                             "generator.upper=-1", names="generator"),
    "trainer_accelerator": case("unknown accelerator", "trainer.accelerator=tpu9",
                                names="trainer.accelerator"),
    "trainer_gpu_without_gpu": case("trainer=gpu on a machine without a GPU", "trainer=gpu",
                                    names="trainer.accelerator=gpu"),
    "trainer_precision": case("unknown precision", "trainer.precision=bogus",
                              names="trainer.precision"),
    "optimizer_target": case("optimizer class that does not exist",
                             "optimizer.factory._target_=torch.optim.Bogus",
                             names="optimizer.factory"),
    "logger_kind": case("unknown logger kind", "logger.kind=mlflow", names="mlflow"),
    "subject_not_an_id": case("subject that is not a subject id", "subject=0", names="subject"),
    # output directory
    "output_not_creatable": case("output directory that cannot be created (parent is a file)",
                                 "hydra.run.dir={in}/notes.txt/run", names="{in}/notes.txt/run",
                                 make=write_text("notes.txt", "a file, not a directory\n")),
    "output_read_only": case("read-only output directory", "hydra.run.dir={in}/ro",
                             names="{in}/ro", make=read_only_dir),
    # must work (exit 0)
    "images_non_rgb": case("grayscale, RGBA, palette, 16-bit and CMYK images", data="images",
                           code=0, names="", make=non_rgb_images),
    "finished_output_corrupt": case("an unreadable finished .mat in the run directory",
                                    code=0, names="{run}/sub-01/VC/recon_image-img_b.mat"),
}

# Cases tested end to end by other tests (not run twice).
ELSEWHERE = {
    "data_root_missing": "test_pipeline_run.py::test_bad_config_fails_early[decoded_missing_root]",
    "data_root_unset": "test_pipeline_run.py::test_bad_config_fails_early[decoded_without_root]",
    "unknown_method": "test_pipeline_run.py::test_bad_config_fails_early[unknown_method]",
    "unknown_layer": "test_pipeline_run.py::test_bad_config_fails_early[unknown_layer]",
    "n_iter_zero": "test_pipeline_run.py::test_bad_config_fails_early[n_iter_zero]",
    "n_iter_negative": "test_pipeline_run.py::test_bad_config_fails_early[n_iter_negative]",
    "negative_lr": "test_pipeline_run.py::test_bad_config_fails_early[negative_lr]",
    "scalar_lr": "test_pipeline_run.py::test_bad_config_fails_early[scalar_lr]",
    "weights_missing": "test_pipeline_run.py::test_bad_config_fails_early[missing_weights]",
    "act_range_length": "test_pipeline_run.py::test_bad_config_fails_early[short_act_range]",
    "demo_subject_absent":
        "test_pipeline_run.py::test_bad_config_fails_early[subject_without_data]",
    "std_correction": "test_pipeline_run.py::test_bad_config_fails_early[bad_std_correction]",
    "wandb_mode": "test_pipeline_run.py::test_bad_config_fails_early[bad_logger_mode]",
    "limit_zero": "test_pipeline_run.py::test_bad_config_fails_early[limit_zero]",
    "centered_without_mean":
        "test_pipeline_run.py::test_bad_config_fails_early[centered_without_mean]",
    "path_spaces_unicode (must work)":
        "test_paths.py::test_run_dir_and_data_root_with_spaces_and_unicode",
}


# -- running it ------------------------------------------------------------------------------
def make_inputs(base: Path) -> dict[str, Path]:
    """The good inputs shared by every case."""
    inputs = {"dec": base / "decoded", "images": base / "images",
              "std": write_std_ref(base / "std.mat")}
    write_decoded_bdpy(inputs["dec"], "sub-01", "VC", LABELS)
    write_images(inputs["images"], [FINISHED, GOOD])
    png(base, f"{BAD}.png", np.asarray(Image.open(inputs["images"] / f"{GOOD}.png")))
    return inputs


def finish_image(run_dir: Path, subject: str) -> Path:
    """``img_a`` as an earlier run left it."""
    from icnn_pl.pipeline.outputs import ReconOutputs

    out = ReconOutputs(run_dir, subject, "VC")
    image = np.random.default_rng(7).uniform(0, 255, (SIZE, SIZE, 3))
    out.write(FINISHED, image, np.array([3.0, 2.0]))
    return out.mat_path(FINISHED)


@dataclass
class Prepared:
    args: list[str]
    paths: dict[str, str]  # placeholder -> path
    finished: Path | None  # img_a's file, written before the run
    before: tuple[bytes, int] | None


def prepare(name: str, c: Case, inputs: dict[str, Path], base: Path) -> Prepared:
    """The case's own inputs (a copy of the good ones with the defect) and run dir."""
    root = base / name
    root.mkdir()
    paths = {k: str(v) for k, v in inputs.items()}
    paths.update({"in": str(root), "run": str(root / "run")})
    if c.make is not None:
        key = "dec" if c.data == "decoded" else "images"
        shutil.copytree(inputs[key], root / Path(paths[key]).name)
        paths[key] = str(root / Path(paths[key]).name)
        c.make(root)
    args = with_defaults(BASE[c.data], ["hydra.run.dir={run}", *c.args])
    args = [a.format(**paths) for a in args]
    finished = before = None
    if not any(a.startswith("hydra.run.dir=") and a != f"hydra.run.dir={paths['run']}"
               for a in args):
        finished = finish_image(root / "run", SUBJECT[c.data])
        before = (finished.read_bytes(), finished.stat().st_mtime_ns)
    if name == "finished_output_corrupt":
        (root / "run" / "sub-01" / "VC" / f"recon_image-{BAD}.mat").write_bytes(b"half a file")
    return Prepared(args, paths, finished, before)


def run_catalogue(base: Path, names: list[str] | None = None, interpreters: int = 2
                  ) -> dict[str, tuple[Prepared, dict[str, Any]]]:
    """Prepare and run the cases (``interpreters`` interpreters side by side)."""
    names = list(CASES) if names is None else names
    inputs = make_inputs(base / "inputs")
    prepared = {n: prepare(n, CASES[n], inputs, base) for n in names}
    parts = [p for p in (names[i::interpreters] for i in range(interpreters)) if p]
    started = [start_many([prepared[n].args for n in part], 600) for part in parts]
    try:
        results = [r for run in started for r in many_results(run)]
    finally:  # one failed: do not leave the others running
        for run in started:
            if run.proc.poll() is None:
                run.proc.kill()
    order = [n for part in parts for n in part]
    return {n: (prepared[n], res) for n, res in zip(order, results, strict=True)}


_ERROR = re.compile(r"^(?:\[[^\]]*\]\[[^\]]*\]\[ERROR\] - |\[ERROR\] )(.*)$")


def user_message(text: str) -> str:
    """The message a user reads: our error lines with their fix, or Hydra's own error."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        m = _ERROR.match(line)
        if m:
            msg = m.group(1)
            if i + 1 < len(lines) and lines[i + 1].startswith("  fix:"):
                msg += " | " + lines[i + 1].strip()
            found.append(msg)
    if found:
        return " // ".join(found)
    for i, line in enumerate(lines):
        if "Could not find" in line or line.startswith("Error"):
            options = []
            for x in lines[i + 3:]:  # after a blank line and "Available options in ..."
                if not x.startswith("\t"):  # the options end where the search path starts
                    break
                options.append(x.strip())
            return line.strip() + (f" | options: {', '.join(options)}" if options else "")
    return next((x for x in reversed(lines) if x.strip()), "")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """Every case, once for the module, in one interpreter (pytest-xdist runs another test
    file beside it; ``python tests/test_bad_input_catalogue.py`` uses two)."""
    return run_catalogue(tmp_path_factory.mktemp("catalogue"), interpreters=1)


def outputs_dir(p: Prepared, c: Case) -> Path:
    return Path(p.paths["run"]) / SUBJECT[c.data] / "VC"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(catalogue, name):
    c = CASES[name]
    p, res = catalogue[name]
    text = output_of(res)
    if name == "output_read_only" and os.access(p.paths["in"] + "/ro", os.W_OK):
        pytest.skip("running as root: a read-only directory is writable (see output_not_creatable)")
    if name == "trainer_gpu_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert res["code"] == c.code, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    if p.before is not None:  # the image finished earlier: not rewritten, not touched
        assert (p.finished.read_bytes(), p.finished.stat().st_mtime_ns) == p.before
    out = outputs_dir(p, c)
    if c.code == 0:
        return check_works(name, p, out, text)
    message = user_message(text)
    assert c.names.format(**p.paths) in message, message
    assert ("Available options in" in text) if c.hydra else ("| fix: " in message), message
    if c.code == 2:  # stopped before any work: one message, nothing new in the run dir
        assert text.count("ERROR]") == 1, text[-4000:]
        new = sorted(q.name for q in out.glob("recon_image-*") if FINISHED not in q.name) \
            if out.is_dir() else []
        assert new == [] and "final loss" not in text, new
        assert not Path(p.paths["run"], "results.csv").exists()
    elif not c.hydra:  # the bad image is reported and skipped; the others finish
        assert (out / f"recon_image-{GOOD}.mat").is_file()
        assert not (out / f"recon_image-{BAD}.mat").exists()
        assert f"image {BAD} failed: " in message and f"1 image(s) failed: {BAD}" in message
        assert f"FAILED {BAD}: " in text


def check_works(name: str, p: Prepared, out: Path, text: str) -> None:
    assert "ERROR]" not in text, text[-4000:]
    if name == "images_non_rgb":
        mats = sorted(q.name for q in out.glob("recon_image-*.mat") if FINISHED not in q.name)
        assert len(mats) == 5, mats
    else:  # the unreadable finished file was redone, with a warning naming it
        assert f"cannot read {out}/recon_image-{BAD}.mat" in text
        assert scipy.io.loadmat(out / f"recon_image-{BAD}.mat")["recon_image"].shape == (
            SIZE, SIZE, 3)


def test_catalogue_is_large_enough_and_its_cross_references_exist():
    failing = [n for n, c in CASES.items() if c.code != 0]
    assert len(failing) + len(ELSEWHERE) >= 25 and len(failing) >= 25
    # a failing case names what the message must contain ("" would match any message)
    assert [n for n in failing if not CASES[n].names] == []
    # each case listed as tested elsewhere is not run here too, and that test exists (with
    # that parameter): a renamed or dropped test would silently leave the case untested
    assert not set(ELSEWHERE) & set(CASES)
    for where in ELSEWHERE.values():
        file, test = where.split("::")
        func, _, param = test.partition("[")
        module = importlib.import_module(Path(file).stem)
        assert callable(getattr(module, func, None)), where
        if param:
            values = [v for m in getattr(module, func).pytestmark if m.name == "parametrize"
                      for v in m.args[1]]
            assert param.removesuffix("]") in values, where


if __name__ == "__main__":  # print the catalogue: case | input | exit | message
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = run_catalogue(Path(tmp), sys.argv[1:] or None)
        for name, (_, res) in runs.items():
            msg = user_message(output_of(res)).replace(tmp, "<tmp>")
            print(f"{name} | {CASES[name].what} | exit {res['code']} | {msg}")
    for name, where in ELSEWHERE.items():
        print(f"{name} | tested in {where}")
