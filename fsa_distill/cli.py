"""`fsa-distill`: run the flow (Hydra), score predictions, serve the flow as a Prefect deployment.

fsa-distill run [-m] [OVERRIDE ...]     compose conf/ with overrides and run the flow
fsa-distill score [--task fsa|sentiment] --dataset D --predictions FILE [--source S] [OVERRIDE ...]
fsa-distill serve [--name NAME] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fsa_distill import CONF_DIR


def _run(argv: list[str]) -> int:
    import hydra
    from omegaconf import DictConfig

    from fsa_distill.config import register, to_plain
    from fsa_distill.env import configure

    register()

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


def main(argv: list[str] | None = None) -> int:
    """Dispatch the sub-command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": _run, "score": _score, "serve": _serve}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
