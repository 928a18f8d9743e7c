"""The config file: YAML with line numbers, ``${VAR}``, defaults, and every error at once.

Loading goes in three steps, so that every mistake is reported with its file,
line and key, and all of them together:

1. YAML is composed into nodes (keeping each node's line) and turned into
   plain data; ``${VAR}`` and ``${VAR:-default}`` are filled from the
   environment; duplicate keys are errors.
2. ``defaults`` are merged under each service (a plugin block whose ``type``
   differs from the default's replaces it whole).
3. The data is validated by a pydantic model built from the registered plugin
   types, so plugin keys are checked (and appear in ``shipmate schema``) like
   built-in ones. The top-level ``plugins: {NAME: {...}}`` blocks are each
   validated by the model that plugin declares (``shipmate_config_model``).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from agent import masking
from agent.combine import Combine, CombineError
from agent.durations import Duration, Interval, Timeout
from agent.plugins import Plugins
from agent.tls import TLSConfig

NAME = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
MAX_FILE = 4 * 1024 * 1024  # bytes of config: a big cluster's is a few hundred KiB
ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
PLUGIN_BLOCKS = {"source": "source", "actuator": "actuator", "announce": "announcer",
                 "deploy": "strategy"}
log = logging.getLogger("shipmate.config")
_warned: set[str] = set()  # each deprecation once per process (a reload reads the file again)
Path_ = tuple[str | int, ...]


class ConfigError(Exception):
    """Every problem found in a config file, each as ``file:line: key: message``."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(Model):
    backend: Literal["embedded", "etcd", "etcd2"] = "embedded"
    path: Path = Path(".shipmate/state.db")
    "embedded only; relative to the config file's folder"
    endpoints: list[str] = ["http://127.0.0.1:2379"]
    prefix: str = Field("/shipmate", pattern=r"^/")
    timeout: Duration = Field(5.0, gt=0)
    tls: TLSConfig = TLSConfig()
    "for https:// endpoints: ca, cert, key, verify"
    username: str | None = None
    "etcd authentication (v3: a token from /v3/auth/authenticate; v2: basic auth)"
    password: SecretStr | None = None
    "write it as ${ETCD_PASSWORD}: taken from the environment, never echoed"
    allow_insecure: bool = False
    "allow a password over plain http:// (it is then readable on the wire)"

    @model_validator(mode="after")
    def _credentials(self) -> StoreConfig:
        if self.backend == "embedded":
            return self
        in_url = [u for u in self.endpoints if _url_password(u)]
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        plain = [u for u in self.endpoints if not u.lower().startswith("https://")]
        if (self.password is not None or in_url) and plain and not self.allow_insecure:
            raise ValueError(
                "a password over http:// is sent in the clear: use https:// endpoints "
                "(with tls:), or set allow_insecure: true")
        return self


def _url_password(url: str) -> bool:
    try:
        return bool(urlsplit(url if "://" in url else f"http://{url}").password)
    except ValueError:
        return False


class PluginsConfig(Model):
    autoload: bool = True
    block: list[str] = []


class AgentConfig(Model):
    cluster: str = Field(pattern=NAME)
    store: StoreConfig = StoreConfig()
    interval: Interval = 10.0
    "a full pass at least this often (every announcement synced)"
    resync: Duration = Field(300.0, ge=1.0)
    "how often every store key's revision is compared with what the store watch said"
    http: str | None = Field(None, pattern=r"^[^:]*:\d+$")
    "host:port of /healthz, /metrics and /status (the last readings, for status)"
    state_dir: Path = Path(".shipmate")
    "local state (process records, logs); relative to the config file's folder"
    plugins: PluginsConfig = PluginsConfig()
    grace: Duration = 10.0
    "how long a stopping instance gets between SIGTERM and SIGKILL"
    parallelism: int = Field(4, ge=1)
    "starts and stops run at once per actuator"
    max_instances: int = Field(100, ge=1, le=100_000)
    "hard ceiling of instances per service, whatever the store or a source says"
    leader_ttl: Duration = Field(15.0, ge=3.0)
    "the acting agent's lease"
    orphans: Literal["keep", "stop"] = "keep"
    "instances of services no longer in the YAML: keep them (withdrawn), or stop them"
    default_strategy: str = Field("rolling", pattern=NAME)
    "the deploy strategy (with its defaults) of a service without a deploy: block"


class HealthConfig(Model):
    http: str | None = Field(None, pattern=r"^/")
    "an HTTP path that must answer 2xx or 3xx"
    tcp: bool = False
    "a TCP connect to the instance's port"
    timeout: Timeout = 2.0
    "how long one check may take"
    interval: Interval = 10.0
    "how often a healthy instance is checked (one not healthy yet: from every 100ms, backing off)"

    @model_validator(mode="after")
    def _one_check(self) -> HealthConfig:
        if self.http and self.tcp:
            raise ValueError("choose one check: http or tcp")
        return self


class RestartConfig(Model):
    """Crash-loop backoff of a slot whose instance exits or fails to start."""

    backoff: Duration = Field(1.0, gt=0)
    "the first delay before a slot is started again"
    max_backoff: Duration = Field(300.0, gt=0)
    "the delay doubles up to this"
    reset_after: Duration = Field(600.0, gt=0)
    "an instance up and healthy this long resets its slot's delay"


class PolicyConfig(Model):
    """How readings become a desired count; the rules are in :mod:`agent.policy`."""

    min: int = Field(0, ge=0)
    "never fewer instances than this"
    max: int | None = Field(None, ge=0)
    "never more instances than this (none: no upper limit)"
    max_step: int | None = Field(None, ge=1)
    "the largest change of the count in one decision (none: no limit)"
    cooldown: Duration | None = None
    "sets both cooldown_up and cooldown_down (each may still be given on its own)"
    cooldown_up: Duration | None = None
    "after any change, how long before the count may rise (default: cooldown, else 0)"
    cooldown_down: Duration | None = None
    "after any change, how long before the count may fall (default: cooldown, else 0)"
    stabilization: Duration = 0.0
    "a scale-down goes only to the highest count recommended over this window"
    on_error: Literal["hold", "fallback"] = "hold"
    "when the source fails: hold the count, or after fallback_after failures use fallback"
    fallback: int | None = Field(None, ge=0)
    "with on_error fallback: the count to rise to (never lowers the current count)"
    fallback_after: int = Field(3, ge=1)
    "consecutive failed readings before the fallback applies"
    shadow: bool = False
    "decide and record (store, status, metrics) what the policy would set, but never write it"

    @model_validator(mode="after")
    def _consistent(self) -> PolicyConfig:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        if self.on_error == "fallback" and self.fallback is None:
            raise ValueError("on_error: fallback needs a fallback count (fallback: N)")
        if self.fallback is not None and not (
                self.min <= self.fallback <= (self.max if self.max is not None else self.fallback)):
            raise ValueError(f"fallback ({self.fallback}) must lie within min ({self.min}) "
                             f"and max ({self.max})")
        return self

    @property
    def up_cooldown(self) -> float:
        """Seconds after a change before the count may rise."""
        return _first(self.cooldown_up, self.cooldown)

    @property
    def down_cooldown(self) -> float:
        """Seconds after a change before the count may fall."""
        return _first(self.cooldown_down, self.cooldown)


def _first(*values: float | None) -> float:
    return next((v for v in values if v is not None), 0.0)


class ServiceBase(Model):
    image: str | None = None
    command: list[str] | None = None
    port: int | None = Field(None, ge=1, le=65535)
    env: dict[str, str] = {}
    health: HealthConfig | None = None
    policy: PolicyConfig = PolicyConfig()
    restart: RestartConfig = RestartConfig()
    _secrets: frozenset[str] = PrivateAttr(default_factory=frozenset)
    "values the YAML took from the environment: never stored in a release (agent.releases)"

    @field_validator("health", mode="before")
    @classmethod
    def _no_health(cls, value: Any) -> Any:
        # `health: none` (a string in YAML) means what `health: null` does: running is healthy
        return None if isinstance(value, str) and value.strip().lower() == "none" else value


class Config(BaseModel):
    """A loaded config: ``agent``, ``services`` (defaults merged in), and where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    agent: AgentConfig
    services: dict[str, Any]
    path: Path
    base_dir: Path
    warnings: list[str] = []
    "deprecations found in the file, each as ``file:line: key: message`` (also logged)"
    plugins: dict[str, Any] = {}
    "plugin name -> its ``plugins:`` block, validated by the plugin's own model"

    def resolve(self, path: Path) -> Path:
        """A path from the config, relative to the config file's folder."""
        return path if path.is_absolute() else self.base_dir / path

    @property
    def key_prefix(self) -> str:
        """``<prefix>/<cluster>``: where this cluster's keys live."""
        return f"{self.agent.store.prefix.rstrip('/')}/{self.agent.cluster}"


# ---------------------------------------------------------------- models


def _union(plugins: Plugins, kind: str) -> Any:
    models = [entry.model for entry in plugins.types[kind].values()]
    if not models:
        return None
    return Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007


class _SourcesRules(ServiceBase):
    """``source`` or ``sources`` (exactly one), and ``combine`` over the sources' names."""

    @field_validator("sources", check_fields=False)
    @classmethod
    def _named_once(cls, sources: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if sources is None:
            return None
        if info.data.get("source") is not None:
            raise ValueError("give either source: (one) or sources: (several), not both")
        seen: dict[str, int] = {}
        for i, cfg in enumerate(sources):
            name = source_name(cfg)
            if name in seen:
                raise ValueError(f"sources [{seen[name]}] and [{i}] are both named {name!r}: "
                                 "give each its own name: (a letter, then letters, digits, _)")
            seen[name] = i
        return sources

    @field_validator("combine", check_fields=False)
    @classmethod
    def _combinable(cls, combine: str, info: ValidationInfo) -> str:
        sources = info.data.get("sources")
        if sources is None:
            if "sources" in info.data:  # sources itself is valid: it is just not there
                raise ValueError("only with sources: (several sources to combine)")
            return combine
        try:
            Combine.parse(combine, [source_name(cfg) for cfg in sources])
        except CombineError as exc:
            raise ValueError(str(exc)) from None
        return combine

    @model_validator(mode="after")
    def _one_source(self) -> Any:
        if getattr(self, "source", None) is None and getattr(self, "sources", None) is None:
            raise ValueError("a service needs a source: (or several in sources:)")
        return self


def source_name(cfg: Any) -> str:
    """A source block's name: its ``name``, else its type."""
    return getattr(cfg, "name", None) or cfg.type


def service_model(plugins: Plugins) -> type[BaseModel]:
    """The service model with each plugin block typed by the registered types."""
    fields: dict[str, Any] = {}
    for block, kind in PLUGIN_BLOCKS.items():
        union = _union(plugins, kind)
        if union is None:
            fields[block] = (None, None)
        elif block == "actuator":
            fields[block] = (union, ...)
        else:
            fields[block] = (union | None, None)
    source = _union(plugins, "source")
    # after `source` (the validators read it), then `combine` (it reads both)
    fields["sources"] = ((Annotated[list[source], Field(min_length=1)] | None, None)
                         if source is not None else (None, None))
    fields["combine"] = (str, Field("max", description="max | min | sum | an expression "
                                                       "over the sources' names"))
    return create_model("ServiceConfig", __base__=_SourcesRules, **fields)


def plugin_blocks_model(plugins: Plugins) -> type[BaseModel]:
    """The model of the top-level ``plugins:``: one optional block per plugin that
    declares a model, keyed by the plugin's name."""
    fields: dict[str, Any] = {
        f"plugin_{i}": (model | None, Field(None, alias=name))
        for i, (name, model) in enumerate(sorted(plugins.config_models.items()))}
    return create_model("PluginBlocks", __base__=Model, **fields)


def file_model(plugins: Plugins, service: type[BaseModel] | None = None) -> type[BaseModel]:
    """The model of the whole file (what ``shipmate schema`` prints)."""
    service = service or service_model(plugins)
    blocks = plugin_blocks_model(plugins)
    return create_model(
        "ShipmateConfig", __base__=Model,
        agent=(AgentConfig, ...),
        defaults=(dict[str, Any], {}),
        services=(dict[Annotated[str, Field(pattern=NAME)], service], {}),
        plugins=(blocks, Field(default_factory=blocks)),
    )


def _plugin_blocks(data: dict[str, Any], plugins: Plugins,
                   lines: dict[Path_, int]) -> tuple[dict[str, Any], list[tuple[int, str, str]]]:
    """``data`` without the blocks of plugins left out on purpose (blocked, or autoload
    off: their blocks wait for them), and an error for each block of a loaded plugin
    that declares no model."""
    blocks = data.get("plugins")
    if not isinstance(blocks, dict):
        return data, []
    kept, problems = {}, []
    for name, block in blocks.items():
        if name in plugins.config_models:
            kept[name] = {} if block is None else block  # `NAME:` alone: the defaults
        elif name in plugins.infos:
            problems.append((_line(lines, ("plugins", name)), f"plugins.{name}",
                             f"plugin {name!r} takes no config block (it declares no "
                             "shipmate_config_model)"))
        elif name not in plugins.skipped:
            kept[name] = block  # refused by the model as an unknown plugin
    return {**data, "plugins": kept}, problems


class _FileFields(BaseModel):
    agent: AgentConfig
    defaults: dict[str, Any] = {}
    services: dict[str, Any] = {}
    plugins: dict[str, Any] = {}


FILE_MODEL_FIELDS = _FileFields


# ---------------------------------------------------------------- YAML with lines


class _Reader:
    """Turns YAML nodes into data, recording the line of every key and value."""

    def __init__(self, text: str, source: str) -> None:
        self.loader = yaml.SafeLoader(text)
        self.source = source
        self.lines: dict[Path_, int] = {}
        self.from_env: set[str] = set()  # values taken from the environment: never echoed
        self.errors: list[tuple[int, str, str]] = []

    def read(self) -> Any:
        node = self.loader.get_single_node()
        return {} if node is None else self.value(node, ())

    def value(self, node: yaml.Node, path: Path_) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(path, line)
        if len(path) > MAX_DEPTH:  # also what a recursive alias (a: &a [*a]) becomes
            self.errors.append((line, _dotted(path[:3]) + "...",
                                f"nested deeper than {MAX_DEPTH} levels (a recursive alias?)"))
            return None
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                key = self.scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) \
                    else _NOT_A_KEY
                if key is _NOT_A_KEY:
                    self.errors.append((line, _dotted(path), "a key must be a plain value, "
                                        "not a list or a mapping"))
                    continue
                if key in out:
                    self.errors.append((line, _dotted(path + (key,)), "duplicate key"))
                self.lines[path + (key,)] = line
                out[key] = self.value(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, path + (i,)) for i, item in enumerate(node.value)]
        scalar = self.scalar(node, path)
        if scalar is _NOT_A_KEY:
            return None
        if isinstance(scalar, str) and "${" in scalar:
            scalar = self.substitute(scalar, line, path)
        return scalar

    def scalar(self, node: yaml.Node, path: Path_) -> Any:
        """A scalar node's value; a tag that cannot make it (``!!float x``) is an error."""
        try:
            return self.loader.construct_object(node)
        except (ValueError, TypeError, AttributeError, OverflowError,
                yaml.YAMLError) as exc:
            tag = node.tag.rsplit(":", 1)[-1] if node.tag else "value"
            detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            if "integer string conversion" in detail:
                detail = "the number is far too long"
            self.errors.append((node.start_mark.line + 1, _dotted(path),
                                f"cannot read {str(node.value)[:40]!r} as {tag}: {detail}"))
            return _NOT_A_KEY

    def substitute(self, text: str, line: int, path: Path_) -> str:
        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                if os.environ[name]:
                    self.from_env.add(os.environ[name])
                return os.environ[name]
            if default is not None:
                return default
            self.errors.append((line, _dotted(path), f"environment variable {name} is not set"))
            return ""

        return ENV_VAR.sub(repl, text)


MAX_DEPTH = 64
_NOT_A_KEY = object()


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


# ---------------------------------------------------------------- defaults


def merge(default: Any, override: Any) -> Any:
    """``override`` laid over ``default``; a plugin block of another type replaces it."""
    if not (isinstance(default, dict) and isinstance(override, dict)):
        return override
    if "type" in default and "type" in override and default["type"] != override["type"]:
        return override
    out = dict(default)
    for key, value in override.items():
        out[key] = merge(default[key], value) if key in default else value
    return out


def _for_service(defaults: dict[str, Any], service: Any) -> dict[str, Any]:
    """The defaults that apply to ``service``: its own ``source`` or ``sources`` replaces
    the other spelling in the defaults (and ``combine`` goes with ``sources``)."""
    if not isinstance(service, dict):
        return defaults
    if "sources" in service:
        return {k: v for k, v in defaults.items() if k != "source"}
    if "source" in service:
        return {k: v for k, v in defaults.items() if k not in ("sources", "combine")}
    return defaults


# ---------------------------------------------------------------- errors


def _unwrap(annotation: Any) -> Any:
    while hasattr(annotation, "__origin__") or hasattr(annotation, "__args__"):
        args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
        if hasattr(annotation, "__metadata__"):
            annotation = annotation.__origin__
        elif len(args) == 1:
            annotation = args[0]
        else:
            return annotation
    return annotation


def _locate(loc: Path_, service_types: set[str]) -> Path_:
    """Drop discriminator tags that pydantic puts in locations (``source.static.count``)."""
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if (i > 0 and loc[i - 1] in PLUGIN_BLOCKS and isinstance(part, str)
                and part in service_types and len(loc) > i + 1):
            continue
        if (i > 1 and loc[i - 2] == "sources" and isinstance(loc[i - 1], int)
                and isinstance(part, str) and part in service_types and len(loc) > i + 1):
            continue  # sources[0].static.count
        out.append(part)
    return tuple(out)


def _line(lines: dict[Path_, int], path: Path_) -> int:
    """The line of ``path``, else of its nearest parent in the file."""
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return 1


def _allowed_keys(service: Any, loc: Path_, plugins: Plugins, data: Any) -> list[str]:
    """The keys allowed at ``loc`` (for "did you mean" hints), following the chosen types."""
    model: Any = FILE_MODEL_FIELDS
    node = data
    for i, part in enumerate(loc):
        node = node.get(part) if isinstance(node, dict) else None
        if loc[0] == "services" and i == 1:
            model = service
            continue
        if loc[0] == "services" and i == 2 and part == "sources":
            continue
        if loc[0] == "services" and (i == 2 and part in PLUGIN_BLOCKS or (
                i == 3 and loc[2] == "sources" and isinstance(part, int))):
            kind = PLUGIN_BLOCKS[part] if i == 2 else "source"
            tag = node.get("type") if isinstance(node, dict) else None
            entry = plugins.types[kind].get(tag)
            model = entry.model if entry else None
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        model = _unwrap(fields[part].annotation)
    return [f.alias or name for name, f in getattr(model, "model_fields", {}).items()]


def _messages(exc: ValidationError, service: Any, plugins: Plugins,
              lines: dict[Path_, int], data: dict[str, Any]) -> list[tuple[int, str, str]]:
    tags = {name for kind in plugins.types.values() for name in kind}
    out = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = _locate(tuple(err["loc"]), tags)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc[:1] == ("plugins",) and len(loc) == 2:
            close = difflib.get_close_matches(str(loc[1]), list(plugins.infos), n=1)
            msg = f"unknown plugin {loc[1]!r}" + (
                f" (did you mean {close[0]!r}?)" if close else
                " (`shipmate plugins` lists the installed ones)")
        elif err["type"] == "extra_forbidden" and loc[:1] == ("plugins",):
            model = plugins.config_models.get(str(loc[1]))
            allowed = _model_keys(model, loc[2:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {loc[-1]!r}" + (
                f" (did you mean {close[0]!r}?)" if close
                else f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "extra_forbidden":
            allowed = _allowed_keys(service, loc[:-1], plugins, data)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {loc[-1]!r}" + (
                f" (did you mean {close[0]!r}?)" if close
                else f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            plugin_block = loc[:1] == ("services",) and (
                len(loc) == 3 and loc[2] in PLUGIN_BLOCKS
                or len(loc) == 4 and loc[2] == "sources")
            msg = f"unknown type {ctx.get('tag')!r}; " + (
                f"installed: {ctx.get('expected_tags')} (`shipmate plugins` lists them)"
                if plugin_block else f"expected one of {ctx.get('expected_tags')}")
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get(
                "pattern") == NAME:
            msg = "use lowercase letters, digits and '-', starting and ending with a letter " \
                  "or digit (like web-api)"
        if len(loc) > 2 and loc[0] == "services" and loc not in lines and (
                "defaults", *loc[2:]) in lines:
            loc = ("defaults", *loc[2:])  # one error for the default, not one per service
        out.append((_line(lines, loc), _dotted(loc), msg))
    return list(dict.fromkeys(out))


def _model_keys(model: Any, path: Path_) -> list[str]:
    """The keys of ``model`` (or of its nested model at ``path``)."""
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return []
        model = _unwrap(fields[part].annotation)
    return [f.alias or name for name, f in getattr(model, "model_fields", {}).items()]


STORE_REQUIRES = {"etcd": {"etcd3gw": "shipmate[etcd]"}, "etcd2": {"etcd": "shipmate[etcd]"}}


def _missing_packages(parsed: Any, plugins: Plugins,
                      lines: dict[Path_, int]) -> list[tuple[int, str, str]]:
    """A problem for every chosen type (or store backend) whose client library is missing."""
    wanted: list[tuple[Path_, str, dict[str, str]]] = []
    backend = parsed.agent.store.backend
    wanted.append((("agent", "store", "backend"), f"the {backend} store",
                   STORE_REQUIRES.get(backend, {})))
    for name, svc in parsed.services.items():
        blocks: list[tuple[Path_, str, Any]] = [
            (("services", name, block), kind, getattr(svc, block, None))
            for block, kind in PLUGIN_BLOCKS.items()]
        blocks += [(("services", name, "sources", i), "source", cfg)
                   for i, cfg in enumerate(getattr(svc, "sources", None) or [])]
        for path, kind, cfg in blocks:
            if cfg is not None:
                tag = cfg.type
                entry = plugins.types[kind][tag]
                wanted.append((path, f"the {tag} {kind}", entry.cls.requirements(cfg)))
    out = []
    for path, what, requires in wanted:
        for module, package in requires.items():
            if importlib.util.find_spec(module) is None:
                out.append((_line(lines, path), _dotted(path),
                            f"{what} needs the Python package {module!r}: "
                            f"pip install '{package}'"))
    return out


def _deploy_types(data: dict[str, Any], lines: dict[Path_, int], source: str
                  ) -> tuple[list[str], list[tuple[int, str, str]]]:
    """``deploy: {strategy: NAME}``, the old spelling, read as ``type: NAME`` (in place),
    with a deprecation warning naming its line; both keys at once are an error."""
    warnings: list[str] = []
    problems: list[tuple[int, str, str]] = []
    defaults, services = data.get("defaults"), data.get("services")
    blocks = [(("defaults", "deploy"), defaults.get("deploy"))] if isinstance(
        defaults, dict) else []
    if isinstance(services, dict):
        blocks += [(("services", name, "deploy"), svc.get("deploy"))
                   for name, svc in services.items() if isinstance(svc, dict)]
    for path, block in blocks:
        if not isinstance(block, dict) or "strategy" not in block:
            continue
        where = path + ("strategy",)
        line = _line(lines, where)
        if "type" in block:
            problems.append((line, _dotted(where), "give the deploy's type once, as type: "
                             "(strategy: is its old name)"))
            del block["strategy"]  # one error, not a second one for an unknown key
            continue
        block["type"] = block.pop("strategy")
        lines.setdefault(path + ("type",), line)
        warnings.append(f"{source}:{line}: {_dotted(where)}: deprecated: write "
                        f"type: {block['type']} (strategy: is the old name of the key)")
    return warnings, problems


def _strategy_problems(parsed: Any, plugins: Plugins, lines: dict[Path_, int],
                       explicit: bool) -> list[tuple[int, str, str]]:
    """A problem for each service whose strategy cannot run: the default strategy
    (``agent.default_strategy``, for services without a ``deploy:`` block) not installed
    or needing settings, or a strategy that cannot work with the service's actuator
    (:meth:`agent.kinds.Strategy.actuator_problem`)."""
    out: list[tuple[int, str, str]] = []
    name = parsed.agent.default_strategy
    entry = plugins.types["strategy"].get(name)
    default: Any = None
    why = ""
    if entry is None:
        installed = ", ".join(plugins.types["strategy"]) or "none"
        why = (f"the default deploy strategy {name!r} (agent.default_strategy) is not "
               f"installed (blocked?); installed: {installed}")
    else:
        try:
            default = entry.model(type=name)
        except ValidationError as exc:
            keys = ", ".join(str(e["loc"][0]) for e in exc.errors() if e.get("loc"))
            why = (f"the default deploy strategy {name!r} (agent.default_strategy) needs "
                   f"settings ({keys})")
    if why and explicit:
        out.append((_line(lines, ("agent", "default_strategy")), "agent.default_strategy", why))
    for service, svc in parsed.services.items():
        cfg = svc.deploy if svc.deploy is not None else default
        if svc.deploy is None and why:
            out.append((_line(lines, ("services", service)), f"services.{service}",
                        f"no deploy: block, and {why}: give it one (deploy: {{type: ...}}) or "
                        "set agent.default_strategy"))
            continue
        actuator = plugins.types["actuator"].get(svc.actuator.type)
        strategy = plugins.types["strategy"].get(cfg.type)
        if actuator is None or strategy is None:
            continue
        problem = strategy.cls.actuator_problem(cfg, actuator.cls)
        if problem:
            path = ("services", service, "deploy")
            out.append((_line(lines, path), _dotted(path), problem))
    return out


def _port_conflicts(parsed: Any, lines: dict[Path_, int]) -> list[tuple[int, str, str]]:
    from agent.ports import conflicts

    return [(_line(lines, ("services", name, "port")), f"services.{name}.port", message)
            for name, message in conflicts(dict(parsed.services), parsed.agent.http)]


def _redact(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def load_config(path: str | os.PathLike[str], plugins: Plugins) -> Config:
    """Read, merge and validate a config file.

    :raises ConfigError: with every problem, each naming file, line and key.
    """
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config: {exc.strerror}"]) from exc
    if len(raw) > MAX_FILE:
        raise ConfigError([f"{source}: the config is {len(raw)} bytes; at most {MAX_FILE}"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{source}:{line}: not UTF-8 text: byte 0x{raw[exc.start]:02x} "
                           "(save the file as UTF-8)"]) from None
    try:
        reader = _Reader(text, source)
        data = reader.read()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{source}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(0, exc.position)) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError([f"{source}:{line}: invalid YAML: the control character "
                           f"U+{code:04X} is not allowed in YAML"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {str(exc)[:200]}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}:1: invalid YAML: nested deeper than the parser "
                           "can follow"]) from None
    problems = list(reader.errors)
    if not isinstance(data, dict):
        raise ConfigError([f"{source}:1: the file must be a mapping with agent and services"])
    warnings, renamed = _deploy_types(data, reader.lines, source)
    problems += renamed
    agent_block = data.get("agent")
    explicit_default = isinstance(agent_block, dict) and "default_strategy" in agent_block
    defaults = data.get("defaults") or {}
    services = data.get("services") or {}
    if isinstance(services, dict) and isinstance(defaults, dict):
        data = {**data, "services": {name: merge(_for_service(defaults, svc or {}), svc or {})
                                     for name, svc in services.items()}}
    data, blocks_problems = _plugin_blocks(data, plugins, reader.lines)
    problems += blocks_problems
    service = service_model(plugins)
    try:
        parsed = file_model(plugins, service).model_validate(data)
    except ValidationError as exc:
        problems += _messages(exc, service, plugins, reader.lines, data)
        parsed = None
    if parsed is not None:
        problems += _missing_packages(parsed, plugins, reader.lines)
        problems += _strategy_problems(parsed, plugins, reader.lines, explicit_default)
        problems += _port_conflicts(parsed, reader.lines)
    if problems:
        problems.sort(key=lambda p: p[0])
        raise ConfigError([_redact(f"{source}:{line}: {key}: {msg}", reader.from_env)
                           for line, key, msg in problems])
    assert parsed is not None
    for svc in parsed.services.values():
        svc._secrets = frozenset(reader.from_env)
    masking.remember([*reader.from_env, *masking.secret_values(parsed)])
    for warning in warnings:
        if warning not in _warned:
            _warned.add(warning)
            log.warning("%s", warning)
    blocks = {name: getattr(parsed.plugins, field) for field, name in (
        (f, info.alias) for f, info in type(parsed.plugins).model_fields.items())
        if getattr(parsed.plugins, field) is not None}
    return Config(agent=parsed.agent, services=dict(parsed.services), path=path,
                  base_dir=path.resolve().parent, warnings=warnings, plugins=blocks)
