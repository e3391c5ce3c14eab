"""Three replicas behind a balancer, one killed and one stopped mid-run: nothing lost.

32 clients send jobs for a minute (GRADPROBE_FLEET_S to change it) to 3 `gradprobe serve`
processes, once through the client's own round robin (`--server a,b,c`) and once through nginx
as a gRPC balancer. While all three are up, each must take at least 20% of the jobs. Then one
replica is killed with SIGKILL and another gets SIGTERM: every job must still end with its own
report (sha256, label and findings), a try that failed may only have failed with a status the
client re-sends on (UNAVAILABLE), and the stopped replica must drain and exit 0."""

from __future__ import annotations

import os
import signal

import pytest
from replicas import (
    Nginx,
    expected_findings,
    make_models,
    nginx_binary,
    run_load,
    start_replicas,
    stop_replicas,
    wait_serving,
)

pytestmark = pytest.mark.slow

CLIENTS = 32
DURATION_S = float(os.environ.get("GRADPROBE_FLEET_S", "60"))
MIN_SHARE = 0.2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-models")
    paths = make_models(root)
    return paths, expected_findings(paths)


def _drive(target: str, replicas, models) -> None:
    paths, expected = models
    counts: dict[str, float] = {}

    def count_jobs_per_replica() -> None:
        counts.update({r.name: r.lint_ok() for r in replicas})

    def kill_r0() -> None:
        replicas[0].process.send_signal(signal.SIGKILL)

    def stop_r1() -> None:
        replicas[1].process.send_signal(signal.SIGTERM)

    wait_serving(target)
    result = run_load(target, paths, expected, clients=CLIENTS, duration_s=DURATION_S, events=[
        (DURATION_S * 0.4 - 1.0, count_jobs_per_replica),
        (DURATION_S * 0.4, kill_r0),
        (DURATION_S * 0.6, stop_r1),
    ])
    summary = (f"{result.done}/{result.jobs} jobs done in {result.duration_s:.0f}s, failed "
               f"tries {dict(result.tries_failed)}, per replica {dict(result.by_replica)}, "
               f"before the kill {counts}, {result.timeline}")
    print(summary)
    assert not result.mismatched, result.mismatched[:5]
    assert not result.lost, result.lost[:5]
    assert result.done == result.jobs > CLIENTS, summary
    assert set(result.tries_failed) <= {"UNAVAILABLE"}, summary
    # The killed replica took its accepted jobs with it (each re-sent, at most once per
    # client at a time); nothing else failed.
    assert sum(result.tries_failed.values()) <= CLIENTS, summary
    total = sum(counts.values())
    assert total and all(count / total >= MIN_SHARE for count in counts.values()), summary
    assert replicas[0].process.wait(5) == -signal.SIGKILL
    assert replicas[1].process.wait(60) == 0  # drained its in-flight jobs, then exited
    # the survivor kept serving after both events
    assert result.by_replica["r2"] > counts.get("r2", 0), summary


def test_round_robin_over_three_replicas_survives_a_kill_and_a_stop(tmp_path, models):
    replicas = start_replicas(3, tmp_path)
    try:
        _drive(",".join(r.address for r in replicas), replicas, models)
    finally:
        stop_replicas(replicas)


@pytest.mark.skipif(nginx_binary() is None and not os.environ.get("CI"),
                    reason="nginx is not installed (.ci/run installs it)")
def test_nginx_over_three_replicas_survives_a_kill_and_a_stop(tmp_path, models):
    replicas = start_replicas(3, tmp_path)
    balancer = None
    try:
        balancer = Nginx([r.address for r in replicas], tmp_path / "nginx")
        _drive(balancer.address, replicas, models)
    finally:
        if balancer is not None:
            balancer.stop()
        stop_replicas(replicas)
