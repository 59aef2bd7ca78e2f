"""The images are work-pool base images: they install the whole project and leave the command free.

No Docker daemon runs here, so the images are not built (CI lints them with hadolint); these
checks catch what would break a build or a worker without building.
"""

from __future__ import annotations

import re
import tomllib

import pytest

from fsa_distill import ROOT

IMAGES = ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("name", IMAGES)
def test_the_image_copies_every_installed_package_and_runs_a_worker(name):
    text = (ROOT / "docker" / name).read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()}
    copied = set(re.findall(r"^COPY (\S+) \./\S+$", text, re.MULTILINE))
    assert folders <= copied, f"{name} misses {sorted(folders - copied)}: `pip install -e .` would fail"
    # Docker and Kubernetes workers start a flow run by setting the command: an ENTRYPOINT would
    # turn Prefect's command into arguments of that entry point
    assert not re.search(r"^ENTRYPOINT", text, re.MULTILINE)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)
    assert cmd and cmd.group(1).startswith('["prefect", "worker", "start"')


@pytest.mark.slow  # imports the flow to deploy it
def test_a_docker_work_pool_gets_a_deployment_that_runs_in_the_image(tmp_path, prefect_harness):
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from fsa_distill.launcher import LaunchError, deploy

    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "home")}
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    made = subprocess.run([prefect, "work-pool", "create", "fsa-docker", "--type", "docker"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    overrides = [f"workdir={tmp_path / 'work'}", "store.url=s3://bucket/fsa"]
    with pytest.raises(LaunchError, match="no job variable network_mod"):
        deploy("fsa-docker", "docker", overrides, None, image="fsa-distill:cpu", job_variables={"network_mod": "host"})
    done = deploy("fsa-docker", "docker", overrides, None, {"FSSPEC_S3_ENDPOINT_URL": "http://127.0.0.1:9000"},
                  image="fsa-distill:cpu", job_variables={"network_mode": "host"})  # fmt: skip
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(done["deployment"])
        pool = client.read_work_pool("fsa-docker")
    variables = deployment.job_variables
    assert variables["image"] == "fsa-distill:cpu" and variables["network_mode"] == "host"
    assert variables["env"]["FSSPEC_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert set(variables) <= set(pool.base_job_template["variables"]["properties"])  # what the worker renders
    assert "working_dir" not in variables  # a process pool's setting: a container starts in its image's WORKDIR
    assert deployment.entrypoint == "fsa_distill.flows.pipeline.fsa_distill"  # installed in the image, no code storage
