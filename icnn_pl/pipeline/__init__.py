"""The experiment pipeline around the engine: from a Hydra config to a job of plain
objects (``config_checks``, ``factory``, ``data_sources``), the job itself (``job``,
``progress``, ``report``), what it writes (``outputs``, ``loggers``, ``run_dirs``) and how
sweeps run and end (``failures``, ``sweep_summary``, ``hydra_callbacks``)."""
