"""A model's settings: `config.pbtxt` parameters, each declared once by the concept it belongs to.

Each concept (the speed of the eager pipeline, the sync-free loop, CUDA graphs, compile, adapters, the
time budget, recovery's host-memory check, telemetry) declares its settings beside its own code as a
`Group` named `SETTINGS` in its module, with a rule for settings that cannot go together. This module
assembles them: the parameters a config.pbtxt may set, their parsing and validation, the defaults per
device and the table in docs/settings.md all come from those declarations. A new concept is a module
with its `SETTINGS` and one line in `CONCEPTS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

from sdmme.model_folder import KIND_PARAMETER

# The modules that declare settings, in the order of the settings table.
CONCEPTS = (
    "sdmme.pipeline.speed",
    "sdmme.pipeline.sync_free",
    "sdmme.pipeline.cuda_graphs",
    "sdmme.pipeline.compile_artifacts",
    "sdmme.serving.budget",
    "sdmme.adapters",
    "sdmme.serving.host_memory",
    "sdmme.serving.telemetry",
)
# Parameters in a config.pbtxt that are not settings: Triton's, and the model's kind.
OTHER_PARAMETERS = ("EXECUTION_ENV_PATH", KIND_PARAMETER)
_SAME = object()


@dataclass(frozen=True)
class Setting:
    """One parameter: its type (bool, int for a count of 1 or more, float for 0 or more, str; or a
    tuple of choices), its GPU default and, where it differs, its CPU default."""

    name: str
    kind: Union[type, Tuple[str, ...]]
    default: Any
    help: str
    values: str = ""  # what the docs say it takes, beyond choices or true/false
    cpu: Any = _SAME

    def default_on(self, device_kind: str) -> Any:
        return self.default if device_kind == "GPU" or self.cpu is _SAME else self.cpu

    def parse(self, text: str) -> Any:
        """The value of the parameter's text; a bad one is a ValueError naming it."""
        where = f"config.pbtxt parameter {self.name}"
        if isinstance(self.kind, tuple):
            if text not in self.kind:
                raise ValueError(f"{where}={text!r} is not one of {', '.join(self.kind)}")
            return text
        if self.kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(f"{where} must be true or false, got {text!r}")
            return text.lower() == "true"
        if self.kind is int:
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"{where} must be a whole number of 1 or more, got {text!r}")
            return int(text)
        if self.kind is float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {text!r}") from None
            if not value >= 0:
                raise ValueError(f"{where} must be 0 or more, got {text!r}")
            return value
        return text  # free text, checked where it is used (adapters: the store)

    def allowed(self) -> str:
        if isinstance(self.kind, tuple):
            return ", ".join(self.kind)
        return self.values or "true, false"


@dataclass(frozen=True)
class Group:
    """The settings of one concept, and its rule against combinations that cannot work."""

    concept: str
    settings: Tuple[Setting, ...]
    check: Optional[Callable[[Settings], None]] = None  # raises ValueError saying what to change


def groups() -> Tuple[Group, ...]:
    return tuple(importlib.import_module(module).SETTINGS for module in CONCEPTS)


def declared() -> Dict[str, Tuple[Setting, Group]]:
    return {s.name: (s, group) for group in groups() for s in group.settings}


class Settings:
    """A model's settings, read as attributes (`settings.compile`); immutable, hashable, checked
    against every concept's rule when made, however they were made."""

    __slots__ = ("_values",)

    def __init__(self, device_kind: str = "GPU", **values: Any):
        """The defaults of a device kind (GPU, CPU), with `values` over them."""
        self._set({name: s.default_on(device_kind) for name, (s, _) in declared().items()}, values)

    def _set(self, base: Dict[str, Any], values: Dict[str, Any]) -> None:
        unknown = sorted(set(values) - set(base))
        if unknown:
            raise TypeError(f"not a setting: {', '.join(unknown)}")
        object.__setattr__(self, "_values", tuple({**base, **values}.items()))
        for group in groups():
            if group.check is not None:
                group.check(self)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], device_kind: str = "GPU") -> Settings:
        """The device kind's defaults with the values a model's config.pbtxt sets; a bad key or value,
        or settings that cannot go together, is a ValueError naming them."""
        known = declared()
        values = {}
        for key, text in parameters.items():
            if key in OTHER_PARAMETERS:
                continue
            if key not in known:
                raise ValueError(
                    f"config.pbtxt parameter {key!r} is not a pipeline setting; known: {', '.join(known)}"
                )
            values[key] = known[key][0].parse(text)
        return cls(device_kind, **values)

    def replace(self, **values: Any) -> Settings:
        settings = Settings.__new__(Settings)
        settings._set(dict(self._values), values)
        return settings

    def __getattr__(self, name: str) -> Any:
        for key, value in object.__getattribute__(self, "_values"):
            if key == name:
                return value
        raise AttributeError(f"no setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are immutable: use replace()")

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and dict(self._values) == dict(other._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values)))

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self._values) + ")"


def table() -> str:
    """docs/settings.md's table, from the declarations."""

    def show(value) -> str:
        return f"`{str(value).lower() if isinstance(value, bool) else value}`" if value != "" else "(empty)"

    lines = [
        "| parameter | values | GPU default | CPU default | what it does | declared in |",
        "|---|---|---|---|---|---|",
    ]
    for group, module in zip(groups(), CONCEPTS):
        path = module.replace(".", "/") + ("/__init__.py" if module == "sdmme.adapters" else ".py")
        for s in group.settings:
            gpu, cpu = s.default_on("GPU"), s.default_on("CPU")
            lines.append(
                f"| `{s.name}` | {s.allowed()} | {show(gpu)} | {show(cpu)} | {s.help} | "
                f"{group.concept} (`{path}`) |"
            )
    return "\n".join(lines)
