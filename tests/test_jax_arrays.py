"""initserve_client.jax against a real uvicorn server, on JAX's CPU backend with 8 host devices.

JAX reads XLA_FLAGS once, when it is first imported, so everything that imports JAX runs in a
subprocess that sets --xla_force_host_platform_device_count=8 first: this file run as a script
(``python tests/test_jax_arrays.py <scenario> <url>``) is that subprocess, and prints one JSON
document of measurements that the tests below assert on. Bytes are counted for real, by an httpx
transport that wraps the client's, and cross-checked with the server's own metrics.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assertions import same_bits
from servers import metric

# Real processes (torch.distributed ranks, JAX in a subprocess): run by `make test`, not
# by `make test-fast`.
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve()
DEVICES = 8
# Odd sizes on every axis that is not split; split axes divide by the mesh axes they use.
SPEC: dict[str, Any] = {
    "seed": 20240,
    "layout": "jax",
    "layers": [
        {"name": "dense", "shape": [96, 173], "scheme": "lecun_normal", "bias": True},
        {"name": "proj", "shape": [173, 64], "scheme": "kaiming_normal", "bias": False},
    ],
    "tensors": [
        {"name": "pos", "shape": [3, 40, 77], "scheme": "trunc_normal", "std": 0.02},
        {"name": "gate", "shape": [64, 33], "scheme": "xavier_uniform", "dtype": "bfloat16"},
        {"name": "temperature", "shape": [], "scheme": "constant", "val": 0.5},
        {"name": "empty", "shape": [0, 8], "scheme": "normal"},
    ],
}
# Per mesh, a PartitionSpec per tensor (None entries: unsplit; () : replicated).
MESHES: dict[str, dict[str, Any]] = {
    "8": {
        "shape": [8],
        "axes": ["x"],
        "specs": {
            "dense.weight": ["x", None],
            "dense.bias": [],
            "proj.weight": [None, "x"],
            "pos": [None, "x", None],
            "gate": ["x"],
            "temperature": [],
            "empty": [None, "x"],
        },
    },
    "2x4": {
        "shape": [2, 4],
        "axes": ["data", "model"],
        "specs": {
            "dense.weight": ["model", None],
            "dense.bias": [],
            "proj.weight": [None, ["data", "model"]],
            "pos": [None, "model", None],
            "gate": ["data", None],
            "temperature": [],
            "empty": [None, "model"],
        },
    },
    "4x2": {
        "shape": [4, 2],
        "axes": ["data", "model"],
        "specs": {
            "dense.weight": ["data", None],
            "dense.bias": [],
            "proj.weight": [None, "model"],
            "pos": [None, ["model", "data"], None],
            "gate": [["data", "model"], None],
            "temperature": [],
            "empty": [None, "data"],
        },
    },
}


# --- the subprocess (imports JAX) ----------------------------------------------------------------


def _counting_client(url: str) -> tuple[Any, dict[str, Any]]:
    """A Client whose transport counts each /init response's bytes and its safetensors header."""
    import httpx

    from initserve_client import Client

    counts: dict[str, Any] = {"requests": 0, "body_bytes": 0, "header_bytes": 0}

    class Counted(httpx.SyncByteStream):
        def __init__(self, stream: Any) -> None:
            self.stream, self.head = stream, b""

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self.stream:
                if len(self.head) < 8:
                    self.head += chunk[: 8 - len(self.head)]
                    if len(self.head) == 8:
                        counts["header_bytes"] += 8 + int.from_bytes(self.head, "little")
                counts["body_bytes"] += len(chunk)
                yield chunk

        def close(self) -> None:
            self.stream.close()

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            if request.url.path == "/init":
                counts["requests"] += 1
                response.stream = Counted(response.stream)
            return response

    return Client(url, transport=Counting()), counts


def _shardings(mesh_name: str) -> tuple[Any, dict[str, Any]]:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    layout = MESHES[mesh_name]
    mesh = jax.make_mesh(tuple(layout["shape"]), tuple(layout["axes"]))
    specs = {
        key: PartitionSpec(*[tuple(e) if isinstance(e, list) else e for e in entries])
        for key, entries in layout["specs"].items()
    }
    return mesh, {key: NamedSharding(mesh, spec) for key, spec in specs.items()}


def _held_bytes(shape: tuple[int, ...], itemsize: int, indices: list[Any]) -> int:
    """Bytes the devices hold, each distinct block once (replicas share one download)."""
    blocks = {
        tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True)) for index in indices
    }
    return sum(math.prod(b - a for a, b in block) * itemsize for block in blocks)


def scenario_arrays(url: str) -> dict[str, Any]:
    import numpy as np

    import initserve
    from initserve_client.jax import fetch_arrays, host_requests

    whole = initserve.generate(SPEC)
    report: dict[str, Any] = {}
    for mesh_name in MESHES:
        mesh, shardings = _shardings(mesh_name)
        client, counts = _counting_client(url)
        before = metric(url, "initserve_bytes_streamed_total")
        with client:
            arrays = fetch_arrays(SPEC, shardings, client=client)
        streamed = metric(url, "initserve_bytes_streamed_total") - before
        held = sum(
            _held_bytes(
                a.shape,
                a.dtype.itemsize,
                [shard.index for shard in a.addressable_shards],
            )
            for a in arrays.values()
        )
        report[mesh_name] = {
            **counts,
            "server_bytes": streamed,
            "held_bytes": held,
            "mismatched": [k for k, a in arrays.items() if not same_bits(a, whole[k])],
            "shards_mismatched": [
                k
                for k, a in arrays.items()
                for shard in a.addressable_shards
                if not same_bits(shard.data, whole[k][shard.index])
            ],
            "keys": sorted(arrays),
            "sharding_kept": all(arrays[k].sharding == s for k, s in shardings.items()),
        }
        # One host of several, simulated: the first row of the mesh (2x4, 4x2) or every other
        # device (8,), which holds blocks of dense.weight that do not form a rectangle.
        devices = list(mesh.devices[0].flat) if mesh.devices.ndim == 2 else list(mesh.devices[::2])
        requests = host_requests(SPEC, shardings, devices=devices)
        client, counts = _counting_client(url)
        fetched: dict[str, list[tuple[Any, Any]]] = {}
        with client:
            for regions in requests:
                buffers = {
                    k: np.empty([b - a for a, b in r], dtype=whole[k].dtype)
                    for k, r in regions.items()
                }
                client.fetch_into(SPEC, buffers, regions=regions)
                for k, r in regions.items():
                    fetched.setdefault(k, []).append((r, buffers[k]))
        held_by_host, wrong = 0, []
        for key, sharding in shardings.items():
            shape = whole[key].shape
            indices = sharding.devices_indices_map(shape)
            held_by_host += _held_bytes(shape, whole[key].itemsize, [indices[d] for d in devices])
            for device in devices:
                block = [s.indices(n)[:2] for s, n in zip(indices[device], shape, strict=True)]
                found = [
                    buf[
                        tuple(
                            slice(a - lo, b - lo) for (a, b), (lo, _) in zip(block, r, strict=True)
                        )
                    ]
                    for r, buf in fetched.get(key, [])
                    if all(lo <= a and b <= hi for (a, b), (lo, hi) in zip(block, r, strict=True))
                ]
                if not found or not same_bits(found[0], whole[key][indices[device]]):
                    wrong.append(f"{key}@{device.id}")
        report[f"{mesh_name}/host"] = {**counts, "held_bytes": held_by_host, "wrong": wrong}
    # Splits that do not divide: refused before any request, naming the tensor and mesh axis.
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    errors = {}
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    cases = {"unsplit-odd": ((None, "model"), ()), "bias": ((), ("data",))}
    for name, (weight_spec, bias_spec) in cases.items():
        odd = {
            "seed": 1,
            "layout": "jax",  # the bias is [173], the weight's last axis
            "layers": [{"name": "odd", "shape": [12, 173], "scheme": "normal", "bias": True}],
        }
        shardings_odd = {
            "odd.weight": NamedSharding(mesh, PartitionSpec(*weight_spec)),
            "odd.bias": NamedSharding(mesh, PartitionSpec(*bias_spec)),
        }
        client, counts = _counting_client(url)
        with client:
            try:
                fetch_arrays(odd, shardings_odd, client=client)
                errors[name] = {"error": None, **counts}
            except ValueError as exc:
                errors[name] = {"error": str(exc), **counts}
    report["errors"] = errors
    return report


def scenario_torch(url: str) -> dict[str, Any]:
    """The torch client path and the JAX client, one spec each in either layout."""
    import torch  # noqa: F401  (fetch_weights(as_torch=True) needs it)

    from initserve_client import Client
    from initserve_client.jax import fetch_arrays

    mesh, shardings = _shardings("2x4")
    report: dict[str, Any] = {}
    for layout in ("jax", "torch"):
        spec = {**SPEC, "layout": layout}
        if layout == "torch":  # torch's layers are [out, in]: the bias follows shape[0]
            spec["layers"] = [
                {**layer, "shape": layer["shape"][::-1]} for layer in SPEC["layers"]
            ] + [{"name": "conv", "shape": [16, 3, 5, 5], "scheme": "torch_default", "bias": True}]
            mesh_shardings = {k: jax_replicated(mesh) for k in _keys(spec)}
        else:
            mesh_shardings = shardings
        with Client(url) as client:
            torch_weights = client.fetch_weights(spec, as_torch=True)
            arrays = fetch_arrays(spec, mesh_shardings, client=client)
        report[layout] = {
            "keys_equal": sorted(torch_weights) == sorted(arrays),
            "differ": [
                k
                for k, t in torch_weights.items()
                if t.view(torch_int_view(t)).numpy().tobytes() != _raw(arrays[k])
            ],
        }
    return report


def jax_replicated(mesh: Any) -> Any:
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def torch_int_view(tensor: Any) -> Any:
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]


def _raw(array: Any) -> bytes:
    import numpy as np

    host = np.asarray(array)
    return bytes(host.view(np.dtype(f"i{host.dtype.itemsize}")).tobytes())


def _keys(spec: dict[str, Any]) -> list[str]:
    from initserve_client._safetensors import expected_entries

    return [key for key, _, _ in expected_entries(spec, None, None)]


SCENARIOS = {"arrays": scenario_arrays, "torch": scenario_torch}


# --- the tests (no JAX in this process) ----------------------------------------------------------


def run_scenario(module: Path, scenario: str, url: str) -> dict[str, Any]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    env["JAX_PLATFORMS"] = "cpu"
    tests = str(module.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(module), scenario, url],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


@pytest.fixture(scope="module")
def arrays_report(live_server: str) -> dict[str, Any]:
    return run_scenario(HERE, "arrays", live_server)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_every_array_equals_generate_bit_for_bit(arrays_report: dict[str, Any], mesh: str) -> None:
    got = arrays_report[mesh]
    assert got["keys"] == sorted(k for k in MESHES[mesh]["specs"])
    assert got["mismatched"] == [] and got["shards_mismatched"] == []
    assert got["sharding_kept"]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_one_request_per_host_within_five_percent_of_what_devices_hold(
    arrays_report: dict[str, Any], mesh: str
) -> None:
    got = arrays_report[mesh]
    assert got["requests"] == 1
    # The tensor data is exactly what the devices hold (replicas once); headers on top.
    assert got["body_bytes"] - got["header_bytes"] == got["held_bytes"]
    assert got["body_bytes"] <= 1.05 * got["held_bytes"]
    assert got["server_bytes"] == got["body_bytes"]  # the server's own count agrees


# The host is the mesh's first row. On 2x4 its 4 devices hold one rectangle of every tensor: one
# request. On 4x2 its 2 devices (data 0; model 0, 1) hold pos's rows [0, 5) and [20, 25) (the
# combined axis ("model", "data") puts model first), not a rectangle: one request per block.
@pytest.mark.parametrize(("mesh", "requests"), [("2x4", 1), ("4x2", 2)])
def test_a_host_fetches_only_its_own_devices_blocks(
    arrays_report: dict[str, Any], mesh: str, requests: int
) -> None:
    got = arrays_report[f"{mesh}/host"]
    assert got["wrong"] == []
    assert got["requests"] == requests
    assert got["body_bytes"] - got["header_bytes"] == got["held_bytes"]
    whole = arrays_report[mesh]["held_bytes"]
    assert got["held_bytes"] < whole  # the row really holds less than the whole model


def test_a_host_whose_blocks_are_not_a_rectangle_fetches_each_once(
    arrays_report: dict[str, Any],
) -> None:
    # Devices 0, 2, 4, 6 of the (8,) mesh: dense.weight rows [0,12), [24,36), ...: four blocks.
    got = arrays_report["8/host"]
    assert got["wrong"] == []
    assert got["requests"] == 4
    assert got["body_bytes"] - got["header_bytes"] == got["held_bytes"]


def test_uneven_split_is_refused_naming_tensor_and_mesh_axis(
    arrays_report: dict[str, Any],
) -> None:
    errors = arrays_report["errors"]
    unsplit = errors["unsplit-odd"]
    assert unsplit["requests"] == 0
    assert "odd.weight" in unsplit["error"] and "'model' (4)" in unsplit["error"]
    assert "173" in unsplit["error"]
    bias = errors["bias"]
    assert bias["requests"] == 0
    assert "odd.bias" in bias["error"] and "'data' (2)" in bias["error"]
    assert "odd.weight" not in bias["error"]


def test_torch_client_and_jax_client_get_the_same_bytes(live_server: str) -> None:
    report = run_scenario(HERE, "torch", live_server)
    for layout in ("jax", "torch"):
        assert report[layout]["keys_equal"], layout
        assert report[layout]["differ"] == [], layout


def test_the_client_imports_nothing_of_jax_until_asked() -> None:
    code = (
        "import sys, initserve_client, initserve_client.cli, initserve_client.torch_utils\n"
        "assert not any(m == 'jax' or m.startswith(('jax.', 'flax')) for m in sys.modules)\n"
        "import initserve_client.jax\n"
        "assert 'jax' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])))
