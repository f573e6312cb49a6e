"""``hydra/launcher=gpus``: run a sweep's jobs as fresh processes, N at a time, one GPU each.

Per-image problems are independent, so a sweep scales out as many single-GPU jobs (FRAMEWORK.md:
DDP inside a Hydra multirun relaunches the sweep). Each job is the same program run again in
single-run mode with its own overrides, its own job folder (the sweep's ``dir/subdir``) and
``CUDA_VISIBLE_DEVICES`` set to one device id from a pool; a job takes a free device, and when
it ends its device goes back to the pool. A crashed or leaking job harms no other: each is its
own process, and its output goes to ``<job dir>/launcher.log``.
"""


import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class GpuLauncherConf:
    _target_: str = "hydra_plugins.dragexp_launcher.gpu_launcher.GpuLauncher"
    # Device ids to hand out; null = every visible CUDA device (none: one job at a time on CPU).
    devices: Optional[Any] = None
    # Jobs that may share one device at the same time.
    jobs_per_device: int = 1
    # Seconds between polls of the running jobs.
    poll_s: float = 0.2


ConfigStore.instance().store(group="hydra/launcher", name="gpus", node=GpuLauncherConf,
                             provider="dragexp")


def visible_devices():
    """CUDA device ids this process may hand out (honours an outer CUDA_VISIBLE_DEVICES)."""
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    if outer is not None:
        return [d for d in outer.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


class GpuLauncher(Launcher):
    def __init__(self, devices=None, jobs_per_device: int = 1, poll_s: float = 0.2) -> None:
        self.devices = None if devices is None else [str(d) for d in devices]
        self.jobs_per_device = int(jobs_per_device)
        self.poll_s = float(poll_s)
        self.program = os.path.abspath(sys.argv[0])

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config

    def _slots(self):
        devices = self.devices if self.devices is not None else visible_devices()
        # No GPU: one job at a time, CUDA hidden, still one fresh process per job.
        return [d for d in devices for _ in range(self.jobs_per_device)] or [""]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        free = self._slots()
        log.info("Launching %d jobs, %d at a time, on devices %s", len(job_overrides), len(free),
                 sorted(set(free)) if free != [""] else "none (CPU)")
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        running: dict = {}
        results: dict = {}
        while pending or running:
            while pending and free:
                idx, overrides = pending.pop(0)
                device = free.pop(0)
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                         list(overrides))
                with open_dict(cfg):
                    cfg.hydra.job.id = idx
                    cfg.hydra.job.num = idx
                job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                job_dir.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=device, DRAGEXP_JOB_NUM=str(idx))
                cmd = [sys.executable, self.program, *overrides, "hydra.mode=RUN",
                       f"hydra.run.dir={job_dir}", f"hydra.job.num={idx}"]
                logf = open(job_dir / "launcher.log", "w")
                log.info("\t#%d on device %s : %s", idx, device or "cpu",
                         " ".join(filter_overrides(overrides)))
                proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                        cwd=os.getcwd())
                running[idx] = (proc, device, logf, cfg, job_dir)
            time.sleep(self.poll_s)
            for idx in [i for i, r in running.items() if r[0].poll() is not None]:
                proc, device, logf, cfg, job_dir = running.pop(idx)
                logf.close()
                free.append(device)
                ok = proc.returncode == 0
                if not ok:
                    log.error("job #%d exited %d; see %s", idx, proc.returncode,
                              job_dir / "launcher.log")
                results[idx] = JobReturn(
                    overrides=list(job_overrides[idx - initial_job_idx]), cfg=cfg,
                    hydra_cfg=cfg, working_dir=str(job_dir), task_name=cfg.hydra.job.name,
                    status=JobStatus.COMPLETED if ok else JobStatus.FAILED,
                    _return_value=proc.returncode if ok else RuntimeError(
                        f"job #{idx} exited {proc.returncode}; see {job_dir / 'launcher.log'}"))
        return [results[i] for i in sorted(results)]


def register() -> None:
    """Register the launcher by hand (Hydra's documented ``Plugins.register``).

    Hydra finds plugins by listing the ``hydra_plugins`` package with pkgutil, which cannot see
    packages mapped by an editable install's import hook; entry scripts call this so that
    ``hydra/launcher=gpus`` works in editable and regular installs alike.
    """
    from hydra.core.plugins import Plugins

    Plugins.instance().register(GpuLauncher)
