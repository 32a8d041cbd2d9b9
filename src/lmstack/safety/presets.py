"""presets: user-adjustable safety and persona settings, where a user may loosen style but never the hard bans
(IX.10).

A server's SafetyConfig (`lmstack serve --safety safety.yaml`) holds two kinds of setting:
- **hard bans** (`banned_phrases`): phrases no reply may contain, across token boundaries
  (lmstack.safety.phrase_ban). They are the engine's, so no request field reaches them: a request may add
  its own `banned_phrases`, but sending an empty list (or any other field) removes nothing;
- **style**: named persona presets, each a system prompt plus a default temperature / top_p. A chat request
  picks one with `safety_preset` (when `allow_request_presets`), and may set its own temperature up to
  `max_temperature` and its own system message after the preset's, unless `lock_system_prompt` is set.

The built-in presets are default (no system prompt: the model as trained), concise, friendly and strict; a
config may redefine them or add its own.

Usage:
    cfg = load_safety_config("safety.yaml")     # or SafetyConfig(banned_phrases=["..."], default_preset="concise")
    choice = cfg.choose(preset="friendly", temperature=None, has_system_message=False, n_phrases=0)
    messages = choice.preset.prepend([{"role": "user", "content": "hi"}])   # the preset's system prompt first
    choice.temperature                           # the request's own, else the preset's, else None

safety.yaml:
    banned_phrases: ["credit card number", "home address"]
    default_preset: strict
    lock_system_prompt: true
    presets:
      pirate: {system_prompt: "You talk like a pirate.", temperature: 1.0}
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from lmstack.config import ConfigError, from_dict, read_mapping
from lmstack.errors import LmstackError
from lmstack.safety.phrase_ban import check_phrases

MAX_TEMPERATURE = 100.0  # SamplingParams' own bound


class PresetError(LmstackError, ValueError):
    """A request asks for a setting the server's safety config does not allow; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Preset:
    system_prompt: str = ""
    """Put before the conversation as a system message ("" = none)."""
    temperature: float | None = None
    """The temperature when the request gives none (None: the model's generation_config default)."""
    top_p: float | None = None
    """The top_p when the request gives none."""
    description: str = ""
    """One line shown to users choosing a preset."""

    def __post_init__(self) -> None:
        if not isinstance(self.system_prompt, str):
            raise ConfigError(f"system_prompt must be a string, got {type(self.system_prompt).__name__}")
        for name, lo, hi in (("temperature", 0.0, MAX_TEMPERATURE), ("top_p", 1e-9, 1.0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not lo <= v <= hi):
                raise ConfigError(f"{name}={v!r} is not allowed; {name} must be None or a number in [{lo:g}, {hi:g}]")

    def prepend(self, messages: list[dict]) -> list[dict]:
        """messages with this preset's system prompt first (unchanged when it has none)."""
        if not self.system_prompt:
            return list(messages)
        return [{"role": "system", "content": self.system_prompt}, *messages]


BUILTIN_PRESETS: dict[str, Preset] = {
    "default": Preset(description="The model as trained: no system prompt, its own sampling defaults."),
    "concise": Preset("You are a helpful assistant. Answer briefly and directly, in as few words as the "
                      "question allows.", temperature=0.3, description="Short, low-temperature answers."),
    "friendly": Preset("You are a warm, friendly and encouraging assistant. Be helpful and kind, and explain "
                       "things simply.", temperature=0.8, description="Warm tone, a little more varied."),
    "strict": Preset("You are a careful assistant. Refuse requests for harmful, dangerous, illegal or private "
                     "information, and say briefly why; otherwise answer accurately.", temperature=0.0,
                     description="Greedy decoding and a refusal-first system prompt."),
}


@dataclass
class SafetyConfig:
    banned_phrases: list[str] = field(default_factory=list)
    """Hard bans: no reply may contain these phrases (case and whitespace normalised, across token boundaries).
    Requests can add to them, never remove them."""
    default_preset: str = "default"
    """The preset of requests that name none."""
    presets: dict[str, Preset] = field(default_factory=dict)
    """Presets beyond (or redefining) the built-in default, concise, friendly and strict."""
    allow_request_presets: bool = True
    """Whether a request may pick a preset with `safety_preset` (else only the default applies; naming another
    is a 400)."""
    lock_system_prompt: bool = False
    """Refuse requests that bring their own system (or developer) message, so the preset's persona holds."""
    max_temperature: float = MAX_TEMPERATURE
    """The highest temperature a request may ask for (400 above); the default is SamplingParams' own bound, so
    a server without a safety config keeps answering every temperature it did."""
    max_request_phrases: int = 64
    """Most banned_phrases one request may add (400 above): each set is compiled to its own automaton."""

    def __post_init__(self) -> None:
        self.banned_phrases = check_phrases(self.banned_phrases, "banned_phrases")
        merged = dict(BUILTIN_PRESETS)
        for name, p in (self.presets or {}).items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"presets: a preset name must be a non-empty string, got {name!r}")
            merged[name] = p if isinstance(p, Preset) else from_dict(Preset, p, f"presets.{name}.")
        self.presets = merged
        if self.default_preset not in merged:
            raise ConfigError(f"default_preset={self.default_preset!r} is not a preset; choose from {sorted(merged)}")
        t = self.max_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise ConfigError(f"max_temperature={t!r} is not allowed; give a number in [0, {MAX_TEMPERATURE:g}]")
        if isinstance(self.max_request_phrases, bool) or not isinstance(self.max_request_phrases, int) \
                or self.max_request_phrases < 0:
            raise ConfigError(f"max_request_phrases={self.max_request_phrases!r} is not allowed; give an integer >= 0")

    def choose(self, preset: str | None = None, temperature: float | None = None, has_system_message: bool = False,
               n_phrases: int = 0) -> "Choice":
        """What one request gets, or PresetError naming the field it may not set."""
        name = self.default_preset if preset is None else preset
        if preset is not None and preset != self.default_preset and not self.allow_request_presets:
            raise PresetError(f"safety_preset={preset!r} is not allowed; this server uses the "
                              f"{self.default_preset!r} preset for every request", "safety_preset")
        if name not in self.presets:
            raise PresetError(f"safety_preset={name!r} is not a preset of this server; choose from "
                              f"{sorted(self.presets)}", "safety_preset")
        if has_system_message and self.lock_system_prompt:
            raise PresetError("messages: this server does not accept system or developer messages (its safety "
                              f"config locks the system prompt to the {name!r} preset's)", "messages")
        if temperature is not None and temperature > self.max_temperature:
            raise PresetError(f"temperature={temperature!r} is not allowed; this server's safety config allows at "
                              f"most {self.max_temperature:g}", "temperature")
        if n_phrases > self.max_request_phrases:
            raise PresetError(f"banned_phrases has {n_phrases} phrases; this server takes at most "
                              f"{self.max_request_phrases} per request (max_request_phrases)", "banned_phrases")
        chosen = self.presets[name]
        return Choice(name, chosen, chosen.temperature if temperature is None else temperature)


@dataclass(frozen=True)
class Choice:
    name: str
    preset: Preset
    temperature: float | None


def load_safety_config(path: str | os.PathLike | None) -> SafetyConfig:
    """A SafetyConfig from a YAML or JSON file (None: the defaults); unknown keys name themselves."""
    if path is None:
        return SafetyConfig()
    return from_dict(SafetyConfig, read_mapping(path))
