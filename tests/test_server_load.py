"""A short run of bench/load_test.py against a real server: concurrent clients, several models,
every answer is its own model's report or an explicit RESOURCE_EXHAUSTED; nothing is lost."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
from server_harness import shared_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def load_test():
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_load_run_loses_and_mixes_up_nothing(tmp_path, load_test):
    models = load_test.make_models(tmp_path)
    expected = load_test.expected_reports(models)
    assert len(expected) == len(models)  # distinct models, distinct hashes
    # one worker, one place in the queue: four clients overload it on purpose
    server = shared_server()
    assert server.config.workers == 1 and server.config.max_queue == 1
    server.wait_for_workers(1)
    result = load_test.run_load(server.address, models, expected, clients=4, duration_s=3.0,
                                server_pid=os.getpid())
    assert result.failed == [] and result.mismatched == []
    assert result.ok >= 3 and result.passed()
    assert result.rejected > 0  # overload is refused, not queued without bound
    line = result.line()
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    assert line.startswith("LOADTEST ") and int(fields["ok"]) == result.ok
    assert float(fields["p99_ms"]) >= float(fields["p50_ms"]) > 0
    assert "throughput" in result.table()
