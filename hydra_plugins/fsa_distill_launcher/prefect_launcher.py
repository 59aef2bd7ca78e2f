"""`hydra/launcher=prefect`: a multirun's jobs become parallel flow runs of a Prefect deployment.

    fsa-distill run -m finetune.seed=42,52,62 hydra/launcher=prefect \
        hydra.launcher.deployment=fsa-distill/default --wait

Each job is one flow run of the deployment (made by `fsa-distill deploy --pool POOL`); the workers
polling its work pool run them side by side. This module stays light (Hydra imports every plugin
module on each start); submitting, polling and collecting live in `fsa_distill.launcher`.

No `from __future__ import annotations` here: Hydra's plugin scan executes this module before it
is in `sys.modules`, where `dataclass` cannot resolve string annotations (it fails on import).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class PrefectLauncherConf:
    """`hydra.launcher.*` of `hydra/launcher=prefect`."""

    _target_: str = "hydra_plugins.fsa_distill_launcher.prefect_launcher.PrefectLauncher"
    # `<flow name>/<deployment name>`, as `fsa-distill deploy --name` made it
    deployment: str = "fsa-distill/default"
    # false: print the flow run ids and return; true (`--wait`): wait, print each MLflow parent run,
    # fail naming every run that did not complete, and write the sweep report
    wait: bool = False
    poll_s: float = 2.0  # how often the flow runs' states are read while waiting
    timeout_s: float | None = None  # give up waiting after this long (the runs go on); null: no limit
    # per-run job variables for the work pool (e.g. {env: {CUDA_VISIBLE_DEVICES: "1"}}), on top of the deployment's
    job_variables: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="prefect", node=PrefectLauncherConf, provider="fsa-distill")


class PrefectLauncher(Launcher):
    """Submits every job of a sweep as a flow run of `deployment`, then (with `wait`) collects them."""

    def __init__(
        self,
        deployment: str = "fsa-distill/default",
        wait: bool = False,
        poll_s: float = 2.0,
        timeout_s: float | None = None,
        job_variables: dict[str, Any] | None = None,
    ) -> None:
        self.deployment = deployment
        self.wait = wait
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.job_variables = dict(job_variables or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep what `launch` needs; the task function itself never runs here (the workers run the flow)."""
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """One flow run per job; with `wait`, their results as Hydra job returns."""
        from fsa_distill.launcher import launch

        return launch(self, job_overrides, initial_job_idx)
