"""The ``wandb`` and ``mlflow`` sinks, for real and offline: a small ReLU MLP trains a few steps with
relu_zeros, alignment and patterns (images) written to the tracker and to a memory sink; what the tracker stored,
read back from its own files (wandb's offline run file, MLflow's local store through ``MlflowClient``), equals
the memory sink's at the same steps. Nothing contacts a network service: wandb runs offline with every
upload, stats and error report off, MLflow on a file store under ``tmp_path`` with telemetry off.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import probes
from probes.records import Histogram
from probes.sinks import MemorySink
from probes.sinks.mlflow import QUANTILES, histogram_quantiles, metric_key

STEPS = 3
PROBES = {"relu_zeros": {"every": 1}, "alignment": {"every": 1}, "patterns": {"every": 1, "image": True}}


def train(model: torch.nn.Module, sinks: list) -> MemorySink:
    """Attach, train ``STEPS`` steps, close; the memory sink."""
    torch.manual_seed(1)
    x, y = torch.randn(24, 12), torch.arange(24) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = probes.attach(model, PROBES, probe_data=(x, y), sinks=["memory", *sinks])
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        session.step()
    memory = session.memory
    session.close()
    return memory


def same_series(got: list[tuple[int, float]], want: list[tuple[int, float]], what: str) -> None:
    """The same steps, and values equal to the last bits (NaN equal to NaN)."""
    assert [s for s, _ in got] == [s for s, _ in want], what
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-12, nan_ok=True), what


def check_memory(memory: MemorySink) -> None:
    """The run wrote what the comparisons need: scalars over several steps, a histogram, an image."""
    assert any(len(series) >= 2 for series in memory.scalars().values())
    assert memory.histograms() and memory.images()
    assert any("#" in tag for tag in memory.tags())  # sites act#1 ...: names MLflow refuses as they are


# ----------------------------------------------------------------------------------------------------------------
# wandb


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    wandb = pytest.importorskip("wandb")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": tmp_path,
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_CACHE_DIR": tmp_path / "cache",
        "WANDB_CONFIG_DIR": tmp_path / "config",
        "WANDB_DATA_DIR": tmp_path / "data",
        "WANDB__DISABLE_STATS": "true",
        "WANDB__DISABLE_META": "true",
        "WANDB__DISABLE_MACHINE_INFO": "true",
        "WANDB__SAVE_REQUIREMENTS": "false",
    }.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()  # wandb reads its settings from the environment once per process: read these
    yield wandb
    if wandb.run is not None:  # a test that failed half-way
        wandb.run.finish()
    wandb.teardown()


def read_wandb_run(tmp_path: Path) -> tuple[list[dict], list[str]]:
    """The history rows and the record kinds of the one offline run under ``tmp_path`` (finished), once wandb's
    service has written it all (``wandb.teardown`` stops the service; its file ends with the ``exit`` record)."""
    import wandb

    wandb.teardown()
    deadline = time.monotonic() + 30.0
    while True:
        rows, kinds = _parse_wandb_file(tmp_path)
        if "exit" in kinds or time.monotonic() > deadline:
            return rows, kinds
        time.sleep(0.1)


def _parse_wandb_file(tmp_path: Path) -> tuple[list[dict], list[str]]:
    """Read a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with
    a 7-byte header (checksum, length, type: 1 whole, 2 first, 3 middle, 4 last) holding serialized ``Record``
    protos; a chunk cut short at the end (still being written) is left out."""
    from wandb.proto import wandb_internal_pb2

    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    if len(data) < 7:
        return [], []
    assert data[:4] == b":W&B"
    block, pos, pending, chunks = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the block's tail is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += room
            continue
        if pos + 7 + length > len(data):
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            chunks.append(pending)
            pending = b""
    rows, kinds = [], []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        kinds.append(record.WhichOneof("record_type"))
        if kinds[-1] != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            keys = [item.key] if item.key else list(item.nested_key)
            node = row
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows, kinds


def check_wandb_rows(rows: list[dict], memory, run_dir: Path, step_key: str = "_step") -> None:
    for tag, series in memory.scalars().items():
        got = [(row[step_key], row[tag]) for row in rows if tag in row]
        same_series(got, series, tag)
    for tag, hists in memory.histograms().items():
        got = [row for row in rows if tag in row]
        assert [row[step_key] for row in got] == [h.step for h in hists], tag
        for row, h in zip(got, hists):
            assert row[tag]["_type"] == "histogram"
            assert row[tag]["values"] == pytest.approx(h.counts.tolist())
            assert row[tag]["bins"] == pytest.approx(h.edges.tolist())
    for tag, images in memory.images().items():
        got = [row for row in rows if tag in row]
        assert [row[step_key] for row in got] == [im.step for im in images], tag
        for row, im in zip(got, images):
            assert row[tag]["_type"] == "image-file"
            assert (row[tag]["height"], row[tag]["width"]) == im.as_uint8().shape[:2]
            assert (run_dir / "files" / row[tag]["path"]).is_file()


def test_wandb_sink_starts_a_run_writes_at_the_records_steps_and_finishes_it(wandb_offline, shared_relu_mlp, tmp_path):
    memory = train(shared_relu_mlp, ["wandb"])
    check_memory(memory)
    assert wandb_offline.run is None  # the sink's own run was finished at close
    rows, kinds = read_wandb_run(tmp_path)
    assert kinds[-1] == "exit"
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    check_wandb_rows(rows, memory, run_dir)


def test_wandb_sink_shares_the_users_run_and_leaves_it_running(wandb_offline, shared_relu_mlp, tmp_path):
    run = wandb_offline.init(project="gates", name="mine")
    sink = probes.sinks.WandbSink(prefix="probes/")
    memory = train(shared_relu_mlp, [sink])
    assert sink.run is run and not sink.owns and wandb_offline.run is run  # still active after close
    run.log({"after_close": 1.0}, step=STEPS + 10)
    run.finish()
    rows, kinds = read_wandb_run(tmp_path)
    assert kinds.count("exit") == 1
    assert [row["_step"] for row in rows if "after_close" in row] == [STEPS + 10]
    prefixed = [{k.removeprefix("probes/"): v for k, v in row.items()} for row in rows]
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    check_wandb_rows(prefixed, memory, run_dir)


def test_wandb_step_metric_keeps_a_shared_run_whose_own_step_runs_ahead(wandb_offline, shared_relu_mlp, tmp_path):
    run = wandb_offline.init(project="gates")
    for i in range(20):  # the run's own step is far ahead of the session's
        run.log({"loss": float(i)})
    memory = train(shared_relu_mlp, [probes.sinks.WandbSink(step_metric="probes/step")])
    run.finish()
    rows, _ = read_wandb_run(tmp_path)
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    check_wandb_rows(rows, memory, run_dir, step_key="probes/step")


# ----------------------------------------------------------------------------------------------------------------
# mlflow


@pytest.fixture
def mlflow_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("PIL")  # log_image
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it; a database store needs sqlalchemy
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield mlflow, uri
    while mlflow.active_run() is not None:  # a test that failed half-way
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def check_mlflow_run(client, run_id: str, memory) -> None:
    for tag, series in memory.scalars().items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric_key(tag)))
        same_series(got, series, tag)
    for tag, hists in memory.histograms().items():
        for stat in ("min", "max", "mean", *(f"p{round(q * 100):02d}" for q in QUANTILES)):
            got = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"{metric_key(tag)}/{stat}"))
            want = [(h.step, histogram_quantiles(h)[stat]) for h in hists if float(h.num) > 0]
            same_series(got, want, f"{tag}/{stat}")
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for tag, ims in memory.images().items():
        for im in ims:
            stem = f"images/{metric_key(tag).replace('/', '~')}+step+{im.step}+"
            assert any(p.startswith(stem) and p.endswith(".png") for p in images), (stem, images)


def test_mlflow_sink_starts_a_run_writes_at_the_records_steps_and_ends_it(mlflow_local, shared_relu_mlp):
    mlflow, uri = mlflow_local
    sink = probes.sinks.MlflowSink(experiment="gates", run_name="relu", tracking_uri=uri)
    memory = train(shared_relu_mlp, [sink])
    check_memory(memory)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(sink.run_id)
    assert sink.owns and run.info.status == "FINISHED" and run.info.run_name == "relu"
    assert client.get_experiment(run.info.experiment_id).name == "gates"
    assert mlflow.active_run() is None
    check_mlflow_run(client, sink.run_id, memory)


def test_mlflow_sink_by_name_shares_the_active_run_and_leaves_it_running(mlflow_local, shared_relu_mlp):
    mlflow, uri = mlflow_local
    with mlflow.start_run() as run:
        memory = train(shared_relu_mlp, ["mlflow"])
        assert mlflow.active_run().info.run_id == run.info.run_id
        client = mlflow.MlflowClient(uri)
        assert client.get_run(run.info.run_id).info.status == "RUNNING"  # not ended by the sink
        mlflow.log_metric("after_close", 1.0, step=7)
    check_mlflow_run(client, run.info.run_id, memory)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_histogram_quantiles_interpolate_inside_bins():
    values = torch.arange(1000, dtype=torch.float64)
    stats = histogram_quantiles(Histogram.of("h", values, bins=100))
    assert stats["min"] == 0 and stats["max"] == 999 and stats["mean"] == pytest.approx(499.5)
    for q in QUANTILES:
        assert stats[f"p{round(q * 100):02d}"] == pytest.approx(torch.quantile(values, q).item(), abs=10.0)
    assert histogram_quantiles(Histogram.of("h", torch.tensor([float("nan")]))) == {}
    assert metric_key("relu_zeros/act#2/zero_fraction") == "relu_zeros/act_2/zero_fraction"


# ----------------------------------------------------------------------------------------------------------------
# lazy imports and a missing package


def test_importing_probes_imports_no_tracker():
    code = (
        "import sys, probes, probes.sinks; probes.plugins.sink_table(); "
        "assert not {'wandb', 'mlflow'} & set(sys.modules), sorted({'wandb', 'mlflow'} & set(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.filterwarnings("ignore::probes.ProbesNoticeWarning")  # the second attach sees no training
@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_tracker_names_the_extra(name, module, monkeypatch, shared_relu_mlp):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=rf"pip install 'torch-probes\[{name}\]'"):
        probes.attach(shared_relu_mlp, ["relu_zeros"], sinks=[name])
    probes.attach(shared_relu_mlp, ["relu_zeros"], sinks=["memory"]).close()  # the failed attach left nothing
