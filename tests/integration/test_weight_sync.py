"""Weight sync trainer -> engines (src/sluice/sync/) against real engine servers on 127.0.0.1.

The test process plays the trainer (rank 0 of the broadcast group); the engines are real LocalEngines behind real
HTTP servers (two of them, in threads of this process), on the small lively checkpoint; the trainer's "new"
weights are another checkpoint of the same shape. Equality is checked exactly: the engine's checksum route
against the trainer's checksums, and the engine's tensors against the trainer's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pickle
import socket
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sluice.config import EngineConfig
from sluice.config.sections import SyncConfig
from sluice.engine.clients.in_process import InProcessClient
from sluice.engine.clients.protocol import GenerateRequest
from sluice.engine.local_engine import LocalEngine
from sluice.engine.server.app import BackgroundServer
from sluice.engine.server.context import ServerContext
from sluice.sync import WeightSyncError
from sluice.sync.broadcast import BroadcastSync
from sluice.sync.buckets import plan_buckets
from sluice.sync.disk import DiskSync
from sluice.sync.factory import make_weight_sync
from sluice.sync.in_process import InProcessSync
from sluice.sync.ipc import ROUTE as IPC_ROUTE
from sluice.sync.ipc import IpcSync
from sluice.sync.verify import checksum_differences, engine_checksums, expected_checksums
from sluice.types import SamplingParams
from sluice.weights.buckets import FLATTENED_BUCKET, tensor_checksums

SMALL_BUCKET = 16 * 1024  # bytes: the small checkpoint (~90 KB) then travels in several buckets
PROMPT = [5, 9, 14, 3, 7]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def engines(lively_checkpoint):
    config = EngineConfig(device="cpu", dtype="float32")
    built = [LocalEngine(lively_checkpoint, config) for _ in range(2)]
    yield built
    for engine in built:
        engine.shutdown()


@pytest.fixture(scope="module")
def servers(engines, lively_checkpoint):
    config = EngineConfig(device="cpu", dtype="float32")
    started = [BackgroundServer(ServerContext(engine, lively_checkpoint, "lively", config)).start()
               for engine in engines]
    yield started
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def old_weights(lively_checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(Path(lively_checkpoint) / "model.safetensors"))


@pytest.fixture(scope="module")
def new_weights(lively_checkpoint_other) -> dict[str, torch.Tensor]:
    return load_file(str(Path(lively_checkpoint_other) / "model.safetensors"))


@pytest.fixture
def silent_url():
    """A URL whose TCP port accepts connections (the kernel's backlog) but never answers: an engine that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def next_version(engines) -> int:
    return max(engine.weight_version for engine in engines) + 1


def assert_engine_holds(engine: LocalEngine, weights: dict[str, torch.Tensor], version: int) -> None:
    """Bit-exact: every engine weight equals the trainer's tensor of the same name, and the version is stamped."""
    assert engine.weight_version == version
    held = engine.named_weights()
    assert set(held) <= set(weights)
    for name, tensor in held.items():
        assert torch.equal(tensor, weights[name]), name


def assert_server_holds(url: str, weights: dict[str, torch.Tensor], version: int) -> None:
    reported_version, checksums = asyncio.run(engine_checksums(url))
    assert reported_version == version
    assert checksum_differences(expected_checksums(weights), checksums) == []


def greedy(url: str, num_tokens: int = 6) -> dict:
    params = {"temperature": 0, "max_new_tokens": num_tokens, "ignore_eos": True}
    body = {"input_ids": PROMPT, "sampling_params": params}
    return httpx.post(url + "/generate", json=body, timeout=60).json()


@torch.no_grad()
def hf_greedy(checkpoint: str, num_tokens: int = 6) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out: list[int] = []
    for _ in range(num_tokens):
        out.append(int(model(input_ids=torch.tensor([PROMPT + out])).logits[0, -1].argmax()))
    return out


async def push_and_close(sync, weights, version):
    try:
        return await sync.push(weights, version)
    finally:
        await sync.close()


# ------------------------------------------------------------------------------------------------ broadcast
def test_broadcast_flattened_buckets_reach_two_engines_exactly(servers, engines, new_weights, old_weights,
                                                               lively_checkpoint_other):
    urls = [server.url for server in servers]
    version = next_version(engines)
    sync = BroadcastSync(urls, bucket_bytes=SMALL_BUCKET, timeout_s=30)
    try:
        report = asyncio.run(sync.push(new_weights, version))
        assert sync.flattened  # both servers said they are sluice engines
        assert report.num_buckets == len(plan_buckets(new_weights, SMALL_BUCKET)) >= 3
        assert report.num_bytes == sum(t.numel() * t.element_size() for t in new_weights.values())
        assert [result.engine for result in report.engines] == urls and all(r.success for r in report.engines)
        for url, engine in zip(urls, engines):
            assert_server_holds(url, new_weights, version)
            assert_engine_holds(engine, new_weights, version)
            answer = greedy(url)
            assert answer["meta_info"]["weight_version"] == str(version)
            assert answer["output_ids"] == hf_greedy(lively_checkpoint_other)
        # the group outlives a push: the next version goes through the same group
        group = sync.group
        asyncio.run(sync.push(old_weights, version + 1))
        assert sync.group is group
        for url in urls:
            assert_server_holds(url, old_weights, version + 1)
    finally:
        asyncio.run(sync.close())


def test_per_tensor_sglang_form_also_reaches_both_engines(servers, engines, new_weights):
    """SGLang's form: one broadcast per tensor, no extension fields, the version stamped by the last call."""
    urls = [server.url for server in servers]
    version = next_version(engines)
    sync = BroadcastSync(urls, bucket_bytes=SMALL_BUCKET, timeout_s=30, wire_form="per_tensor")
    report = asyncio.run(push_and_close(sync, new_weights, version))
    assert not sync.flattened and report.num_buckets >= 3
    for url, engine in zip(urls, engines):
        assert_server_holds(url, new_weights, version)
        assert_engine_holds(engine, new_weights, version)


def test_corrupted_last_bucket_is_refused_and_nothing_of_its_version_applies(servers, engines, old_weights,
                                                                              new_weights):
    """Buckets 0..n-2 arrive intact and are held back; the last one's bytes are corrupted after its checksums
    were taken. The engine refuses naming the bucket and tensor, and keeps every old weight and its version."""
    url, engine = servers[0].url, engines[0]
    version = next_version(engines)
    asyncio.run(push_and_close(BroadcastSync([url], timeout_s=30), old_weights, version))
    sync = BroadcastSync([url], bucket_bytes=SMALL_BUCKET, timeout_s=30)
    buckets = plan_buckets(new_weights, SMALL_BUCKET)

    async def send_corrupted() -> list[httpx.Response]:
        await sync.connect()
        responses = []
        async with httpx.AsyncClient(timeout=30) as http:
            for index, bucket in enumerate(buckets):
                body = {"names": bucket.names, "dtypes": [str(d).removeprefix("torch.") for d in bucket.dtypes],
                        "shapes": bucket.shapes, "group_name": sync.group.name, "load_format": FLATTENED_BUCKET,
                        "checksums": tensor_checksums(bucket.tensors), "bucket_index": index,
                        "num_buckets": len(buckets), "weight_version": str(version + 1)}
                buffer = bucket.flatten(torch.device("cpu"))
                if index == len(buckets) - 1:
                    buffer[bucket.layout()[0][0].offset] ^= 0x40  # one flipped bit in the bucket's first tensor
                answer = asyncio.ensure_future(http.post(url + "/update_weights_from_distributed", json=body))
                await asyncio.to_thread(sync.group.broadcast, buffer)
                responses.append(await answer)
        return responses

    try:
        responses = asyncio.run(send_corrupted())
        assert [r.status_code for r in responses] == [200] * (len(buckets) - 1) + [400]
        message = responses[-1].json()["message"]
        last = len(buckets) - 1
        assert f"bucket {last} of {len(buckets)}" in message and repr(buckets[-1].names[0]) in message
        assert "checksum" in message
        assert_engine_holds(engine, old_weights, version)
        assert_server_holds(url, old_weights, version)
        # the group is still in step: the same version, sent intact, goes through
        asyncio.run(sync.push(new_weights, version + 1))
        assert_engine_holds(engine, new_weights, version + 1)
    finally:
        asyncio.run(sync.close())


def test_older_version_is_refused_by_name(servers, engines, old_weights, new_weights):
    url, engine = servers[1].url, engines[1]
    version = next_version(engines)
    asyncio.run(push_and_close(BroadcastSync([url], timeout_s=30), new_weights, version))
    with pytest.raises(WeightSyncError, match=f"older than the engine's {version}") as failure:
        asyncio.run(push_and_close(BroadcastSync([url], bucket_bytes=SMALL_BUCKET, timeout_s=30), old_weights,
                                   version - 1))
    assert failure.value.engine == url and failure.value.stage == "apply" and url in str(failure.value)
    assert_engine_holds(engine, new_weights, version)


# ------------------------------------------------------------------------------------------------ timeouts
def test_an_engine_that_never_answers_fails_the_join_within_the_timeout(servers, silent_url, new_weights):
    sync = BroadcastSync([servers[0].url, silent_url], timeout_s=3)
    with pytest.raises(WeightSyncError) as failure:
        asyncio.run(push_and_close(sync, new_weights, 10**6))
    message = str(failure.value)
    assert failure.value.stage == "join" and failure.value.engine == silent_url
    assert f"{silent_url} did not answer within 3 s" in message and "'join'" in message
    assert "--update-weights-timeout is 3 s" in message
    assert servers[0].url not in message  # the live engine is not blamed


def test_a_group_with_an_absent_rank_fails_and_the_present_engine_recovers(servers, engines, silent_url,
                                                                           old_weights):
    """The live engine joins and waits for a rank that never comes; both sides give up at the timeout, and the
    live engine takes part in a new group afterwards."""
    live = servers[0].url
    sync = BroadcastSync([live, silent_url], timeout_s=3, wire_form="flattened")  # no /get_server_info probe
    with pytest.raises(WeightSyncError) as failure:
        asyncio.run(push_and_close(sync, old_weights, 10**6))
    message = str(failure.value)
    assert failure.value.stage == "join" and "--update-weights-timeout" in message
    # the silent engine is blamed; the live one is named as alive and waiting, the trainer's rendezvous as failed
    assert failure.value.engine == silent_url and failure.value.unresponsive == [silent_url]
    assert f"{silent_url} did not answer within 3 s, nor /health" in message
    assert f"{live} did not answer within 3 s (it answers /health" in message and "rank 0" in message
    version = next_version(engines)
    asyncio.run(push_and_close(BroadcastSync([live], timeout_s=30), old_weights, version))
    assert_engine_holds(engines[0], old_weights, version)


def test_an_engine_that_dies_after_joining_fails_the_broadcast_naming_it(lively_checkpoint, new_weights):
    config = EngineConfig(device="cpu", dtype="float32")
    engine = LocalEngine(lively_checkpoint, config)
    server = BackgroundServer(ServerContext(engine, lively_checkpoint, "lively", config)).start()
    sync = BroadcastSync([server.url], bucket_bytes=SMALL_BUCKET, timeout_s=3)
    try:
        asyncio.run(sync.connect())
        server.stop()  # the engine's HTTP server is gone; its rank of the group stays behind, silent
        with pytest.raises(WeightSyncError) as failure:
            asyncio.run(sync.push(new_weights, 1))
        assert failure.value.stage == "broadcast" and failure.value.engine == server.url
        message = str(failure.value)
        assert server.url in message and "version 1" in message and "--update-weights-timeout is 3 s" in message
        assert sync.group is None  # dropped: the next push builds a new group
        assert engine.weight_version == 0
    finally:
        asyncio.run(sync.close())
        engine.shutdown()


def test_a_dead_engine_url_fails_at_once_naming_it(new_weights):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(WeightSyncError, match="ConnectError") as failure:
        asyncio.run(push_and_close(BroadcastSync([dead], timeout_s=3), new_weights, 1))
    assert failure.value.engine == dead and failure.value.stage == "join"


# ------------------------------------------------------------------------------------------------ disk, in-process
def test_disk_sync_reaches_a_server_and_an_in_process_engine(servers, engines, old_weights, new_weights, tmp_path):
    version = next_version(engines)
    sync = DiskSync(tmp_path, [servers[0].url, engines[1]], timeout_s=30)
    report = asyncio.run(sync.push(new_weights, version))
    assert report.method == "disk" and len(report.engines) == 2
    for engine in engines:
        assert_engine_holds(engine, new_weights, version)
    assert_server_holds(servers[0].url, new_weights, version)
    asyncio.run(push_and_close(sync, old_weights, version + 1))
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"v{version + 1:08d}"]  # the older one is gone
    for engine in engines:
        assert_engine_holds(engine, old_weights, version + 1)


def test_disk_sync_refuses_a_file_whose_bytes_changed(servers, engines, old_weights, new_weights, tmp_path):
    """The file on disk differs from what the trainer checksummed: the engine refuses before copying."""
    from safetensors.torch import save_file

    from sluice.weights.buckets import named_checksums

    url, engine = servers[0].url, engines[0]
    version = next_version(engines)
    asyncio.run(push_and_close(InProcessSync([engine]), old_weights, version))
    tampered = dict(new_weights)
    name = next(iter(tampered))
    tampered[name] = tampered[name].clone()
    tampered[name].view(-1)[0] += 1
    save_file(tampered, str(tmp_path / "model.safetensors"))
    answer = httpx.post(url + "/update_weights_from_disk", timeout=30, json={
        "model_path": str(tmp_path), "weight_version": str(version + 1), "checksums": named_checksums(new_weights)})
    assert answer.status_code == 400 and repr(name) in answer.json()["message"]
    assert_engine_holds(engine, old_weights, version)


def test_in_process_sync_copies_exactly_and_refuses_an_older_version(engines, old_weights, new_weights):
    engine = engines[0]
    version = next_version(engines)
    report = asyncio.run(InProcessSync([engine]).push(new_weights, version))
    assert report.method == "in_process" and report.engines[0].success
    assert_engine_holds(engine, new_weights, version)
    held_version, checksums = engine.weight_checksums()
    assert held_version == version and checksum_differences(expected_checksums(new_weights), checksums) == []
    with pytest.raises(WeightSyncError, match="older"):
        asyncio.run(InProcessSync([engine]).push(old_weights, version - 1))
    assert_engine_holds(engine, new_weights, version)


def test_factory_picks_the_method_the_config_names(servers, engines, tmp_path):
    urls = [server.url for server in servers]
    auto = SyncConfig()
    assert isinstance(make_weight_sync(auto, urls), BroadcastSync)
    assert isinstance(make_weight_sync(auto, engines), InProcessSync)
    sized = make_weight_sync(SyncConfig(weight_sync_method="broadcast", update_weight_buffer_size=1234,
                                        update_weights_timeout=7.0), urls)
    assert (sized.bucket_bytes, sized.timeout_s, sized.backend) == (1234, 7.0, "gloo")
    disk = make_weight_sync(SyncConfig(weight_sync_method="disk"), urls, run_dir=tmp_path)
    assert isinstance(disk, DiskSync) and disk.directory == tmp_path / "weight_sync"
    with pytest.raises(ValueError, match="in_process needs engines in this process"):
        make_weight_sync(SyncConfig(weight_sync_method="in_process"), urls)


# ------------------------------------------------------------------------------------------------ bench
def test_bench_sync_prints_one_json_line(capsys):
    from sluice.cli import main

    assert main(["bench", "sync", "--shape", "tiny", "--repeats", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["bench"] == "sync" and report["model_shape"] == "tiny"
    for method in ("colocated", "separate_process", "disk"):
        figures = report[method]
        assert figures["median_ms"] > 0 and figures["num_bytes"] == report["num_bytes"] > 0, method
        assert figures["verified"] is True, method
    assert report["separate_process"]["num_buckets"] >= 1
    assert report["separate_process"]["wire"] == "gloo"  # a CPU trainer broadcasts


def test_bench_sync_places_the_engine_by_the_gpus_there_are():
    from sluice.bench.sync import _placement

    assert _placement(torch.device("cpu"), "auto") == ("gloo", "cpu")
    one_gpu = torch.cuda.device_count() <= 1
    expected = ("cuda_ipc", "cuda:0") if one_gpu else ("nccl", "cuda:1")  # NCCL needs a GPU per rank
    assert _placement(torch.device("cuda:0"), "auto") == expected
    assert _placement(torch.device("cuda:0"), "gloo") == ("gloo", "cuda:0")
    with pytest.raises(ValueError, match="needs a CUDA trainer"):
        _placement(torch.device("cpu"), "ipc")


# ------------------------------------------------------------------------------------------------ GPU
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
def test_in_process_sync_on_one_gpu_is_exact(lively_checkpoint, new_weights):
    """Colocated: trainer tensors and engine on the same GPU (a device-to-device copy), bf16."""
    engine = LocalEngine(lively_checkpoint, EngineConfig(device="cuda", dtype="bfloat16", max_total_tokens=1024))
    try:
        weights = {name: tensor.to("cuda", torch.bfloat16) for name, tensor in new_weights.items()}
        report = asyncio.run(InProcessSync([engine]).push(weights, 1))
        assert report.num_bytes == sum(t.numel() * 2 for t in weights.values())
        assert_engine_holds(engine, weights, 1)
        request = GenerateRequest(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
        result = asyncio.run(InProcessClient(engine).generate(request))
        assert len(result.output_ids) == 4 and result.weight_version == 1
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: trainer cuda:0, engine cuda:1")
def test_nccl_broadcast_to_an_engine_on_another_gpu_is_exact(lively_checkpoint, new_weights):
    config = EngineConfig(device="cuda:1", dtype="bfloat16", max_total_tokens=1024)
    engine = LocalEngine(lively_checkpoint, config)
    server = BackgroundServer(ServerContext(engine, lively_checkpoint, "lively", config)).start()
    try:
        weights = {name: tensor.to("cuda:0", torch.bfloat16) for name, tensor in new_weights.items()}
        sync = BroadcastSync([server.url], bucket_bytes=SMALL_BUCKET, timeout_s=120, device="cuda:0")
        report = asyncio.run(push_and_close(sync, weights, 1))
        assert sync.backend == "nccl" and report.num_buckets >= 3
        assert_server_holds(server.url, weights, 1)
        held = engine.named_weights()
        for name, tensor in held.items():
            assert torch.equal(tensor.cpu(), weights[name].cpu()), name
        assert greedy(server.url)["meta_info"]["weight_version"] == "1"
    finally:
        server.stop()
        engine.shutdown()


# ------------------------------------------------------------------------------------------------ CUDA IPC
class _Call:
    """Pickles as a call of ``function(*args)``: how a crafted payload runs code when it is unpickled."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _payload(obj) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode("ascii")


def _tensor_update(payload: str, version: int, flattened_name: str | None = None, shape=None) -> dict:
    body = {"serialized_named_tensors": [payload], "weight_version": str(version)}
    if flattened_name is not None:
        body.update(load_format=FLATTENED_BUCKET, names=[flattened_name], dtypes=["float32"], shapes=[list(shape)])
    return body


@pytest.mark.parametrize("form", ["per_tensor", "flattened"])
def test_ipc_route_refuses_a_payload_naming_a_forbidden_class(servers, engines, old_weights, form, tmp_path):
    """A payload whose unpickling would run a shell command: refused with a 400 naming the function, before
    anything ran; the engine keeps its weights and version."""
    url, engine = servers[0].url, engines[0]
    version = next_version(engines)
    asyncio.run(InProcessSync([engine]).push(old_weights, version))
    marker = tmp_path / "ran"
    name = "model.norm.weight"
    payload = _payload([(name, _Call(os.system, f"touch {marker}"))])
    body = _tensor_update(payload, version + 1, *((name, old_weights[name].shape) if form == "flattened" else ()))
    answer = httpx.post(url + IPC_ROUTE, json=body, timeout=30)
    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert f"refused to unpickle {os.system.__module__}.system" in message
    assert not marker.exists()
    assert_engine_holds(engine, old_weights, version)
    assert_server_holds(url, old_weights, version)


def test_ipc_route_refuses_allowed_names_put_to_other_uses(servers, engines, old_weights):
    """The classes a rebuild names are inert markers (not callable); the rebuild checks its arguments."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    url, engine = servers[0].url, engines[0]
    version = next_version(engines)
    asyncio.run(InProcessSync([engine]).push(old_weights, version))
    cases = {
        _payload(_Call(torch.Tensor, 1 << 30)): "is not callable",
        _payload([("w", _Call(rebuild_cuda_tensor, *["x"] * 15))]): "rebuild argument 'tensor class' is malformed",
        _payload([("w", _Call(rebuild_cuda_tensor, 1, 2))]): "takes 15 rebuild arguments, got 2",
        _payload([("w", 3)]): "entry 0 is not a (name, tensor) pair",
        "%%% not base64": "not base64",
    }
    for payload, expected in cases.items():
        answer = httpx.post(url + IPC_ROUTE, json=_tensor_update(payload, version + 1), timeout=30)
        assert answer.status_code == 400 and expected in answer.text, (expected, answer.text)
    flattened_without_layout = {"serialized_named_tensors": ["AA=="], "load_format": FLATTENED_BUCKET}
    answer = httpx.post(url + IPC_ROUTE, json=flattened_without_layout, timeout=30)
    assert answer.status_code == 400 and "needs names, dtypes and shapes" in answer.text
    assert_engine_holds(engine, old_weights, version)


def test_ipc_sync_refuses_weights_off_the_gpu(servers, new_weights):
    sync = IpcSync([servers[0].url], timeout_s=5)
    with pytest.raises(WeightSyncError, match="must be on a CUDA device") as failure:
        asyncio.run(push_and_close(sync, new_weights, 1))
    assert failure.value.stage == "share" and "is on cpu" in str(failure.value)


def test_factory_makes_an_ipc_sync_for_a_gpu_trainer_only(servers, engines):
    urls = [server.url for server in servers]
    config = SyncConfig(weight_sync_method="ipc", update_weight_buffer_size=4321, update_weights_timeout=9.0)
    sync = make_weight_sync(config, urls, device="cuda:0")  # nothing touches the device before a push
    assert isinstance(sync, IpcSync) and (sync.bucket_bytes, sync.timeout_s) == (4321, 9.0)
    with pytest.raises(ValueError, match="CUDA IPC"):
        make_weight_sync(config, urls, device="cpu")
    with pytest.raises(ValueError, match="needs engine servers"):
        make_weight_sync(config, engines, device="cuda:0")


def test_factory_reaches_a_colocated_gpu_engine_by_ipc(servers):
    """--colocate on GPUs: one engine on the trainer's GPU gets ipc by default (NCCL refuses two ranks on one
    GPU); several colocated engines, or an explicit broadcast, are refused with the way out named."""
    urls = [server.url for server in servers]
    assert isinstance(make_weight_sync(SyncConfig(), urls[:1], device="cuda:0", colocated=True), IpcSync)
    assert isinstance(make_weight_sync(SyncConfig(), urls[:1], device="cpu", colocated=True), BroadcastSync)  # gloo
    with pytest.raises(ValueError, match="weight-sync-method disk"):
        make_weight_sync(SyncConfig(), urls, device="cuda:0", colocated=True)
    with pytest.raises(ValueError, match="two ranks on one device"):
        make_weight_sync(SyncConfig(weight_sync_method="broadcast"), urls[:1], device="cuda:0", colocated=True)


@pytest.mark.gpu
@requires_cuda
def test_ipc_sync_to_a_serve_process_on_the_same_gpu_is_exact(lively_checkpoint, new_weights, old_weights):
    """A `sluice serve` process on cuda:0, the trainer (this process) on cuda:0: IPC in flattened buckets, then
    a checksum that does not match, then SGLang's per-tensor form (raw, and through IpcSync)."""
    from multiprocessing.reduction import ForkingPickler  # torch's tensor reducers: registered by sluice.sync.ipc

    from sluice.bench.sync import start_serve_process
    from sluice.weights.ipc import encode_payload, share_cuda_tensor

    process, url = start_serve_process(Path(lively_checkpoint), "cuda:0", torch.bfloat16, timeout_s=300)
    new = {name: tensor.to("cuda:0", torch.bfloat16) for name, tensor in new_weights.items()}
    old = {name: tensor.to("cuda:0", torch.bfloat16) for name, tensor in old_weights.items()}
    try:
        sync = IpcSync([url], bucket_bytes=SMALL_BUCKET, timeout_s=120)
        report = asyncio.run(sync.push(new, 1))
        assert sync.flattened and report.method == "ipc" and report.num_buckets == len(plan_buckets(new, SMALL_BUCKET))
        assert report.num_buckets >= 3 and report.num_bytes == sum(t.numel() * 2 for t in new.values())
        assert_server_holds(url, new, 1)
        asyncio.run(push_and_close(sync, old, 2))  # the same buffer again, refilled
        assert_server_holds(url, old, 2)

        # a checksum that does not match: refused naming the tensor, nothing applied
        bucket = plan_buckets(new, 1 << 30)[0]
        buffer = bucket.flatten(torch.device("cuda:0"))
        torch.cuda.synchronize()
        checksums = tensor_checksums(bucket.tensors)
        checksums[2] += 1
        body = {"serialized_named_tensors": [encode_payload(share_cuda_tensor(buffer))],
                "load_format": FLATTENED_BUCKET, "names": bucket.names,
                "dtypes": ["bfloat16"] * len(bucket.names), "shapes": bucket.shapes, "checksums": checksums,
                "weight_version": "3"}
        answer = httpx.post(url + IPC_ROUTE, json=body, timeout=120)
        assert answer.status_code == 400, answer.text
        assert repr(bucket.names[2]) in answer.json()["message"] and "checksum" in answer.json()["message"]
        assert_server_holds(url, old, 2)

        # SGLang's per-tensor form, as its MultiprocessingSerializer writes it (torch's reductions, base64)
        pairs = list(new.items())
        payload = base64.b64encode(bytes(ForkingPickler.dumps(pairs))).decode("ascii")
        answer = httpx.post(url + IPC_ROUTE, timeout=120,
                            json={"serialized_named_tensors": [payload], "weight_version": "3", "flush_cache": True})
        assert answer.status_code == 200, answer.text
        assert_server_holds(url, new, 3)
        per_tensor = IpcSync([url], bucket_bytes=SMALL_BUCKET, timeout_s=120, wire_form="per_tensor")
        assert asyncio.run(push_and_close(per_tensor, old, 4)).num_buckets >= 3
        assert_server_holds(url, old, 4)
        assert greedy(url)["meta_info"]["weight_version"] == "4"
    finally:
        process.terminate()
        process.wait(timeout=60)
