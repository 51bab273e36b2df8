"""Which Ray a run uses, and what it says about it: the cluster --ray-address or RAY_ADDRESS names, else its own
Ray on this machine. `ray.init` is replaced by a recorder that stops the placement right after the decision (the
real thing, joining a cluster started by `ray start`, is tests/integration/test_ray_job.py)."""

from __future__ import annotations

import pytest
import ray

from sluice.config import ConfigError, parse_config
from sluice.orchestration.ray_placement import RayPlacement


class Decided(Exception):
    """Raised by the recording ray.init: the run has chosen its Ray, nothing more is needed."""


@pytest.fixture
def init_calls(monkeypatch):
    calls: list[dict] = []

    def record(**kwargs):
        calls.append(kwargs)
        raise Decided

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", record)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def place(*flags: str) -> list[str]:
    """The log lines of a Ray placement of a run with these flags, up to its ray.init."""
    lines: list[str] = []
    with pytest.raises(Decided):
        RayPlacement(parse_config(["--orchestrator", "ray", *flags]), lines.append)
    return lines


def test_outside_a_cluster_the_run_says_it_starts_its_own_ray(init_calls):
    lines = place()
    assert init_calls[0]["address"] == "local"  # never a Ray that `ray start` left running here
    assert len(lines) == 1 and "no --ray-address or RAY_ADDRESS, so this run starts its own Ray" in lines[0]
    assert "ray job submit" in lines[0]


def test_ray_address_joins_that_cluster(init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as in a job that `ray job submit` started
    place()
    place("--ray-address", "auto")
    place("--ray-address", "10.0.0.2:6379")
    assert [call["address"] for call in init_calls] == ["10.0.0.1:6379", "auto", "10.0.0.2:6379"]


def test_no_cluster_to_join_is_a_config_error_naming_the_flag(monkeypatch):
    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with pytest.raises(ConfigError, match=r"--ray-address=auto: no Ray cluster to join .*ray start --head"):
        RayPlacement(parse_config(["--orchestrator", "ray", "--ray-address", "auto"]), print)
