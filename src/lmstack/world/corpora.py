"""The registry of corpora: name -> builder(world) yielding records with a `split` field.

Usage:
    from lmstack.world.corpora import CORPORA
    from lmstack.world import World
    first = next(CORPORA["arithmetic"](World(seed=0, n_people=10)))
"""
from __future__ import annotations

from typing import Callable, Iterator

from lmstack.world.arithmetic import build_arithmetic
from lmstack.world.conversations import build_chat
from lmstack.world.code_tasks import build_code
from lmstack.world.instructions import build_instructions
from lmstack.world.passkey import build_passkey
from lmstack.world.preferences import build_preferences
from lmstack.world.pretrain import build_pretrain
from lmstack.world.qa import build_qa
from lmstack.world.quality import build_quality

CORPORA: dict[str, Callable[..., Iterator[dict]]] = {
    "pretrain": build_pretrain,
    "qa": build_qa,
    "arithmetic": build_arithmetic,
    "instructions": build_instructions,
    "preferences": build_preferences,
    "passkey": build_passkey,
    "code": build_code,
    "chat": build_chat,
    "quality": build_quality,
}
