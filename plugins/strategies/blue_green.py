"""The ``blue-green`` strategy: a whole new color on its own ports, then the load balancer.

A service has two fixed base ports, ``ports: [BLUE, GREEN]``; its first
release runs on blue, and each deploy moves it to the other color (slot ``i``
of a color listens on its port + ``i``). A deploy goes through these steps,
each recorded in the journal's ``strategy_state`` as ``step``:

1. ``starting``: the new release starts in full (the deploy's count) on the
   new color's ports and every instance must pass its health check within
   ``health_timeout``. Stopped instances of that release kept by an earlier
   deploy (``keep_old``) are started again instead of new ones.
2. ``switching``: the load balancer's setting is recorded in the journal
   (``lb_before``), then it is pointed at the new color. A classic ELB
   (``type: elb``): the listener on ``listener_port`` gets the new color's
   port as its instance port (classic listeners cannot be modified, so it is
   deleted and created again with the same protocols, certificate and
   policies) and the health check target moves to that port (same protocol
   and path). An ALB (``type: alb``): the new color's instances are made the
   targets of the new color's group (``target_groups: [BLUE_ARN, GREEN_ARN]``),
   with their ports, and the listener's default action forwards to that group.
3. ``baking``: the new color must stay healthy for ``bake``.
4. ``draining``: the new color is health-checked again and announced (each
   instance as it passes), only then is the old one withdrawn, drained
   (``announce: {drain}``, all at once) and stopped. With ``keep_old`` it is *parked* where the
   actuator can (docker: the containers are stopped, not removed), so that a
   rollback (``shipmate rollback``) starts the very same instances at once;
   ``release`` names their version as ``kept`` and the loop leaves them alone.
   Actuators that cannot park (process, fleet) remove them, with a warning.

A failure before the switch removes the new color and touches nothing else.
After the switch, the old color is first brought back to full health (should
it have been stopped), the load balancer is set back as recorded, and only
then is the new color removed. Every step works from the journal and from what
runs, so an agent killed anywhere is resumed by the next one. Without
``load_balancer`` the colors switch in discovery alone.

AWS credentials come only from boto3's default chain (environment, shared
profile, instance role), never from the YAML.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from agent import (
    DeployError,
    Deployment,
    Duration,
    Instance,
    Release,
    Strategy,
    StrategyConfig,
    Timeout,
    TypeConfig,
    can_park,
    hookimpl,
)
from plugins.aws import LazyClient

log = logging.getLogger("shipmate.deploy.blue-green")
Port = Annotated[int, Field(ge=1, le=65535)]
STEPS = ("starting", "switching", "baking", "draining")


class ElbConfig(TypeConfig):
    type: Literal["elb"]
    name: str = Field(min_length=1)
    "the classic load balancer's name"
    listener_port: Port
    "the LoadBalancerPort of the listener whose instance port follows the color"
    region: str = Field(min_length=1)
    "its AWS region, e.g. eu-west-1"
    endpoint_url: str | None = None
    "another endpoint for the ELB API (a VPC endpoint, or a local fake)"
    timeout: Timeout = 10.0
    "how long one API call may take"


class AlbConfig(TypeConfig):
    type: Literal["alb"]
    listener_arn: str = Field(pattern=r"^arn:")
    "the listener whose default action forwards to the live color's target group"
    target_groups: list[Annotated[str, Field(pattern=r"^arn:")]]
    "the target groups of the colors: [BLUE_ARN, GREEN_ARN]"
    region: str = Field(min_length=1)
    "its AWS region, e.g. eu-west-1"
    endpoint_url: str | None = None
    "another endpoint for the ELBv2 API (a VPC endpoint, or a local fake)"
    target_id: str | None = None
    "the Id targets register under: an EC2 instance id (default: each instance's address)"
    timeout: Timeout = 10.0
    "how long one API call may take"

    @field_validator("target_groups")
    @classmethod
    def _two_groups(cls, groups: list[str]) -> list[str]:
        if len(groups) != 2 or groups[0] == groups[1]:
            raise ValueError("target_groups must be two different target group ARNs: "
                             "[BLUE_ARN, GREEN_ARN]")
        return groups


class BlueGreenConfig(StrategyConfig):
    ports: list[Port]
    "the base ports of the two colors, [BLUE, GREEN]; slot i of a color listens on its port + i"
    load_balancer: Annotated[ElbConfig | AlbConfig, Field(discriminator="type")] | None = None
    "the AWS load balancer switched to the new color (none: discovery alone switches)"
    bake: Duration = 30.0
    "how long the new color must stay healthy behind the load balancer before the old stops"
    keep_old: bool = False
    "park the old color (stopped, kept) for an instant rollback, where the actuator can"

    @field_validator("ports")
    @classmethod
    def _two_ports(cls, ports: list[int]) -> list[int]:
        if len(ports) != 2 or ports[0] == ports[1]:
            raise ValueError("ports must be two different ports: [BLUE, GREEN]")
        return ports


# ---------------------------------------------------------------- AWS


class _Aws:
    """A lazily made boto3 client whose failures become DeployErrors naming the resource."""

    def __init__(self, service: str, config: ElbConfig | AlbConfig, where: str) -> None:
        self.service, self.config, self.where = service, config, where
        self.client = LazyClient(service, region=config.region, timeout=config.timeout,
                                 endpoint_url=config.endpoint_url)

    def __call__(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return self.client.call(method, self.where, DeployError, **kwargs)

    def close(self) -> None:
        self.client.close()


class ClassicElb:
    """Points a classic ELB listener (and its health check) at a color's port."""

    def __init__(self, config: ElbConfig, ports: list[int]) -> None:
        self.config, self.ports = config, ports
        self.where = f"ELB {config.name} in {config.region}"
        self.aws = _Aws("elb", config, self.where)

    def _describe(self) -> dict[str, Any]:
        found = self.aws("describe_load_balancers", LoadBalancerNames=[self.config.name])
        return found["LoadBalancerDescriptions"][0]

    def _listener(self, lb: dict[str, Any]) -> dict[str, Any] | None:
        return next((d for d in lb.get("ListenerDescriptions", [])
                     if d["Listener"]["LoadBalancerPort"] == self.config.listener_port), None)

    def check(self, port: int) -> None:
        """Nothing to check: a classic listener can point at any port."""

    def snapshot(self) -> dict[str, Any]:
        """What :meth:`switch` changes, as it is now (kept in the journal for a switch back)."""
        lb = self._describe()
        listener = self._listener(lb)
        if listener is None:
            raise DeployError(f"{self.where} has no listener on port {self.config.listener_port}")
        port = listener["Listener"]["InstancePort"]
        backend = next((b.get("PolicyNames", []) for b in lb.get("BackendServerDescriptions", [])
                        if b.get("InstancePort") == port), [])
        return {"listener": listener["Listener"], "policies": listener.get("PolicyNames", []),
                "backend_policies": backend, "health_check": lb.get("HealthCheck")}

    def points_to(self, before: dict[str, Any]) -> int:
        return int(before["listener"]["InstancePort"])

    def switch(self, port: int, instances: list[Instance], before: dict[str, Any]) -> None:
        """The listener's instance port and the health check target to ``port``."""
        self._apply(port, before, None)

    def restore(self, before: dict[str, Any]) -> None:
        """The listener and the health check as recorded in ``before``."""
        self._apply(self.points_to(before), before, before.get("health_check"))

    def _apply(self, port: int, before: dict[str, Any], health: dict[str, Any] | None) -> None:
        name, lb = self.config.name, self._describe()
        current = self._listener(lb)
        if current is None or current["Listener"]["InstancePort"] != port:
            # a listener cannot be modified: delete it and create it again, as it was but the port
            # (if an agent died in between, the journal's copy gives it back)
            base = current["Listener"] if current is not None else before["listener"]
            if current is not None:
                self.aws("delete_load_balancer_listeners", LoadBalancerName=name,
                         LoadBalancerPorts=[self.config.listener_port])
            listener = {k: base[k] for k in ("Protocol", "LoadBalancerPort", "InstanceProtocol",
                                             "SSLCertificateId") if base.get(k)}
            self.aws("create_load_balancer_listeners", LoadBalancerName=name,
                     Listeners=[{**listener, "InstancePort": port}])
            if before.get("policies"):
                self.aws("set_load_balancer_policies_of_listener", LoadBalancerName=name,
                         LoadBalancerPort=self.config.listener_port,
                         PolicyNames=before["policies"])
            log.info("%s: listener %d now forwards to instance port %d", self.where,
                     self.config.listener_port, port)
        if before.get("backend_policies"):
            have = next((b.get("PolicyNames", []) for b in lb.get("BackendServerDescriptions", [])
                         if b.get("InstancePort") == port), [])
            if sorted(have) != sorted(before["backend_policies"]):
                self.aws("set_load_balancer_policies_for_backend_server", LoadBalancerName=name,
                         InstancePort=port, PolicyNames=before["backend_policies"])
        check = lb.get("HealthCheck")
        wanted = health or self._retarget(check, port, self.points_to(before))
        if check and wanted and wanted != check:
            self.aws("configure_health_check", LoadBalancerName=name, HealthCheck=wanted)
            log.info("%s: health check target now %s", self.where, wanted["Target"])

    def _retarget(self, check: dict[str, Any] | None, port: int, old: int
                  ) -> dict[str, Any] | None:
        """``check`` with its target moved to ``port`` if it checks a color (or the old port)."""
        if not check or ":" not in check.get("Target", ""):
            return check
        protocol, rest = check["Target"].split(":", 1)
        number, slash, path = rest.partition("/")
        if not number.isdigit() or int(number) not in {*self.ports, old}:
            return check  # it checks something else: leave it
        return {**check, "Target": f"{protocol}:{port}{slash}{path}"}

    def close(self) -> None:
        self.aws.close()


class Alb:
    """Makes an ALB listener forward to a color's target group, its targets the new instances."""

    def __init__(self, config: AlbConfig, ports: list[int]) -> None:
        self.config, self.ports = config, ports
        self.where = f"ALB listener {config.listener_arn.split(':')[-1]} in {config.region}"
        self.aws = _Aws("elbv2", config, self.where)

    def group(self, port: int) -> str:
        if port not in self.ports:
            raise DeployError(f"{self.where}: port {port} is neither color's port "
                              f"{self.ports}: no target group for it")
        return self.config.target_groups[self.ports.index(port)]

    def check(self, port: int) -> None:
        self.group(port)

    def _actions(self) -> list[dict[str, Any]]:
        found = self.aws("describe_listeners", ListenerArns=[self.config.listener_arn])
        return found["Listeners"][0].get("DefaultActions", [])

    def snapshot(self) -> dict[str, Any]:
        forward = [a for a in self._actions() if a.get("Type") == "forward"]
        if not forward:
            raise DeployError(f"{self.where}: its default action does not forward to a "
                              "target group")
        return {"forward": _scrub(forward[0])}

    def points_to(self, before: dict[str, Any]) -> str:
        forward = before["forward"]
        groups = [g["TargetGroupArn"] for g in
                  (forward.get("ForwardConfig") or {}).get("TargetGroups", [])]
        return forward.get("TargetGroupArn") or ",".join(groups)

    def switch(self, port: int, instances: list[Instance], before: dict[str, Any]) -> None:
        """Targets of the color's group = ``instances``; the listener forwards to the group."""
        group = self.group(port)
        want = {(self.config.target_id or i.host, i.port) for i in instances}
        have = {(t["Target"]["Id"], t["Target"].get("Port")) for t in self.aws(
            "describe_target_health", TargetGroupArn=group)["TargetHealthDescriptions"]}
        stale = have - want
        if stale:  # instances of an earlier deploy of this color that are gone
            self.aws("deregister_targets", TargetGroupArn=group,
                     Targets=[{"Id": i, "Port": p} for i, p in sorted(stale)])
        if want - have or stale:
            self.aws("register_targets", TargetGroupArn=group,
                     Targets=[{"Id": i, "Port": p} for i, p in sorted(want)])
        self._forward({"Type": "forward", "TargetGroupArn": group})

    def restore(self, before: dict[str, Any]) -> None:
        self._forward(before["forward"])

    def _forward(self, forward: dict[str, Any]) -> None:
        actions = self._actions()
        old = [_scrub(a) for a in actions if a.get("Type") == "forward"]
        if old and _groups(old[0]) == _groups(forward):
            return
        new = []
        for action in actions:  # keep the other actions (authentication, ...) as they are
            if action.get("Type") == "forward":
                action = {**forward, **({"Order": action["Order"]} if "Order" in action else {})}
            elif action.get("Type") == "authenticate-oidc":
                config = {**action["AuthenticateOidcConfig"], "UseExistingClientSecret": True}
                action = {**action, "AuthenticateOidcConfig": config}
            new.append(action)
        self.aws("modify_listener", ListenerArn=self.config.listener_arn, DefaultActions=new)
        log.info("%s now forwards to %s", self.where, ", ".join(sorted(_groups(forward))))

    def close(self) -> None:
        self.aws.close()


def _groups(forward: dict[str, Any]) -> set[str]:
    """The target groups a forward action sends traffic to."""
    weighted = (forward.get("ForwardConfig") or {}).get("TargetGroups") or []
    groups = {g["TargetGroupArn"] for g in weighted if g.get("Weight", 1) > 0}
    if not groups and forward.get("TargetGroupArn"):
        groups = {forward["TargetGroupArn"]}
    return groups


def _scrub(value: Any) -> Any:
    """``value`` without any key that names a secret (the journal is no place for one)."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if "secret" not in k.lower()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


# ---------------------------------------------------------------- the strategy


class BlueGreenStrategy(Strategy):
    """Starts the new color in full, switches the load balancer, then stops the old color."""

    type_name = "blue-green"

    @classmethod
    def requirements(cls, config: BlueGreenConfig) -> dict[str, str]:
        return {"boto3": "shipmate[aws]"} if config.load_balancer else {}
    Config = BlueGreenConfig

    def __init__(self, config: BlueGreenConfig, context: Any) -> None:
        super().__init__(config, context)
        self._balancer: ClassicElb | Alb | None = None

    @classmethod
    def actuator_problem(cls, config: BlueGreenConfig, actuator: type) -> str | None:
        if config.keep_old and not can_park(actuator):
            name = getattr(actuator, "type_name", actuator.__name__)
            return (f"keep_old: the {name} actuator cannot keep stopped instances (it has no "
                    "park/unpark: agent.Parking); set keep_old: false, or use one that can "
                    "(docker)")
        return None

    def initial_port(self, port: int | None) -> int | None:
        return self.config.ports[0]

    def target_port(self, current: int | None, configured: int | None) -> int | None:
        blue, green = self.config.ports
        return green if current == blue else blue

    def color(self, port: int | None) -> str:
        blue, green = self.config.ports
        return {blue: "blue", green: "green"}.get(port, f"port {port}")

    def balancer(self) -> ClassicElb | Alb | None:
        lb = self.config.load_balancer
        if lb is not None and self._balancer is None:
            self._balancer = (ClassicElb if lb.type == "elb" else Alb)(lb, self.config.ports)
        return self._balancer

    def close(self) -> None:
        if self._balancer is not None:
            self._balancer.close()

    # ------------------------------------------------------------ forward
    def run(self, deploy: Deployment) -> None:
        source, target, count = deploy.source, deploy.target, deploy.desired
        new, lb = self.color(target.port), self.balancer()
        step = deploy.state.get("step") or "starting"
        if step not in STEPS:
            raise DeployError(f"blue-green: the journal names an unknown step {step!r}")
        if step == "starting":
            self._check_ports(deploy)
            if lb is not None:  # read-only: a wrong load balancer fails before anything starts
                lb.check(target.port)
                lb.snapshot()
            deploy.save_state(step="starting", announce=[source.version])
            deploy.progress(0, count, f"starting {new}: {count} of {target.label}")
            self._bring_up(deploy, target, count)
            deploy.save_state(step="switching")
            step = "switching"
        if step == "switching":
            if lb is not None:
                before = deploy.state.get("lb_before")
                if before is None:  # recorded before the first change, for the switch back
                    before = lb.snapshot()
                    deploy.save_state(lb_before=before)
                if isinstance(lb, ClassicElb) and lb.points_to(before) != source.port:
                    log.warning("%s: %s pointed at port %s, not at the old color's %s",
                                deploy.service, lb.where, lb.points_to(before), source.port)
                deploy.progress(count, count, f"switching {lb.where} to {new}")
                deploy.check()
                lb.switch(target.port, self._color(deploy, target, count), before)
            deploy.save_state(step="baking", baking_since=time.time())
            step = "baking"
        if step == "baking":
            self._bake(deploy, float(deploy.state.get("baking_since") or time.time()))
            deploy.save_state(step="draining", announce=[target.version],
                              kept=source.version if self._parks(deploy) else None)
        self._drain(deploy)

    def _check_ports(self, deploy: Deployment) -> None:
        source, target, count = deploy.source.port, deploy.target.port, deploy.desired
        if target is None:
            raise DeployError("blue-green: the new release has no port")
        if source is not None and abs(source - target) < max(count, 1):
            raise DeployError(
                f"blue-green: {count} instances on port {target} and up would share ports with "
                f"the running ones on {source} and up: the colors' ports must lie at least the "
                "count apart")

    def _parks(self, deploy: Deployment) -> bool:
        """keep_old, on an actuator that can (checked at load: see :meth:`actuator_problem`;
        ``shipmate deploy --strategy blue-green`` runs with the defaults: keep_old false)."""
        return bool(self.config.keep_old and deploy.can_park)

    def _color(self, deploy: Deployment, release: Release, count: int) -> list[Instance]:
        return sorted((i for i in deploy.instances() if i.version == release.version
                       and i.running and i.slot < count), key=lambda i: i.slot)

    def _bring_up(self, deploy: Deployment, release: Release, count: int) -> None:
        """Slots 0..count-1 of ``release`` running and healthy; kept ones started again."""
        kept = release.version in deploy.kept() and deploy.can_park
        up: dict[int, Instance] = {}
        for instance in sorted(deploy.instances(), key=lambda i: not i.running):
            if instance.version != release.version:
                continue
            if instance.slot >= count or instance.slot in up:
                deploy.stop(instance, "deploy: above the count")
            elif instance.running:
                up[instance.slot] = instance
            elif kept:
                try:
                    up[instance.slot] = deploy.unpark(instance)
                except DeployError:
                    raise
                except Exception as exc:  # noqa: BLE001 - start a new one instead
                    log.warning("%s: cannot start kept %s again (%s): starting a new one",
                                deploy.service, instance.name, exc)
                    deploy.stop(instance, "exited")
            else:
                deploy.stop(instance, "exited")
        for slot in range(count):
            if slot not in up:
                up[slot] = deploy.start(slot, release)
        deploy.wait_healthy(list(up.values()), self.config.health_timeout)

    def _bake(self, deploy: Deployment, since: float) -> None:
        """The new color must stay healthy for ``bake`` (two failed checks in a row fail it)."""
        target, count, bake = deploy.target, deploy.desired, self.config.bake
        strikes: dict[str, int] = {}
        reported = -1.0
        while True:
            elapsed = max(0.0, time.time() - since)
            running = {i.slot: i for i in self._color(deploy, target, count)}
            for slot in range(count):
                instance = running.get(slot)
                if instance is None:
                    raise DeployError(f"slot {slot} of {self.color(target.port)} stopped during "
                                      f"the bake, {elapsed:.0f}s after the switch "
                                      f"({deploy.check_text()})")
                strikes[instance.name] = (0 if deploy.healthy(instance)
                                          else strikes.get(instance.name, 0) + 1)
                if strikes[instance.name] >= 2:
                    raise DeployError(f"{instance.name} failed its health check during the "
                                      f"bake, {elapsed:.0f}s after the switch "
                                      f"({deploy.check_text()})")
            if elapsed >= bake:
                return
            if elapsed - reported >= 5 or reported < 0:
                reported = elapsed
                deploy.progress(count, count, f"baking {self.color(target.port)}: "
                                f"{elapsed:.0f}s of {bake:g}s")
            deploy.sleep(min(0.5, bake - elapsed))

    def _drain(self, deploy: Deployment) -> None:
        """Stop (or park) every instance that is not the new color."""
        source, target, count = deploy.source, deploy.target, deploy.desired
        park = self._parks(deploy)
        old = self.color(source.port)
        # discovery: the new color in (each as its check passes) before anything old goes out
        deploy.wait_healthy(self._color(deploy, target, count), self.config.health_timeout)
        deploy.progress(count, count, f"stopping {old}" + (" (kept)" if park else ""))
        todo: list[tuple[Instance, str | None]] = []
        for instance in deploy.instances():
            if instance.version == target.version:
                if instance.slot >= count:
                    todo.append((instance, "deploy: above the count"))
            elif park and instance.version == source.version:
                if instance.running:
                    todo.append((instance, None))
            else:  # the old color when not kept, exited leftovers, an older kept release
                todo.append((instance, "deploy: old color"))
        self._parallel(deploy, todo)
        deploy.progress(count, count, f"{self.color(target.port)} serves; {old} "
                        + ("kept stopped" if park else "removed"))

    @staticmethod
    def _parallel(deploy: Deployment, todo: list[tuple[Instance, str | None]]) -> None:
        """Withdraw all of ``todo``, drain once, then stop (reason) or park (None) them, a
        few at a time."""
        if todo:
            deploy.retire(todo, parallel=min(8, deploy.parallelism))

    # ------------------------------------------------------------ backward
    def rollback(self, deploy: Deployment, reason: str) -> None:
        """Old color back (if stopped), load balancer back (if switched), new color removed."""
        source, target, count = deploy.source, deploy.target, deploy.desired
        old, lb = self.color(source.port), self.balancer()
        before = deploy.state.get("lb_before")
        if before is not None or deploy.state.get("step") == "draining":
            deploy.progress(0, count, f"rolling back: {old} back to {count} healthy")
            self._bring_up(deploy, source, count)
            if before is not None and lb is not None:
                deploy.progress(count, count, f"rolling back: switching {lb.where} back")
                lb.restore(before)
        deploy.save_state(announce=[source.version])
        # the old color back in discovery (each seen passing now) before the new goes out
        deploy.announce(*[i for i in self._color(deploy, source, count) if deploy.healthy(i)])
        # the new release was kept by an earlier deploy: keep it again rather than lose it
        park = target.version in deploy.kept() - {deploy.journal.kept} and deploy.can_park
        todo = []
        for instance in deploy.instances():
            if instance.version != target.version:
                continue
            if not (park and instance.slot < count):
                todo.append((instance, "deploy: rolled back"))
            elif instance.running:  # (a parked one stays parked)
                todo.append((instance, None))
        deploy.progress(count, count, f"rolling back: removing {self.color(target.port)}")
        self._parallel(deploy, todo)


@hookimpl
def shipmate_strategy_types() -> list[type[Strategy]]:
    return [BlueGreenStrategy]
