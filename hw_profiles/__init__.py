"""Hardware energy profiles: one TOML file per target, every number with its source.

A profile gives the energy of the events the profiler counts (see docs/hw-profiles.md):

    name                 str    identifier (built-ins: the file stem)
    description          str    one line
    event_driven         bool   true: synapses work only on non-zero inputs (neuromorphic chips,
                                sparse accelerators); false: every connection is computed every
                                step (CPU / GPU running the SNN densely)
    e_synop_pj           float  pJ per synaptic operation on a binary input (an accumulate, AC)
    e_neuron_update_pj   float  pJ per LIF neuron update (one neuron, one time step)
    e_mac_pj             float  pJ per multiply-accumulate (non-binary inputs, dense ANN);
                                optional: without it MACs are listed but not costed, and no
                                ANN comparison is made for this profile
    e_spike_pj           float  pJ per emitted spike (routing); optional
    static_power_mw      float  static power in mW; optional, needs time_step_us
    time_step_us         float  wall time of one SNN time step in µs; optional
    unverified           list   names of fields whose value was not checked against the
                                primary source (shown with a mark in reports); optional
    [sources]            table  one string per numeric field present: where the number comes from
    [notes]              table  free strings (caveats, numbers not used by the model); optional

`load_profile("loihi")` reads a built-in; `load_profile("path/to/mine.toml")` a user file.
Problems raise `HwProfileError` naming the file and the field.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tmkt.errors import TmktError

__all__ = ["HwProfile", "HwProfileError", "builtin_names", "load_profile", "load_profiles", "parse_profile"]

# numeric fields: name -> required
_NUMERIC: dict[str, bool] = {
    "e_synop_pj": True,
    "e_neuron_update_pj": True,
    "e_mac_pj": False,
    "e_spike_pj": False,
    "static_power_mw": False,
    "time_step_us": False,
}
_KNOWN = {"name", "description", "event_driven", "unverified", "sources", "notes", *_NUMERIC}


class HwProfileError(TmktError, ValueError):
    """A profile that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class HwProfile:
    """Energy per counted event on one hardware target (all energies in pJ)."""

    name: str
    description: str
    event_driven: bool
    e_synop_pj: float
    e_neuron_update_pj: float
    e_mac_pj: float | None = None
    e_spike_pj: float | None = None
    static_power_mw: float | None = None
    time_step_us: float | None = None
    unverified: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (what reports embed next to the estimate)."""
        return {
            "name": self.name,
            "description": self.description,
            "event_driven": self.event_driven,
            **{k: getattr(self, k) for k in _NUMERIC},
            "unverified": list(self.unverified),
            "sources": dict(self.sources),
            "path": self.path,
        }


def _fail(where: str, fieldname: str, msg: str) -> HwProfileError:
    return HwProfileError(f"{where}: field {fieldname!r}: {msg}")


def parse_profile(data: dict[str, Any], where: str) -> HwProfile:
    """Check a parsed TOML table and build the profile; `where` names the file in errors."""
    for key in data:
        if key not in _KNOWN:
            close = difflib.get_close_matches(key, sorted(_KNOWN), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(where, key, f"unknown field{hint}; known: {', '.join(sorted(_KNOWN))}")
    for key in ("name", "description"):
        if key not in data:
            raise _fail(where, key, "missing")
        if not isinstance(data[key], str) or not data[key].strip():
            raise _fail(where, key, f"must be a non-empty string, got {data[key]!r}")
    if "event_driven" not in data:
        raise _fail(where, "event_driven", "missing (true for spike-driven hardware, false for dense CPU/GPU)")
    if not isinstance(data["event_driven"], bool):
        raise _fail(where, "event_driven", f"must be true or false, got {data['event_driven']!r}")
    values: dict[str, float | None] = {}
    for key, required in _NUMERIC.items():
        if key not in data:
            if required:
                raise _fail(where, key, "missing")
            values[key] = None
            continue
        v = data[key]
        # bool is an int subclass in Python: `e_synop_pj = true` must not read as 1 pJ
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(where, key, f"must be a number, got {v!r}")
        if not v >= 0 or v == float("inf"):
            raise _fail(where, key, f"must be a finite number >= 0, got {v!r}")
        values[key] = float(v)
    if (values["static_power_mw"] is None) != (values["time_step_us"] is None):
        missing = "time_step_us" if values["time_step_us"] is None else "static_power_mw"
        raise _fail(where, missing, "static_power_mw and time_step_us go together (energy = power x time)")
    if not data["event_driven"] and values["e_mac_pj"] is None:
        raise _fail(where, "e_mac_pj", "missing: a profile that is not event-driven computes every connection as a MAC")
    sources = data.get("sources")
    if not isinstance(sources, dict):
        raise _fail(where, "sources", "missing table [sources] (one source string per number)")
    for key, v in sources.items():
        if key not in _NUMERIC:
            raise _fail(where, f"sources.{key}", f"not a numeric field of the profile ({', '.join(_NUMERIC)})")
        if not isinstance(v, str) or not v.strip():
            raise _fail(where, f"sources.{key}", "must be a non-empty string")
    for key, v in values.items():
        if v is not None and key not in sources:
            raise _fail(where, f"sources.{key}", f"missing: every number needs its source ({key} = {v})")
    notes = data.get("notes", {})
    if not isinstance(notes, dict) or not all(isinstance(v, str) for v in notes.values()):
        raise _fail(where, "notes", "must be a table of strings")
    unverified = data.get("unverified", [])
    if not isinstance(unverified, list) or not all(isinstance(u, str) for u in unverified):
        raise _fail(where, "unverified", "must be a list of field names")
    for u in unverified:
        if u not in _NUMERIC or values[u] is None:
            raise _fail(where, "unverified", f"{u!r} is not a numeric field set in this profile")
    return HwProfile(
        name=data["name"].strip(),
        description=data["description"].strip(),
        event_driven=data["event_driven"],
        e_synop_pj=values["e_synop_pj"],  # type: ignore[arg-type]
        e_neuron_update_pj=values["e_neuron_update_pj"],  # type: ignore[arg-type]
        e_mac_pj=values["e_mac_pj"],
        e_spike_pj=values["e_spike_pj"],
        static_power_mw=values["static_power_mw"],
        time_step_us=values["time_step_us"],
        unverified=tuple(unverified),
        sources=dict(sources),
        notes=dict(notes),
        path=where,
    )


def builtin_names() -> list[str]:
    """Names of the profiles shipped with tmkt (file stems of `tmkt/hw_profiles/*.toml`)."""
    root = resources.files(__name__)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> HwProfile:
    """A built-in profile by name, or a TOML file by path (anything ending in .toml or existing)."""
    text_path = str(name_or_path)
    if text_path.endswith(".toml") or Path(text_path).exists():
        path = Path(text_path)
        if not path.is_file():
            raise HwProfileError(f"{path}: no such profile file")
        where, raw = str(path), path.read_bytes()
    else:
        names = builtin_names()
        if text_path not in names:
            raise HwProfileError(f"unknown hardware profile {text_path!r}; built-in: {', '.join(names)} (or a .toml path)")
        res = resources.files(__name__).joinpath(f"{text_path}.toml")
        where, raw = f"tmkt/hw_profiles/{text_path}.toml", res.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HwProfileError(f"{where}: not valid TOML ({e})") from None
    return parse_profile(data, where)


def load_profiles(spec: str | None) -> list[HwProfile]:
    """Comma-separated names and/or paths; None or "all" gives every built-in profile."""
    if spec is None or spec.strip() in ("", "all"):
        return [load_profile(n) for n in builtin_names()]
    items = [s.strip() for s in spec.split(",") if s.strip()]
    profiles = [load_profile(s) for s in items]
    seen: set[str] = set()
    for p in profiles:
        if p.name in seen:
            raise HwProfileError(f"{p.path}: field 'name': profile name {p.name!r} given twice")
        seen.add(p.name)
    return profiles
