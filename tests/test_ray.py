"""``--ray``: analyze and track on a local Ray cluster of several worker processes give the local run's
records, bit for bit and in the same order, also when a worker process dies mid-run."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

import pysafe  # noqa: E402
from pysafe.cli import main  # noqa: E402
from pysafe.distributed import FAULT_ENV, cluster, compare_on_ray  # noqa: E402
from pysafe.errors import ClusterError  # noqa: E402
from pysafe.lab.config import stage_settings  # noqa: E402
from pysafe.lab.train import train  # noqa: E402
from recordkit import assert_same_records, write_lora_adapter  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local cluster of 3 worker processes for this module, started by pysafe's own ``local:3``. Its workers
    see FAULT_ENV pointing at a marker file that exists (disarmed); a test removes it to kill one worker."""
    marker = tmp_path_factory.mktemp("fault") / "killed"
    marker.write_text("disarmed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, str(marker))
        # Ray puts the driver's working directory first on its local workers' sys.path: from the repository root
        # they would import the source tree (no built core) instead of the installed pysafe
        mp.chdir(marker.parent)
        with cluster("local:3"):
            assert ray.cluster_resources()["CPU"] == 3
            yield marker


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-data")
    pysafe.make_pair(root / "pair", "tiny")  # llama names, 2 layers: three tensor groups (layers 0, 1, the rest)
    pre = stage_settings("tiny", "pretrain")
    train("pretrain", root / "base", model_config=pre.model, recipe=pre.recipe, train_config=replace(pre.train, steps=4))
    ft = stage_settings("tiny", "ssft")
    train("ssft", root / "run", train_config=replace(ft.train, steps=6, keep_every=2, lr_max=3e-3), init=root / "base")
    return root


def _equal(a: list[dict], b: list[dict], ignore=()):
    assert_same_records(a, b, ignore=("time_", *ignore))


def test_analyze_on_ray_equals_the_local_run(ray_cluster, data, tmp_path):
    local = pysafe.compare(data / "pair" / "base", data / "pair" / "tuned", seed=3)
    seen = []
    dist = compare_on_ray(data / "pair" / "base", data / "pair" / "tuned", "local:3", seed=3,
                          progress=lambda done, total, *_: seen.append((done, total)))
    _equal(local.records, dist.records)
    assert dist.skipped == local.skipped and dist.params == local.params and dist.bytes_read == local.bytes_read
    assert len(seen) == 3 and seen[-1] == (len(local.records), len(local.records))  # one task per tensor group
    # with a cache: the workers store W_base's decompositions and a second run reads them
    first = compare_on_ray(data / "pair" / "base", data / "pair" / "tuned", "local", cache=tmp_path / "c", seed=3)
    again = compare_on_ray(data / "pair" / "base", data / "pair" / "tuned", "local", cache=tmp_path / "c", seed=3)
    assert first.cache["writes"] > 0 and again.cache["hits"] == first.cache["writes"] and again.cache["misses"] == 0
    _equal(local.records, again.records, ignore=("base_svd_cached",))
    # the CLI: summary.json of --ray equals that of the local run, apart from timings
    r = CliRunner()
    for out, extra in (("l", []), ("d", ["--ray", "local:3"])):
        res = r.invoke(main, ["analyze", str(data / "base"), str(data / "run"), "--out", str(tmp_path / out),
                              "--no-cache", "--no-plots", *extra], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    sl, sd = (json.loads((tmp_path / o / "summary.json").read_text()) for o in ("l", "d"))
    strip = [{k: v for k, v in m.items() if not k.startswith("time_")} for m in sl["matrices"]]
    assert strip == [{k: v for k, v in m.items() if not k.startswith("time_")} for m in sd["matrices"]]


def test_a_peft_adapter_on_ray_equals_the_local_run(ray_cluster, data, tmp_path):
    """The factored path (TUNED a LoRA adapter), its targets in two layers: two tasks."""
    base = data / "pair" / "base"
    adapter = write_lora_adapter(base, ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                        "model.layers.1.self_attn.q_proj.weight"], tmp_path / "adapter", seed=5)
    local = pysafe.compare(base, adapter)
    dist = compare_on_ray(base, adapter, "local:3")
    assert len(local.records) == 3 and all("lora_rank" in r for r in dist.records)
    _equal(local.records, dist.records)
    with pytest.raises(ValueError, match="--ray"):
        compare_on_ray(base, adapter, "local:3", device="cuda")


def test_track_on_ray_equals_the_local_run(ray_cluster, data, tmp_path):
    local = pysafe.track(data / "base", data / "run", cache=tmp_path / "a")
    dist = pysafe.track(data / "base", data / "run", cache=tmp_path / "b", ray="local:3")
    assert [p.label for p in dist.points] == [p.label for p in local.points] == ["step 2", "step 4", "step 6"]
    for p, q in zip(local.points, dist.points):
        _equal(p.records, q.records)  # base_svd_cached included: the first checkpoint fills the cache alone
    assert {**dist.cache, "dir": None} == {**local.cache, "dir": None}
    r = CliRunner()
    for out, extra in (("l", []), ("d", ["--ray", "local:3"])):
        res = r.invoke(main, ["track", str(data / "base"), str(data / "run"), "--out", str(tmp_path / out),
                              "--no-cache", "--no-plots", *extra], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    assert (tmp_path / "l" / "track.csv").read_bytes() == (tmp_path / "d" / "track.csv").read_bytes()


def test_a_killed_worker_is_retried_and_the_result_is_unchanged(ray_cluster, data):
    marker = ray_cluster
    local = pysafe.track(data / "base", data / "run", cache=False)
    marker.unlink()  # armed: the next task to start kills its own worker process
    dist = pysafe.track(data / "base", data / "run", cache=False, ray="local:3")
    pid = int(marker.read_text())  # written by the task that killed its worker
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    for p, q in zip(local.points, dist.points):
        _equal(p.records, q.records)


def test_a_task_error_is_the_error_of_the_local_run(ray_cluster, data, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(pysafe.CheckpointError, match="no weights found"):
        pysafe.track(data / "base", [data / "run" / "steps" / "step_000002", tmp_path / "empty"], ray="local:3",
                     cache=False)
    res = CliRunner().invoke(main, ["track", str(data / "base"), str(tmp_path / "empty"), "--ray", "local:3",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no weights found" in res.output and len(res.output.strip().splitlines()) == 1


def test_an_unreachable_cluster_is_one_line(tmp_path, data):
    with pytest.raises(ClusterError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        compare_on_ray(data / "pair" / "base", data / "pair" / "tuned", "127.0.0.1:9")
    res = CliRunner().invoke(main, ["track", str(data / "base"), str(data / "run"), "--ray", "127.0.0.1:9",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "cannot reach" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
