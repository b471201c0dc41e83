"""Scaling out: shards, sweeps through Hydra's submitit launcher, resume, failures, Optuna.

Fast: shard selection and directories, shards sharing one results directory (tiny
in-memory jobs), the sweep summary callback, the SLURM launcher config rendered by
submitit as an sbatch script (nothing is submitted), the Optuna search config.

Slow (real ``train_recon.py -m`` runs, tiny: VGG19 at 64x64, 2 iterations): a 2-shard
multirun through ``hydra/launcher=local`` (submitit subprocesses) that reconstructs every
image exactly once, its re-launch after one output is deleted, a sweep with a failing
job, and a 2-trial Optuna sweep; each a module-scoped fixture.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from pipeline_helpers import (
    CONF,
    TINY,
    MemorySource,
    output_of,
    run_cli,
    tiny_encoder,
    tiny_job,
    write_demo,
)

from icnn_pl.data.datamodule import select_labels
from icnn_pl.pipeline.factory import register_resolvers
from icnn_pl.pipeline.failures import JobFailed
from icnn_pl.pipeline.job import run_job
from icnn_pl.pipeline.run_dirs import results_dir, shard_dir
from icnn_pl.pipeline.sweep_summary import SweepSummary, read_records, write_sweep_summary

LABELS3 = ("astronaut", "chelsea", "coffee")  # 2 shards: [astronaut, coffee], [chelsea]


def compose_cfg(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3",
                               job_name="train_recon"):
        return compose("config", overrides=overrides, return_hydra_config=True)


# -- shards ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 9])
def test_shards_are_disjoint_deterministic_and_cover_every_image(num_shards):
    labels = [f"img{i:02d}" for i in range(7)]
    parts = [select_labels(labels, num_shards=num_shards, shard=i) for i in range(num_shards)]
    assert sorted(sum(parts, [])) == labels  # every image exactly once
    assert parts == [select_labels(labels, num_shards=num_shards, shard=i)
                     for i in range(num_shards)]
    assert all(p == labels[i::num_shards] for i, p in enumerate(parts))
    # shards apply after the explicit list and the limit
    assert select_labels(labels, ["img05", "img01", "img03"], 2, 2, 1) == ["img01"]


def test_shard_directories():
    assert shard_dir(1, 0) == "" and shard_dir(4, 2) == "/shard-2of4"
    assert results_dir("/s/job/shard-2of4", 4, 2) == Path("/s/job")
    assert results_dir("/s/job", 1, 0) == Path("/s/job")
    assert results_dir("/explicit/run", 4, 2) == Path("/explicit/run")  # hydra.run.dir=...
    cfg = compose_cfg(["method=icnn_gd", "data.num_shards=2", "data.shard=1"])
    # the shard keys are not part of the job's name: shards share its directory
    assert "data.shard" in cfg.hydra.job.config.override_dirname.exclude_keys
    assert "data.num_shards" in cfg.hydra.job.config.override_dirname.exclude_keys
    with open_dict(cfg):
        cfg.hydra.job.override_dirname = "method=icnn_gd"
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} reads it
    try:
        assert cfg.hydra.sweep.subdir == "method=icnn_gd/shard-1of2"
        assert cfg.hydra.run.dir == "outputs/method=icnn_gd/shard-1of2"
    finally:
        HydraConfig.instance().cfg = None


def test_shards_share_one_results_directory(tmp_path):
    encoder = tiny_encoder()
    labels = ["a", "b", "c", "d", "e"]
    source = MemorySource(encoder, labels)
    first = run_job(tiny_job(encoder, tmp_path, source=source,
                             data_kw={"num_shards": 2, "shard": 0}))
    assert [r["label"] for r in first.rows] == ["a", "c", "e"]
    # the last shard's tables cover every finished image of the job, other shards' too
    last = run_job(tiny_job(encoder, tmp_path, source=source,
                            data_kw={"num_shards": 2, "shard": 1}))
    assert [r["label"] for r in last.rows] == labels
    assert {r["label"] for r in last.rows if math.isnan(r["seconds"])} == {"a", "c", "e"}
    assert json.loads((tmp_path / "run_info.json").read_text())["labels"] == labels
    assert [r["label"] for r in json.loads((tmp_path / "results.json").read_text())] == labels
    assert sorted(p.name for p in (tmp_path / "sub-01" / "VC").glob("*.mat")) == [
        f"recon_image-{lab}.mat" for lab in labels]
    # only its own images were read by each shard
    assert sorted(source.reads) == labels


# -- the sweep summary -------------------------------------------------------------------------
def job_config(sweep: Path, subdir: str, overrides: list[str], num: int):
    return OmegaConf.create({"hydra": {
        "mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)}, "output_subdir": ".hydra",
        "runtime": {"output_dir": str(sweep / subdir)}, "overrides": {"task": overrides},
        "job": {"num": num, "id": f"123_{num}"}}})


def test_sweep_summary_lists_jobs_failures_and_unfinished(tmp_path):
    cb = SweepSummary()
    jobs = {"ok": (["subject=1"], JobStatus.COMPLETED, 0.42),
            "bad": (["subject=2"], JobStatus.FAILED,
                    JobFailed("1 image(s) failed", 1, {"coffee": "features are corrupt"})),
            "killed": (["subject=3"], None, None)}
    for num, (sub, (overrides, status, value)) in enumerate(jobs.items()):
        cfg = job_config(tmp_path, f"{sub}/shard-0of2", overrides, num)
        cb.on_job_start(cfg)
        if status is not None:  # "killed": started, never ended
            ret = JobReturn(overrides=overrides, status=status)
            ret._return_value = value
            cb.on_job_end(cfg, ret)
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert summary["counts"] == {"failed": 1, "completed": 1, "running": 1}
    assert summary["failed_jobs"] == ["bad__shard-0of2"]
    by_job = {j["job"]: j for j in summary["jobs"]}
    assert by_job["ok__shard-0of2"]["objective"] == 0.42
    assert by_job["ok__shard-0of2"]["dir"] == "ok/shard-0of2"
    assert by_job["bad__shard-0of2"]["failed_images"] == {"coffee": "features are corrupt"}
    assert by_job["bad__shard-0of2"]["exit_code"] == 1
    assert by_job["killed__shard-0of2"]["status"] == "running"
    md = (tmp_path / "sweep_summary.md").read_text()
    assert "coffee: features are corrupt" in md and "| running |" in md
    # a re-launch replaces a job's record
    cfg = job_config(tmp_path, "killed/shard-0of2", ["subject=3"], 2)
    cb.on_job_start(cfg)
    ret = JobReturn(overrides=["subject=3"], status=JobStatus.COMPLETED)
    ret._return_value = 0.3
    cb.on_job_end(cfg, ret)
    assert write_sweep_summary(tmp_path)["counts"] == {"failed": 1, "completed": 2}
    assert len(read_records(tmp_path)) == 3


def test_single_runs_are_not_recorded(tmp_path):
    cfg = job_config(tmp_path, "run", [], 0)
    cfg.hydra.mode = RunMode.RUN
    SweepSummary().on_job_start(cfg)
    assert not (tmp_path / "job_status").exists()


# -- SLURM: the sbatch script submitit writes ---------------------------------------------------
class _NotSubmitted(Exception):
    pass


def _task(cfg) -> None:  # never runs: nothing is submitted
    pass


def render_sbatch(tmp_path: Path, monkeypatch, overrides: list[str], n_jobs: int) -> str:
    """The sbatch script the real launcher (hydra_submitit_launcher's SlurmLauncher, built
    from the composed config) writes for an array of ``n_jobs``; ``sbatch`` is not run."""
    from submitit.slurm.slurm import SlurmExecutor

    cfg = compose_cfg(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", *overrides])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=_task, config=cfg)
    script = {}

    def submit_nothing(self, path):
        script["text"] = Path(path).read_text()
        raise _NotSubmitted

    monkeypatch.setattr(SlurmExecutor, "_make_submission_command", submit_nothing)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    with pytest.raises(_NotSubmitted):
        launcher.launch([[f"data.shard={i}"] for i in range(n_jobs)], initial_job_idx=0)
    return script["text"]


@pytest.mark.parametrize(("overrides", "n_jobs", "expected"), [
    ([], 2, ["--time=240", "--gpus-per-node=1", "--cpus-per-task=4", "--mem=32GB",
             "--array=0-1%2", "--signal=USR2@120", "--job-name=train_recon"]),
    (["hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=120",
      "hydra.launcher.gpus_per_node=2", "hydra.launcher.cpus_per_task=6",
      "hydra.launcher.mem_gb=48", "hydra.launcher.array_parallelism=3",
      "hydra.launcher.account=lab", "hydra.launcher.qos=high",
      "+hydra.launcher.additional_parameters.mail-type=END",
      "+hydra.launcher.additional_parameters.constraint=a100",
      "hydra.launcher.setup=[module load cuda]"], 5,
     ["--partition=gpu", "--time=120", "--gpus-per-node=2", "--cpus-per-task=6",
      "--mem=48GB", "--array=0-4%3", "--account=lab", "--qos=high", "--mail-type=END",
      "--constraint=a100"]),
])
def test_slurm_launcher_writes_sbatch_script(tmp_path, monkeypatch, overrides, n_jobs,
                                              expected):
    text = render_sbatch(tmp_path, monkeypatch, overrides, n_jobs)
    flags = re.findall(r"^#SBATCH (--\S+)$", text, flags=re.MULTILINE)
    for flag in expected:
        assert flag in flags, (flag, flags)
    assert "--nodes=1" in flags and "--ntasks-per-node=1" in flags
    assert not any(f.startswith("--partition") for f in flags) or overrides
    assert f"--output={tmp_path}/.submitit/%A_%a/%A_%a_0_log.out" in flags
    assert re.search(r"^srun .*-m submitit\.core\._submit", text, flags=re.MULTILINE)
    if overrides:
        assert "\n# setup\nmodule load cuda\n" in text


def test_launcher_configs_compose():
    local = compose_cfg(["hydra/launcher=local"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and local.cpus_per_task == 1
    slurm = compose_cfg(["hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.max_num_timeout == 3


# -- Optuna: the search config -------------------------------------------------------------------
def test_optuna_search_config():
    cfg = compose_cfg(["hparams_search=icnn_gd_true"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert cfg.method.name == "icnn_gd" and cfg.data.source == "true_features"
    for key in sweeper.params:  # every searched key exists (a typo would be a new key)
        assert OmegaConf.select(cfg, key) is not None, key
    lr = compose_cfg(["hparams_search=icnn_gd_true", "optimizer.schedule.lr.0=3.5"])
    assert lr.optimizer.factory.lr == 3.5 and lr.optimizer.schedule.lr[1] == 1e-10


# -- real sweeps -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("sweep-demo"), LABELS3)


def common(demo: Path) -> list[str]:
    return [*TINY, "method=icnn_gd", "data.source=true_features", f"data.root={demo}"]


@pytest.fixture(scope="module")
def failing_sweep(demo, tmp_path_factory):
    """A basic-launcher sweep of 2 jobs, the second one failing (method.n_iter=0)."""
    sweep = tmp_path_factory.mktemp("sweeps") / "failing"
    return run_cli(["-m", *common(demo), "data.limit=1", "method.n_iter=2,0", "logger=csv",
                    f"hydra.sweep.dir={sweep}"]), sweep


@pytest.fixture(scope="module")
def optuna_sweep(demo, tmp_path_factory):
    """A 2-trial Optuna sweep (basic launcher)."""
    sweep = tmp_path_factory.mktemp("sweeps") / "optuna"
    return run_cli(["-m", "hparams_search=icnn_gd_true", *common(demo), "data.limit=2",
                    "hydra.sweeper.n_trials=2", "logger=csv", f"hydra.sweep.dir={sweep}"]), sweep


@pytest.fixture(scope="module")
def sharded(demo, tmp_path_factory):
    """2 shards through submitit subprocesses (W&B offline, the default logger); then one
    output deleted and the same command launched again."""
    sweep = tmp_path_factory.mktemp("sharded") / "sweep"
    args = ["-m", "hydra/launcher=local", *common(demo), "data.limit=3",
            "data.num_shards=2", "data.shard=0,1", f"hydra.sweep.dir={sweep}"]
    # the launching shell's GPUs (none exist here: each job sees one name and uses the CPU)
    first = run_cli(args, timeout=600, env={"CUDA_VISIBLE_DEVICES": "5,7"})
    jobs = [d for d in sweep.glob("*/shard-0of2") if d.is_dir()]
    job = jobs[0].parent if jobs else sweep / "missing"
    out = job / "true_features" / "VC"
    state = {"first": first, "sweep": sweep, "job": job, "out": out,
             "logs": {i: log_text(job, i) for i in (0, 1)},
             "mats": sorted(str(p.relative_to(sweep)) for p in sweep.rglob("recon_image-*.mat")),
             "wandb": {i: list(job.glob(f"shard-{i}of2/wandb/offline-run-*/run-*.wandb"))
                       for i in (0, 1)},
             "summary": read_json(sweep / "sweep_summary.json")}
    (out / "recon_image-chelsea.mat").unlink()
    state["mtimes"] = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mat")}
    state["second"] = run_cli(args, timeout=600)
    return state


def log_text(job: Path, shard: int) -> str:
    path = job / f"shard-{shard}of2" / "train_recon.log"
    return path.read_text() if path.is_file() else ""


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def finished(log: str) -> list[str]:
    return re.findall(r"\] - (\w+): final loss", log)


def assert_ok(proc) -> None:
    assert proc.returncode == 0, output_of(proc)[-6000:]
    assert "Traceback" not in output_of(proc), output_of(proc)[-6000:]


@pytest.mark.slow
def test_submitit_shards_reconstruct_every_image_once(sharded):
    assert_ok(sharded["first"])
    job, sweep = sharded["job"], sharded["sweep"]
    assert "Submitit 'local' sweep output dir" in output_of(sharded["first"])
    assert [d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")
            and d.name != "job_status"] == [job.name]  # one shared job directory
    # each image reconstructed exactly once, by the shard it belongs to
    logs = sharded["logs"]
    assert finished(logs[0]) == ["astronaut", "coffee"] and finished(logs[1]) == ["chelsea"]
    # shard i on the launching shell's GPU i (CUDA_VISIBLE_DEVICES=5,7 in the fixture)
    assert "local job 0 (shard 0 of 2): GPU 5" in logs[0]
    assert "local job 1 (shard 1 of 2): GPU 7" in logs[1]
    assert sharded["mats"] == [f"{job.name}/true_features/VC/recon_image-{lab}.mat"
                               for lab in LABELS3]
    # each shard its own Hydra config, log and W&B run, grouped by the sweep
    for i in (0, 1):
        own = job / f"shard-{i}of2"
        assert OmegaConf.load(own / ".hydra" / "config.yaml").data.shard == i
        runs = sharded["wandb"][i]
        assert len(runs) == 1, runs
        record = runs[0].read_bytes()
        assert str(sweep).encode() in record  # the W&B group
        assert f"{job.name}-shard-{i}of2".encode() in record  # the W&B run name
    summary = sharded["summary"]
    assert summary["counts"] == {"completed": 2}, summary
    assert all(math.isfinite(j["objective"]) and j["job_id"] for j in summary["jobs"])


@pytest.mark.slow
def test_relaunch_redoes_only_the_deleted_image(sharded):
    assert_ok(sharded["second"])
    out, job = sharded["out"], sharded["job"]
    assert sorted(p.name for p in out.glob("*.mat")) == [
        f"recon_image-{lab}.mat" for lab in LABELS3]
    for name, mtime in sharded["mtimes"].items():  # untouched
        assert (out / name).stat().st_mtime_ns == mtime, name
    new = {i: log_text(job, i)[len(sharded["logs"][i]):] for i in (0, 1)}  # appended
    assert finished(new[0]) == [] and finished(new[1]) == ["chelsea"]
    assert "resuming: 2 of 2 images already finished" in new[0]
    for i in (0, 1):  # a W&B run per launch
        assert len(list(job.glob(f"shard-{i}of2/wandb/offline-run-*/run-*.wandb"))) == 2
    # the job's tables and the evaluation combine both shards
    assert [r["label"] for r in read_json(job / "results.json")] == list(LABELS3)
    from icnn_pl.evaluate import main as evaluate

    assert evaluate([str(sharded["sweep"]), "--out", str(sharded["sweep"])]) == 0
    with open(sharded["sweep"] / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["n_images"] for r in rows] == ["3"]  # one run (the job), every image
    assert read_json(sharded["sweep"] / "sweep_summary.json")["counts"] == {"completed": 2}


@pytest.mark.slow
def test_failed_job_keeps_the_others_and_is_listed(failing_sweep):
    proc, sweep = failing_sweep
    assert proc.returncode == 1, output_of(proc)[-4000:]
    summary = read_json(sweep / "sweep_summary.json")
    assert summary["counts"] == {"failed": 1, "completed": 1}, summary
    failed = next(j for j in summary["jobs"] if j["status"] == "failed")
    assert "method.n_iter=0" in failed["overrides"] and failed["exit_code"] == 2
    assert "method.n_iter=0 must be a positive integer" in failed["error"]
    assert "fix:" in failed["error"]
    # the job after the failing one ran, and its results are there
    assert len(list(sweep.rglob("recon_image-astronaut.mat"))) == 1
    assert "this job failed; the sweep goes on" in output_of(proc)


@pytest.mark.slow
def test_optuna_sweep_writes_best_config(optuna_sweep):
    proc, sweep = optuna_sweep
    assert_ok(proc)
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    searched = {"optimizer.schedule.lr.0", "method.steps.decay.0", "method.steps.blur_sigma.0"}
    assert set(results.best_params) == searched  # method.n_iter fixed on the command line
    summary = read_json(sweep / "sweep_summary.json")
    objectives = [j["objective"] for j in summary["jobs"]]
    assert summary["counts"] == {"completed": 2} and all(-1 <= v <= 1 for v in objectives)
    assert results.best_value == pytest.approx(max(objectives))  # maximised pixel r
    best = OmegaConf.load(sweep / "best_config.yaml")
    assert best.method.name == "icnn_gd" and best.data.source == "true_features"
    assert best.optimizer.schedule.lr[0] == pytest.approx(
        results.best_params["optimizer.schedule.lr.0"])
    assert np.isclose(best.method.steps.decay[0], results.best_params["method.steps.decay.0"])
    header = (sweep / "best_config.yaml").read_text().splitlines()[:4]
    assert header[-1].startswith("# rerun it: python train_recon.py ")
