"""What the client and the service must agree on (initserve_client/_protocol.py) equals the
service's own value, each read from the service: a change on one side fails here, not in a
user's job. And the client reaches the engine through one door only."""

from __future__ import annotations

import re

import httpx

from initserve import region_socket
from initserve.app import create_app
from initserve.routes import shared_memory
from initserve.settings import Settings
from initserve_client import _protocol
from initserve_client._receiver import CONTENT_RANGE

from servers import REPO

CLIENT = REPO / "clients/python/src/initserve_client"


def test_the_default_url_is_the_address_the_service_binds() -> None:
    host, port = Settings.model_fields["host"].default, Settings.model_fields["port"].default
    assert f"http://{host}:{port}" == _protocol.DEFAULT_URL


def test_every_path_the_client_asks_is_a_route_of_the_service() -> None:
    routes = {str(getattr(route, "path", "")) for route in create_app().routes}
    asked = {
        _protocol.PLAN_PATH,
        _protocol.INIT_PATH,
        _protocol.SHARED_MEMORY_PATH,
        _protocol.SHARED_MEMORY_INIT_PATH,
    }
    assert asked <= routes


def test_the_shared_memory_headers_are_the_services() -> None:
    # HTTP header names are case-insensitive; the service declares them in lower case.
    assert _protocol.REGION_HEADER.lower() == shared_memory.REGION_HEADER
    assert _protocol.OFFSET_HEADER.lower() == shared_memory.OFFSET_HEADER
    assert _protocol.SIZE_HEADER.lower() == shared_memory.SIZE_HEADER
    assert _protocol.DATA_RANGE_HEADER.lower() == shared_memory.DATA_RANGE_HEADER
    assert _protocol.WRITTEN_HEADER.lower() == shared_memory.WRITTEN_HEADER


def test_a_registration_message_is_the_size_the_service_reads() -> None:
    assert _protocol.REGISTRATION_MESSAGE_BYTES == region_socket.MESSAGE_BYTES


def test_an_unknown_region_is_refused_with_the_problem_type_the_client_registers_again_on() -> None:
    assert _protocol.UNKNOWN_REGION == shared_memory.UNKNOWN_REGION


def test_the_switch_a_refusal_names_is_the_services_setting(live_server: str) -> None:
    prefix = Settings.model_config.get("env_prefix", "")
    assert "allow_shared_memory" in Settings.model_fields
    assert f"{prefix}ALLOW_SHARED_MEMORY" == _protocol.SHARED_MEMORY_SWITCH
    spec = {"seed": 1, "tensors": [{"name": "w", "shape": [4], "scheme": "zeros"}]}
    off = httpx.post(f"{live_server}{_protocol.SHARED_MEMORY_INIT_PATH}", json=spec)
    assert off.status_code == 403 and _protocol.SHARED_MEMORY_SWITCH in off.text


def test_a_resumed_answer_names_its_range_as_the_client_reads_it(live_server: str) -> None:
    spec = {"seed": 1, "tensors": [{"name": "w", "shape": [64], "scheme": "normal"}]}
    url = f"{live_server}{_protocol.INIT_PATH}"
    total = len(httpx.post(url, json=spec).content)
    rest = httpx.post(url, json=spec, headers={"Range": "bytes=10-"})
    assert rest.status_code == 206
    match = CONTENT_RANGE.fullmatch(rest.headers["content-range"])
    assert match is not None and match.groups() == ("10", str(total - 1), str(total))


def test_only_the_in_process_module_imports_the_service_package() -> None:
    """``url="local"`` reaches the engine through ``initserve.in_process`` alone."""
    imports = re.compile(r"^\s*(?:import initserve\b|from initserve(?:\.\w+)* import)", re.M)
    importing = sorted(p.name for p in CLIENT.glob("*.py") if imports.search(p.read_text()))
    assert importing == ["_in_process.py"]
    uses = set(re.findall(r"from initserve import (\w+)", (CLIENT / "_in_process.py").read_text()))
    assert uses == {"InProcess", "in_process"}
