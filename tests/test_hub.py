"""Without a route to the hub, hub loaders are switched to offline mode (fail fast)."""

from __future__ import annotations

import socket

from skimbench import hub


def test_unreachable_hub_switches_to_offline(monkeypatch):
    for var in (*hub.OFFLINE_VARS, *hub.PROXY_VARS):
        monkeypatch.delenv(var, raising=False)

    def no_dns(*_args, **_kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert not hub.hub_offline()
    hub.go_offline_if_unreachable()
    assert hub.hub_offline()


def test_reachable_hub_or_proxy_is_left_alone(monkeypatch):
    for var in (*hub.OFFLINE_VARS, *hub.PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [("ok",)])
    hub.go_offline_if_unreachable()
    assert not hub.hub_offline()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    hub.go_offline_if_unreachable()
    assert not hub.hub_offline()
