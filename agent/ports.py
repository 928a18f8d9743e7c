"""Which host ports each service claims, so that no slot lands on another's port.

A service with a ``port`` claims ``port .. port + span - 1`` for each base port
it uses (the YAML's ``port``, and a blue/green strategy's two color ports),
where ``span`` is the most instances it may run: its ``policy.max``, else its
static count, else one. ``shipmate check`` (and so ``run``) refuses services
whose claimed ranges overlap, or that reach past 65535 or onto ``agent.http``;
at run time a slot whose port would leave the service's own range into
another's, pass 65535 or hit ``agent.http`` is never started and is reported.
"""

from __future__ import annotations

from typing import Any

MAX_PORT = 65535


def base_ports(service: Any) -> list[int]:
    """The base ports of a service's config (YAML port, blue/green colors)."""
    ports = [service.port] if service.port is not None else []
    deploy = getattr(service, "deploy", None)
    for port in getattr(deploy, "ports", None) or []:
        if isinstance(port, int) and port not in ports:
            ports.append(port)
    return ports


def span(service: Any) -> int:
    """How many consecutive ports from each base the service may use."""
    if service.policy.max is not None:
        return max(1, service.policy.max)
    count = getattr(getattr(service, "source", None), "count", None)
    return max(1, count) if isinstance(count, int) else 1


def claims(services: dict[str, Any]) -> dict[str, list[range]]:
    """service -> the port ranges it claims."""
    return {name: [range(base, base + span(svc)) for base in base_ports(svc)]
            for name, svc in services.items()}


def http_port(address: str | None) -> int | None:
    if not address:
        return None
    return int(address.rsplit(":", 1)[1])


def conflicts(services: dict[str, Any], http: str | None) -> list[tuple[str, str]]:
    """``(service, message)`` for every claimed range that overlaps another, passes
    65535 or covers ``agent.http``'s port."""
    ranges = claims(services)
    agent_port = http_port(http)
    out = []
    names = sorted(ranges)
    for i, name in enumerate(names):
        for r in ranges[name]:
            if r.stop - 1 > MAX_PORT:
                out.append((name, f"ports {r.start}-{r.stop - 1} pass {MAX_PORT} "
                                  f"(lower port or policy.max)"))
            if agent_port is not None and agent_port in r:
                out.append((name, f"ports {r.start}-{r.stop - 1} cover agent.http's port "
                                  f"{agent_port}"))
            for other in names[i + 1:]:
                for o in ranges[other]:
                    if r.start < o.stop and o.start < r.stop:
                        out.append((name, f"ports {r.start}-{r.stop - 1} overlap service "
                                          f"{other}'s ports {o.start}-{o.stop - 1} "
                                          f"(slot i uses port + i, up to policy.max)"))
    return out


def slot_port_problem(service: str, port: int, ranges: dict[str, list[range]],
                      http: str | None) -> str | None:
    """Why ``service`` may not start an instance on ``port``, or None."""
    if port > MAX_PORT:
        return f"port {port} is past {MAX_PORT}: not started"
    if port == http_port(http):
        return f"port {port} is agent.http's: not started"
    for other, spans in ranges.items():
        if other != service and any(port in r for r in spans):
            return f"port {port} belongs to service {other}'s range: not started"
    return None
