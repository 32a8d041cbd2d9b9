"""The navigation world (issue 25 §1 navigation, XII.13): a rendered grid with walls and shape landmarks, an agent
with a heading, an instruction made from the gold path, and the environment's step function.

A map is a `grid` x `grid` board of cells: walls (dark squares), 4 landmarks drawn from the shapes world (a colour
+ shape object at a cell's centre, e.g. "blue square") and the agent (a white triangle pointing its heading). The
observation is EGOCENTRIC but shows the WHOLE map: a top-down window of (2 grid - 1) cells a side centred on the
agent and turned by quarter turns so the agent faces the top of the picture (one ViT patch per cell when
patch_size = cell). Wherever the agent stands, every cell of the map is in the window; cells off the map are drawn
as wall. Landmarks are drawn upright at their turned cells, so a shape keeps its look. So "forward" is always "up"
and the agent is always the centre patch: a policy reads where the next landmark is relative to itself straight off
the patch grid (an allocentric map would make it find itself first and learn each action four times over). Cells
the agent has stood on are drawn a lighter grey (its trail), so which sub-goals are behind it can be read from the
picture.

Actions: forward (one cell ahead; into a wall or off the board the agent stays put, the step still counts),
turn_left, turn_right (90 degrees on the spot) and stop (ends the episode). An episode asks the agent to pass
1..3 landmarks in order and stop on the last one: "go past the blue square, then turn left at the green star and
stop at the red circle". The sub-goals come first; the gold path is the shortest action sequence through them in
order (an exact BFS over (cell, heading, sub-goals reached)); the turn words ("go past", "turn left at") are then
read off that path. Success is `stop` pressed on the goal cell, within max_steps (2 x gold + 4).

Unambiguous by construction: the 4 landmark names on a map are distinct, and `check_record` re-parses the
instruction and checks every name it mentions is on the map exactly once, in sub-goal order.

Splits:
- train: its own layouts, instructions in the SEEN templates ("then", "steps"), landmarks from the SEEN
  colour-shape pairs (HELDOUT_PAIRS never appear in train, val or test_maps);
- val: train's layouts, fresh landmarks and starts, seen templates and pairs;
- test_maps: held-out maps: layouts drawn from another stream, none equal to a train layout;
- test_instr: held-out instructions on train's layouts: half in the held-out template ("semicolons": other verbs,
  "pass", "go left at", "halt at"), half with a goal whose colour-shape pair never occurs in training.

Files: out/maps/<split>/<id>.png (the first observation), out/<split>.jsonl, out/manifest.json (written last).

Usage:
    from lmstack.multimodal.nav_world import NavEnv, build_nav_world, write_nav_world
    records = build_nav_world(n_train=200, n_val=20, n_test=40, grid=5, cell=10, seed=0)
    env = NavEnv(records[0])
    obs = env.reset()                                  # uint8 (90, 90, 3): 9x9 cells, the agent centred, facing up
    obs, done, success = env.step("forward")
    write_nav_world("data/nav", n_train=200)           # CLI: lmstack data synth-nav --out data/nav
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lmstack.config import atomic_write_bytes, atomic_write_text
from lmstack.errors import LmstackError
from lmstack.multimodal.shapes import COLOURS, SHAPES, Obj, Scene, render
from lmstack.world.config import sub_rng

ACTIONS = ("forward", "turn_left", "turn_right", "stop")
HEADINGS = ("north", "east", "south", "west")
STEP = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (drow, dcol) per heading; rows grow downwards
SPLITS = ("train", "val", "test_maps", "test_instr")
N_LANDMARKS = 4
SEEN_TEMPLATES = ("then", "steps")
HELDOUT_TEMPLATES = ("semicolons",)
# one colour per shape held out of training: (colour index + 2 * shape index) % 8 == 0; every held-out colour and
# shape still occurs in training in other pairs, so the test asks for a new combination of known words
HELDOUT_PAIRS = tuple((c, s) for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES) if (ci + 2 * si) % 8 == 0)
SEEN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)
FLOOR, TRAIL, WALL, AGENT = (128, 128, 128), (175, 175, 175), (40, 40, 40), (255, 255, 255)
WALL_DENSITY = 0.18
MIN_GOLD, MAX_GOLD = 4, 30
# turn at a passed landmark (heading out - heading in, mod 4) -> its word
TURN_WORDS = {0: "past", 1: "right", 2: "around", 3: "left"}
PHRASES = {
    "then": {"past": "go past the {}", "left": "turn left at the {}", "right": "turn right at the {}",
             "around": "turn around at the {}", "stop": "stop at the {}"},
    "steps": {"past": "go past the {}", "left": "turn left at the {}", "right": "turn right at the {}",
              "around": "turn around at the {}", "stop": "stop at the {}"},
    "semicolons": {"past": "pass the {}", "left": "go left at the {}", "right": "go right at the {}",
                   "around": "double back at the {}", "stop": "halt at the {}"},
}
_NAME_RX = re.compile(r"the ((?:%s) (?:%s))" % ("|".join(COLOURS), "|".join(SHAPES)))


def _check_int(label: str, value, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise LmstackError(f"{label} must be an integer in {lo}..{hi}, got {value!r}")


def check_args(grid: int, cell: int) -> None:
    """Raise, naming the argument, unless grid is 4..12 cells and cell 8..32 pixels with a 32..512 px window."""
    _check_int("grid", grid, 4, 12)
    _check_int("cell", cell, 8, 32)
    side = (2 * grid - 1) * cell
    if not 32 <= side <= 512:
        raise LmstackError(f"(2 grid - 1) * cell = {side} pixels; the window's side must be in 32..512")


def landmark_name(lm: dict) -> str:
    return f"{lm['colour']} {lm['shape']}"


# ---- layouts and paths
def sample_layout(rng, grid: int) -> list[tuple[int, int]]:
    """Wall cells: a random scatter, then every free cell outside the largest connected region walled in."""
    walls = {(r, c) for r in range(grid) for c in range(grid) if rng.random() < WALL_DENSITY}
    free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in walls]
    best: set = set()
    seen: set = set()
    for cell in free:  # keep the largest 4-connected region, so every free cell reaches every other
        if cell in seen:
            continue
        region, todo = {cell}, [cell]
        while todo:
            r, c = todo.pop()
            for dr, dc in STEP:
                nxt = (r + dr, c + dc)
                if 0 <= nxt[0] < grid and 0 <= nxt[1] < grid and nxt not in walls and nxt not in region:
                    region.add(nxt)
                    todo.append(nxt)
        seen |= region
        best = max(best, region, key=len)
    return sorted((r, c) for r in range(grid) for c in range(grid) if (r, c) not in best)


def move(grid: int, walls, row: int, col: int, heading: int, action: int) -> tuple[int, int, int]:
    """The agent's (row, col, heading) after one action; forward into a wall or off the board stays put."""
    if action == 1:
        return row, col, (heading - 1) % 4
    if action == 2:
        return row, col, (heading + 1) % 4
    if action == 0:
        r, c = row + STEP[heading][0], col + STEP[heading][1]
        if 0 <= r < grid and 0 <= c < grid and (r, c) not in walls:
            return r, c, heading
    return row, col, heading


def gold_path(grid: int, walls, start: tuple[int, int, int], subgoals: list[tuple[int, int]]) -> list[int] | None:
    """The shortest action list (ending with stop) that enters each sub-goal cell in order; None if none exists.

    BFS over (row, col, heading, sub-goals reached); actions tried forward, left, right, so ties break the same
    way every time. A sub-goal counts when the agent enters its cell while it is the next one due."""
    walls = set(map(tuple, walls))
    first = (*start, 0)
    parent = {first: None}
    queue = deque([first])
    while queue:
        state = queue.popleft()
        r, c, h, k = state
        if k == len(subgoals):
            actions = [3]
            while parent[state] is not None:
                state, a = parent[state]
                actions.append(a)
            return actions[::-1]
        for a in (0, 1, 2):
            nr, nc, nh = move(grid, walls, r, c, h, a)
            nk = k + (a == 0 and (nr, nc) == subgoals[k] and (nr, nc) != (r, c))
            nxt = (nr, nc, nh, nk)
            if nxt not in parent:
                parent[nxt] = (state, a)
                queue.append(nxt)
    return None


def trace(grid: int, walls, start: tuple[int, int, int], actions: list[int]) -> list[tuple[int, int, int]]:
    """The (row, col, heading) after each action, the start first (len(actions) + 1 states)."""
    walls = set(map(tuple, walls))
    states = [tuple(start)]
    for a in actions:
        states.append(move(grid, walls, *states[-1], a))
    return states


def _turns(grid: int, walls, start, actions: list[int], subgoals: list[tuple[int, int]]) -> list[str] | None:
    """The turn word at each passed sub-goal, read off the gold path; None when the path enters a later sub-goal's
    cell before an earlier one is reached (a confusing instruction: such episodes are redrawn)."""
    states = trace(grid, walls, start, actions)
    words, k = [], 0
    for t in range(1, len(states)):
        cell = states[t][:2]
        if cell == states[t - 1][:2]:
            continue
        if k < len(subgoals) and cell == subgoals[k]:
            if k < len(subgoals) - 1:
                heading_in = states[t][2]
                leave = next(u for u in range(t + 1, len(states)) if states[u][:2] != cell)
                words.append(TURN_WORDS[(states[leave][2] - heading_in) % 4])
            k += 1
        elif cell in subgoals[k + 1:]:
            return None
    return words


def instruction(template: str, words: list[str], names: list[str]) -> str:
    """The instruction text: one phrase per passed landmark (its turn word), then the stop phrase."""
    if template not in PHRASES:
        raise LmstackError(f"unknown template {template!r}; allowed: {', '.join(PHRASES)}")
    p = PHRASES[template]
    phrases = [p[w].format(n) for w, n in zip(words, names)]
    goal = names[-1]
    if template == "then":
        if not phrases:
            return f"go to the {goal} and stop."
        return ", then ".join(phrases) + " and " + p["stop"].format(goal) + "."
    if template == "steps":
        if not phrases:
            return f"walk to the {goal}. stop there."
        middle = "".join(f" next {x}." for x in phrases[1:])
        return f"first {phrases[0]}.{middle} finally {p['stop'].format(goal)}."
    return "; ".join(phrases + [p["stop"].format(goal)]) + "."


def mentioned(text: str) -> list[str]:
    """The landmark names an instruction mentions, in order ("the <colour> <shape>")."""
    return _NAME_RX.findall(text)


def check_record(rec: dict) -> None:
    """Raise unless the episode is unambiguous: distinct landmark names, and the instruction names exactly the
    sub-goals in order, each on the map once; and the gold path reaches the goal and stops there."""
    names = [landmark_name(lm) for lm in rec["landmarks"]]
    if len(set(names)) != len(names):
        raise LmstackError(f"episode {rec['id']}: two landmarks share a name: {names}")
    wanted = [names[i] for i in rec["subgoals"]]
    said = mentioned(rec["instruction"])
    if said != wanted or any(names.count(n) != 1 for n in said):
        raise LmstackError(f"episode {rec['id']}: instruction names {said}, sub-goals are {wanted}")
    start = (rec["start"]["row"], rec["start"]["col"], rec["start"]["heading"])
    end = trace(rec["grid"], map(tuple, rec["walls"]), start, rec["gold_actions"])[-1]
    goal = rec["landmarks"][rec["goal"]]
    if rec["gold_actions"][-1] != 3 or end[:2] != (goal["row"], goal["col"]):
        raise LmstackError(f"episode {rec['id']}: the gold path does not stop on the goal")


def sample_episode(rng, grid: int, walls, pairs, template: str, goal_pairs=None) -> dict | None:
    """Landmarks, start, sub-goals, gold path and instruction on a layout; None when the draw is unusable."""
    free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in set(map(tuple, walls))]
    if len(free) < N_LANDMARKS + 3:
        return None
    cells = rng.sample(free, N_LANDMARKS + 1)
    k = rng.choice((1, 2, 2, 3, 3))
    chosen = rng.sample(list(pairs), N_LANDMARKS)
    order = rng.sample(range(N_LANDMARKS), k)
    if goal_pairs is not None:  # the goal's pair is a held-out one
        chosen[order[-1]] = rng.choice(list(goal_pairs))
        if len(set(chosen)) != N_LANDMARKS:
            return None
    landmarks = [{"colour": col, "shape": shp, "row": r, "col": c} for (col, shp), (r, c) in zip(chosen, cells)]
    start = (*cells[-1], rng.randrange(4))
    subgoals = [cells[i] for i in order]
    actions = gold_path(grid, walls, start, subgoals)
    if actions is None or not MIN_GOLD <= len(actions) <= MAX_GOLD:
        return None
    words = _turns(grid, walls, start, actions, subgoals)
    if words is None:
        return None
    names = [landmark_name(landmarks[i]) for i in order]
    return {"grid": grid, "walls": [list(w) for w in walls], "landmarks": landmarks,
            "start": {"row": start[0], "col": start[1], "heading": start[2]}, "subgoals": order, "goal": order[-1],
            "turns": words, "template": template, "instruction": instruction(template, words, names),
            "gold_actions": actions, "gold_len": len(actions)}


def _draw(rng_names, make, tries: int = 200):
    for _ in range(tries):
        ep = make()
        if ep is not None:
            return ep
    raise LmstackError(f"no usable episode in {tries} draws for {rng_names}; the grid is too small or too walled")


def build_nav_world(n_train: int = 400, n_val: int = 40, n_test: int = 80, grid: int = 5, cell: int = 10,
                    seed: int = 0) -> list[dict]:
    """Episode records for the 4 splits (test_maps and test_instr get n_test each); a pure function of its args."""
    check_args(grid, cell)
    for label, n, lo in (("n_train", n_train, 1), ("n_val", n_val, 0), ("n_test", n_test, 0)):
        _check_int(label, n, lo, 10 ** 6)
    train_layouts = [sample_layout(sub_rng(seed, "nav", "layout", "seen", i), grid) for i in range(n_train)]
    seen_keys = {tuple(map(tuple, w)) for w in train_layouts}
    records = []

    def add(split: str, i: int, walls, layout: str, template: str, heldout: str, goal_pairs=None) -> None:
        rng = sub_rng(seed, "nav", split, i)
        ep = _draw(f"{split} {i}", lambda: sample_episode(rng, grid, walls, SEEN_PAIRS, template, goal_pairs))
        rec = dict({"id": f"{split}{i:06d}", "split": split, "cell": cell, "layout": layout, "heldout": heldout}, **ep)
        check_record(rec)
        records.append(rec)

    for i, walls in enumerate(train_layouts):
        add("train", i, walls, f"seen{i}", SEEN_TEMPLATES[i % len(SEEN_TEMPLATES)], "none")
    for i in range(n_val):
        j = i % n_train
        add("val", i, train_layouts[j], f"seen{j}", SEEN_TEMPLATES[i % len(SEEN_TEMPLATES)], "none")
    j = 0
    for i in range(n_test):  # unseen layouts: another stream, and none equal to a train layout
        while True:
            walls = sample_layout(sub_rng(seed, "nav", "layout", "unseen", j), grid)
            j += 1
            if tuple(map(tuple, walls)) not in seen_keys:
                break
        add("test_maps", i, walls, f"unseen{j - 1}", SEEN_TEMPLATES[i % len(SEEN_TEMPLATES)], "none")
    for i in range(n_test):
        k = (7919 * i) % n_train  # train's layouts, new instructions
        if i % 2 == 0:
            add("test_instr", i, train_layouts[k], f"seen{k}", HELDOUT_TEMPLATES[0], "template")
        else:
            add("test_instr", i, train_layouts[k], f"seen{k}", SEEN_TEMPLATES[i % 4 // 2], "pair", HELDOUT_PAIRS)
    return records


# ---- rendering and the environment
def turned(row: int, col: int, heading: int, grid: int) -> tuple[int, int]:
    """Where cell (row, col) is drawn in the heading-up view: the map turned counter-clockwise `heading` quarter
    turns, so the agent's forward step (STEP[heading]) points to the top of the picture."""
    for _ in range(heading % 4):
        row, col = grid - 1 - col, row
    return row, col


def view_cell(row: int, col: int, agent_row: int, agent_col: int, heading: int, grid: int) -> tuple[int, int]:
    """The window cell where map cell (row, col) is drawn, the agent at (agent_row, agent_col) facing `heading`:
    turned, then shifted so the agent sits at the centre (grid - 1, grid - 1)."""
    r, c = turned(row, col, heading, grid)
    ar, ac = turned(agent_row, agent_col, heading, grid)
    return r - ar + grid - 1, c - ac + grid - 1


def window_side(grid: int, cell: int) -> int:
    """Pixels per side of the egocentric window: (2 grid - 1) cells."""
    return (2 * grid - 1) * cell


def _static(rec: dict, heading: int) -> tuple[np.ndarray, np.ndarray]:
    """The heading-up map without agent and trail (walls, upright landmarks) and a mask of its floor pixels."""
    cell, grid = rec["cell"], rec["grid"]
    spots = [turned(lm["row"], lm["col"], heading, grid) for lm in rec["landmarks"]]
    objs = tuple(Obj(lm["shape"], lm["colour"], "small", c * cell + cell // 2, r * cell + cell // 2,
                     max(2, round(cell * 0.42))) for lm, (r, c) in zip(rec["landmarks"], spots))
    img = render(Scene(grid * cell, "gray", "plain", 0, objs))
    draw = ImageDraw.Draw(img)
    for r, c in (turned(r, c, heading, grid) for r, c in rec["walls"]):
        draw.rectangle((c * cell, r * cell, c * cell + cell - 1, r * cell + cell - 1), fill=WALL)
    arr = np.array(img)
    return arr, (arr == np.array(FLOOR, dtype=np.uint8)).all(-1)


def _agent_polygon(row: int, col: int, heading: int, cell: int) -> list[tuple[float, float]]:
    cx, cy, r = col * cell + (cell - 1) / 2, row * cell + (cell - 1) / 2, cell * 0.34
    dx, dy = STEP[heading][1], STEP[heading][0]  # pointing direction in (x, y)
    px, py = -dy, dx
    return [(cx + dx * r, cy + dy * r), (cx - dx * r + px * r * 0.8, cy - dy * r + py * r * 0.8),
            (cx - dx * r - px * r * 0.8, cy - dy * r - py * r * 0.8)]


def _action_id(action) -> int:
    if isinstance(action, str) and action in ACTIONS:
        return ACTIONS.index(action)
    if isinstance(action, (int, np.integer)) and not isinstance(action, bool) and 0 <= int(action) < len(ACTIONS):
        return int(action)
    raise LmstackError(f"unknown action {action!r}; allowed: {', '.join(ACTIONS)} (or their ids 0..3)")


class NavEnv:
    """One episode: reset() -> observation, step(action) -> (observation, done, success)."""

    def __init__(self, record: dict, max_steps: int | None = None):
        for key in ("grid", "cell", "walls", "landmarks", "start", "goal", "gold_len"):
            if key not in record:
                raise LmstackError(f"navigation record lacks {key!r}; make records with build_nav_world")
        self.record = record
        self.grid, self.cell = record["grid"], record["cell"]
        self.walls = {tuple(w) for w in record["walls"]}
        goal = record["landmarks"][record["goal"]]
        self.goal = (goal["row"], goal["col"])
        self.max_steps = 2 * record["gold_len"] + 4 if max_steps is None else max_steps
        self._bases: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # heading -> its turned static map
        self._gold_states: list | None = None
        self.reset()

    def reset(self) -> np.ndarray:
        s = self.record["start"]
        self.row, self.col, self.heading = s["row"], s["col"], s["heading"]
        self.actions: list[int] = []
        self.trail = {(self.row, self.col)}
        self.done = self.success = False
        return self.observe()

    @property
    def gold_states(self) -> list[tuple[int, int, int]]:
        """(row, col, heading) before each gold action, and after the last (trace of the gold path)."""
        if self._gold_states is None:
            s = self.record["start"]
            self._gold_states = trace(self.grid, self.walls, (s["row"], s["col"], s["heading"]),
                                      self.record["gold_actions"])
        return self._gold_states

    def observe(self) -> np.ndarray:
        """uint8 (S, S, 3): the map, the trail (lighter floor on cells stood on), the agent."""
        return self.view(self.row, self.col, self.heading, self.trail)

    def view(self, row: int, col: int, heading: int, trail) -> np.ndarray:
        """The observation of this map with the agent at (row, col, heading) and `trail` cells stood on."""
        if heading not in self._bases:
            self._bases[heading] = _static(self.record, heading)
        base, floor = self._bases[heading]
        img = base.copy()
        cell, grid = self.cell, self.grid
        mask = np.zeros(img.shape[:2], dtype=bool)
        for r, c in (turned(r, c, heading, grid) for r, c in trail):
            mask[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = True
        img[mask & floor] = TRAIL
        side = window_side(grid, cell)
        window = np.empty((side, side, 3), dtype=np.uint8)
        window[:] = WALL  # off the map
        ar, ac = turned(row, col, heading, grid)
        top, left = (grid - 1 - ar) * cell, (grid - 1 - ac) * cell
        window[top:top + grid * cell, left:left + grid * cell] = img
        pic = Image.fromarray(window)
        ImageDraw.Draw(pic).polygon(_agent_polygon(grid - 1, grid - 1, 0, cell), fill=AGENT)
        return np.asarray(pic)

    def step(self, action) -> tuple[np.ndarray, bool, bool]:
        if self.done:
            raise LmstackError("the episode is over (stop was taken or max_steps reached); call reset()")
        a = _action_id(action)
        self.actions.append(a)
        if a == 3:
            self.done, self.success = True, (self.row, self.col) == self.goal
        else:
            self.row, self.col, self.heading = move(self.grid, self.walls, self.row, self.col, self.heading, a)
            self.trail.add((self.row, self.col))
            self.done = len(self.actions) >= self.max_steps
        return self.observe(), self.done, self.success

    @property
    def spl(self) -> float:
        """Success weighted by path length: success x gold / max(gold, taken) (actions, stop included)."""
        return float(self.success) * self.record["gold_len"] / max(self.record["gold_len"], len(self.actions))


# ---- files
def png_bytes(obs: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(obs).save(buf, format="PNG")
    return buf.getvalue()


def write_nav_world(out: str | os.PathLike, n_train: int = 400, n_val: int = 40, n_test: int = 80, grid: int = 5,
                    cell: int = 10, seed: int = 0) -> dict:
    """Write out/maps/<split>/<id>.png (first observation), out/<split>.jsonl, out/manifest.json (last)."""
    records = build_nav_world(n_train, n_val, n_test, grid, cell, seed)
    out = Path(out)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rec in records:
        rel = f"maps/{rec['split']}/{rec['id']}.png"
        atomic_write_bytes(out / rel, png_bytes(NavEnv(rec).reset()))
        lines[rec["split"]].append(json.dumps(dict(rec, path=rel), ensure_ascii=False))
    files = {}
    for split in SPLITS:
        text = "".join(line + "\n" for line in lines[split])
        atomic_write_text(out / f"{split}.jsonl", text)
        files[f"{split}.jsonl"] = {"records": len(lines[split]), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    gold = [r["gold_len"] for r in records]
    manifest = {"seed": seed, "grid": grid, "cell": cell, "image_size": window_side(grid, cell), "view": "egocentric top-down window of (2 grid - 1) cells: agent centred, facing up, whole map in view",
                "actions": list(ACTIONS), "counts": {s: len(lines[s]) for s in SPLITS}, "files": files,
                "heldout_pairs": [f"{c} {s}" for c, s in HELDOUT_PAIRS], "seen_templates": list(SEEN_TEMPLATES),
                "heldout_templates": list(HELDOUT_TEMPLATES), "mean_gold_len": round(float(np.mean(gold)), 3)}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_nav_split(path: str | os.PathLike, split: str) -> list[dict]:
    """The records of out/<split>.jsonl, each checked (check_record); a bad line is named."""
    file = Path(path) / f"{split}.jsonl"
    if not file.is_file():
        raise LmstackError(f"{file} does not exist; write the world with `lmstack data synth-nav --out {path}`")
    out = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
            check_record(rec)
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            raise LmstackError(f"{file}:{n}: not a navigation record ({type(e).__name__}: {e})") from None
        out.append(rec)
    return out


def synth_nav(out: str = "data/nav", n_train: int = 400, n_val: int = 40, n_test: int = 80, grid: int = 5,
              cell: int = 10, seed: int = 0) -> None:
    """Generate the navigation world: grid maps with walls and shape landmarks, instructions and gold paths.

    Args:
        out: Output folder; gets maps/<split>/<id>.png, <split>.jsonl (train, val, test_maps, test_instr),
            manifest.json.
        n_train: Training episodes (each on its own layout).
        n_val: Validation episodes (training layouts, new landmarks).
        n_test: Episodes in each held-out split (test_maps: unseen layouts; test_instr: unseen instructions).
        grid: Cells per side (4..12).
        cell: Pixels per cell (8..32); the egocentric picture is (2 grid - 1) x cell pixels a side.
        seed: Random seed; the same seed gives byte-identical files.
    """
    m = write_nav_world(out, n_train, n_val, n_test, grid, cell, seed)
    counts = ", ".join(f"{s} {n}" for s, n in m["counts"].items())
    print(f"wrote navigation episodes ({grid}x{grid} grid, {m['image_size']}px egocentric view) to {out}: {counts}; "
          f"mean gold path {m['mean_gold_len']} actions")


__all__ = ["ACTIONS", "HEADINGS", "SPLITS", "HELDOUT_PAIRS", "SEEN_PAIRS", "SEEN_TEMPLATES", "HELDOUT_TEMPLATES",
           "NavEnv", "build_nav_world", "write_nav_world", "read_nav_split", "synth_nav", "gold_path", "trace",
           "move", "sample_layout", "sample_episode", "instruction", "mentioned", "check_record", "landmark_name",
           "check_args", "png_bytes", "turned", "view_cell", "window_side"]
