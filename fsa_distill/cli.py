"""`fsa-distill`: run the flow (Hydra), score predictions, serve the flow as a Prefect deployment.

fsa-distill run [-m] [OVERRIDE ...]     compose conf/ with overrides and run the flow
fsa-distill run -m SWEEP ... hydra/launcher=prefect [hydra.launcher.deployment=FLOW/NAME] [--wait]
                                        each job of the sweep as a flow run of a deployment
fsa-distill score [--task fsa|sentiment] --dataset D --predictions FILE [--source S] [OVERRIDE ...]
fsa-distill serve [--name NAME] [OVERRIDE ...]
fsa-distill deploy --pool POOL [--name NAME] [--working-dir DIR] [--env KEY=VALUE ...] [--image IMAGE]
                   [--job-variable KEY=VALUE ...] [OVERRIDE ...]
                                        the flow as a deployment on a work pool (for hydra/launcher=prefect)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fsa_distill import CONF_DIR

#: The override that sends a multirun's jobs to a Prefect deployment (hydra_plugins/fsa_distill_launcher).
PREFECT_LAUNCHER = "hydra/launcher=prefect"


def launcher_args(argv: list[str]) -> list[str]:
    """`run`'s own flag on top of Hydra's arguments: `--wait` stands for `hydra.launcher.wait=true`.

    Hydra would run a single job here whatever the launcher, so `hydra/launcher=prefect` without
    `-m` is refused rather than silently running the flow in this process; `--wait` needs both.
    """
    rest = [a for a in argv if a != "--wait"]
    multirun = "-m" in rest or "--multirun" in rest
    if PREFECT_LAUNCHER in rest and not multirun:
        raise ValueError(f"{PREFECT_LAUNCHER} sends the jobs of a multirun to a deployment: add -m")
    if "--wait" not in argv:
        return argv
    if PREFECT_LAUNCHER not in rest or not multirun:
        raise ValueError(
            f"--wait waits for the flow runs of a sweep sent to a deployment: add -m and {PREFECT_LAUNCHER}"
        )
    return [*rest, "hydra.launcher.wait=true"]


def _register_launcher() -> None:
    """Make `hydra/launcher=prefect` known however the project is installed.

    Hydra finds plugins by scanning the `hydra_plugins` namespace package, which an editable
    install does not expose to that scan; registering the class (and, by importing it, its config)
    by hand works in every install.
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.fsa_distill_launcher.prefect_launcher import PrefectLauncher

    Plugins.instance().register(PrefectLauncher)


def _run(argv: list[str]) -> int:
    import hydra
    from omegaconf import DictConfig

    from fsa_distill.config import register, to_plain
    from fsa_distill.env import configure

    try:
        argv = launcher_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    register()
    _register_launcher()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def job(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        plain = to_plain(cfg)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        configure(plain["workdir"])
        from fsa_distill.flows.pipeline import fsa_distill

        hydra_cfg = HydraConfig.get()
        # the command line's overrides name the Prefect flow run and the MLflow parent run
        result = fsa_distill(config=plain, overrides=list(hydra_cfg.overrides.task))
        keys = ("parent_run_id", "report", "mlflow_url", "stages")
        summary = json.dumps({key: result[key] for key in keys if key in result})
        # beside Hydra's job folder too, where the sweep report (fsa_distill/sweep.py) reads it
        (Path(hydra_cfg.runtime.output_dir) / "result.json").write_text(summary)
        print(summary)

    sys.argv = [sys.argv[0], *argv]
    job()
    return 0


def _override_value(value: str) -> str:
    """Quote a path for a Hydra override unless it is plainly safe, so odd characters cannot break parsing."""
    import re

    if re.fullmatch(r"[\w./~-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def _score(argv: list[str]) -> int:
    from fsa_distill.benchmark.scoring import score_file

    parser = argparse.ArgumentParser(prog="fsa-distill score", description="Score a model's predictions.")
    parser.add_argument("--task", choices=("fsa", "sentiment"), default="fsa", help="benchmark (default: fsa)")
    parser.add_argument(
        "--dataset",
        required=True,
        help="fsa: atsa/rest14, atsa/laptop14, acsa/rest16, acsa/laptop16 or a key under data.custom; "
        "sentiment: sst2, imdb, yelp2, twitter or a key under sentiment.datasets",
    )
    parser.add_argument("--predictions", required=True, help='JSON lines {"ID": ..., "prediction": "..."}')
    parser.add_argument(
        "--source",
        default=None,
        help="fsa: the built-ins' data source (default: FSA_DATA_SOURCE or data.source); "
        "sentiment: the built-ins' folder (default: FSA_SENTIMENT_SOURCE or sentiment.source)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. to select a data or sentiment config file")
    args = parser.parse_args(argv)
    if args.task == "sentiment":
        return _score_sentiment(args)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fsa_distill.config import compose_config

    try:
        data = compose_config(args.overrides)["data"]  # data.custom declares the user datasets
        source = data["source"] if args.source is None else args.source
        result = score_file(args.dataset, args.predictions, source, data["custom"], data["timeout_s"])
    except (ValueError, HydraException, OmegaConfBaseException) as exc:  # InputError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


def _score_sentiment(args: argparse.Namespace) -> int:
    """`score --task sentiment`: macro-F1 and accuracy of label-word predictions on a set's test split."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fsa_distill.benchmark.sentiment import get_dataset, score_sentiment_file
    from fsa_distill.config import compose_config

    overrides = list(args.overrides)
    if args.source is not None:
        overrides.append(f"sentiment.source={_override_value(args.source)}")
    try:
        spec = get_dataset(compose_config(overrides)["sentiment"], args.dataset)
        result = score_sentiment_file(spec, args.predictions)
    except (ValueError, HydraException, OmegaConfBaseException) as exc:  # InputError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fsa-distill serve", description="Serve the flow as a deployment.")
    parser.add_argument("--name", default="default", help="deployment name")
    parser.add_argument("overrides", nargs="*", help="default Hydra overrides of the deployment")
    args = parser.parse_args(argv)
    from fsa_distill.config import compose_config
    from fsa_distill.env import configure

    configure(compose_config(args.overrides)["workdir"])
    from fsa_distill.flows.pipeline import fsa_distill

    # Served overrides are the deployment's base: a run's own `overrides` add to them (and win on
    # conflict) instead of replacing them, as Prefect's top-level parameter merge would.
    fsa_distill.serve(name=args.name, parameters={"base_overrides": list(args.overrides)})
    return 0


def _deploy(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fsa-distill deploy",
        description="Register the flow as a deployment on a Prefect work pool, for sweeps run as parallel flow "
        "runs (fsa-distill run -m ... hydra/launcher=prefect). Needs PREFECT_API_URL.",
    )
    parser.add_argument("--pool", required=True, help="work pool (`prefect work-pool create POOL --type process`)")
    parser.add_argument("--name", default="default", help="deployment name (default: default)")
    parser.add_argument(
        "--working-dir",
        default=os.getcwd(),
        help="where the runs start on the workers, so relative paths mean what they mean here "
        "(default: this directory; '' for a fresh temporary folder per run)",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="one more environment variable for the runs"
    )
    parser.add_argument("--image", help="Docker or Kubernetes pools: the image runs start in (built from docker/)")
    parser.add_argument(
        "--job-variable",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more job variable of the pool (VALUE as JSON if it parses, else a string), e.g. network_mode=host",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides every run of the deployment starts from")
    args = parser.parse_args(argv)
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env {item!r}: give KEY=VALUE")
        env[key] = value
    variables: dict[str, object] = {}
    for item in args.job_variable:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--job-variable {item!r}: give KEY=VALUE")
        try:
            variables[key] = json.loads(value)
        except ValueError:
            variables[key] = value
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fsa_distill.launcher import LaunchError, deploy

    working_dir = Path(args.working_dir) if args.working_dir else None
    try:
        made = deploy(args.pool, args.name, list(args.overrides), working_dir, env, args.image, variables)
    except (LaunchError, ValueError, HydraException, OmegaConfBaseException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"Deployment {made['deployment']} on work pool {made['work_pool']} ({made['pool_type']}), "
        f"entrypoint {made['entrypoint']}\n"
        f"  base overrides: {' '.join(made['base_overrides'])}\n"
        f"Start workers:    prefect worker start --pool {made['work_pool']}   (one per parallel run, any machine "
        "with the project installed and PREFECT_API_URL set)\n"
        f"Run a sweep:      fsa-distill run -m finetune.seed=42,52,62 {PREFECT_LAUNCHER} "
        f"hydra.launcher.deployment={made['deployment']} --wait",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {k: made[k] for k in ("deployment", "id", "work_pool", "entrypoint", "base_overrides", "job_variables")}
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch the sub-command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": _run, "score": _score, "serve": _serve, "deploy": _deploy}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
