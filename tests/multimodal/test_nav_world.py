"""The navigation world (issue 25 §1): gold paths re-checked by an independent search written here, instructions
that name exactly the sub-goals, held-out splits that are really held out, the step function's rules, the
renderer's pixels, the files and the CLI."""
from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
from PIL import Image

from lmstack import cli
from lmstack.errors import LmstackError
from lmstack.multimodal.nav_world import (AGENT, HELDOUT_PAIRS, HELDOUT_TEMPLATES, SEEN_TEMPLATES, TRAIL, WALL,
                                          NavEnv, build_nav_world, check_record, mentioned, read_nav_split,
                                          view_cell, write_nav_world)
from lmstack.multimodal.shapes import COLOURS

pytestmark = pytest.mark.usefixtures("one_thread")

DELTA = {0: (-1, 0), 1: (0, 1), 2: (1, 0), 3: (0, -1)}


@pytest.fixture(scope="module")
def records():
    return build_nav_world(n_train=60, n_val=8, n_test=20, grid=7, cell=12, seed=0)


def split(records, name):
    return [r for r in records if r["split"] == name]


def shortest(rec):
    """Fewest actions (stop included) that enter the sub-goal cells in order: a plain BFS written here."""
    walls, g = {tuple(w) for w in rec["walls"]}, rec["grid"]
    goals = [(rec["landmarks"][i]["row"], rec["landmarks"][i]["col"]) for i in rec["subgoals"]]
    s = rec["start"]
    first = (s["row"], s["col"], s["heading"], 0)
    dist, todo = {first: 0}, deque([first])
    while todo:
        r, c, h, k = todo.popleft()
        if k == len(goals):
            return dist[(r, c, h, k)] + 1
        nexts = [(r, c, (h + 1) % 4, k), (r, c, (h + 3) % 4, k)]
        nr, nc = r + DELTA[h][0], c + DELTA[h][1]
        if 0 <= nr < g and 0 <= nc < g and (nr, nc) not in walls:
            nexts.append((nr, nc, h, k + ((nr, nc) == goals[k])))
        for n in nexts:
            if n not in dist:
                dist[n] = dist[(r, c, h, k)] + 1
                todo.append(n)
    return None


def test_gold_paths_are_shortest_and_succeed(records):
    for rec in records:
        assert rec["gold_len"] == len(rec["gold_actions"]) == shortest(rec), rec["id"]
        env = NavEnv(rec)
        env.reset()
        for a in rec["gold_actions"]:
            _, done, success = env.step(a)
        assert done and success and env.spl == 1.0


def test_instructions_name_the_subgoals_in_order_and_are_unambiguous(records):
    for rec in records:
        names = [f"{lm['colour']} {lm['shape']}" for lm in rec["landmarks"]]
        assert len(set(names)) == len(names)
        assert mentioned(rec["instruction"]) == [names[i] for i in rec["subgoals"]]
        assert rec["goal"] == rec["subgoals"][-1]
    bad = dict(records[0], instruction="stop at the " + next(
        f"{c} circle" for c in COLOURS if f"{c} circle" not in [f"{lm['colour']} {lm['shape']}"
                                                                for lm in records[0]["landmarks"]]) + ".")
    with pytest.raises(LmstackError, match="instruction names"):
        check_record(bad)
    twin = dict(records[0], landmarks=[records[0]["landmarks"][0]] * 4)
    with pytest.raises(LmstackError, match="share a name"):
        check_record(twin)


def test_turn_words_match_the_gold_path(records):
    # "turn left at X": the heading leaving X's cell is the arrival heading turned left once
    checked = 0
    for rec in records:
        if rec["template"] == "semicolons" or len(rec["subgoals"]) < 2:
            continue
        env = NavEnv(rec)
        states = env.gold_states
        first = rec["landmarks"][rec["subgoals"][0]]
        t = next(i for i in range(1, len(states)) if states[i][:2] == (first["row"], first["col"]))
        leave = next(u for u in range(t + 1, len(states)) if states[u][:2] != states[t][:2])
        turn = (states[leave][2] - states[t][2]) % 4
        word = {0: "go past", 1: "turn right at", 2: "turn around at", 3: "turn left at"}[turn]
        assert f"{word} the {first['colour']} {first['shape']}" in rec["instruction"], rec["instruction"]
        checked += 1
    assert checked > 10


def test_heldout_splits(records):
    train = split(records, "train")
    train_walls = {tuple(map(tuple, r["walls"])) for r in train}
    for r in split(records, "test_maps"):
        assert tuple(map(tuple, r["walls"])) not in train_walls
    assert all(tuple(map(tuple, r["walls"])) in train_walls for r in split(records, "test_instr"))
    seen = {(lm["colour"], lm["shape"]) for r in train + split(records, "val") + split(records, "test_maps")
            for lm in r["landmarks"]}
    assert not seen & set(HELDOUT_PAIRS)
    assert {r["template"] for r in train} == set(SEEN_TEMPLATES)
    instr = split(records, "test_instr")
    for r in instr:
        goal = r["landmarks"][r["goal"]]
        if r["heldout"] == "template":
            assert r["template"] in HELDOUT_TEMPLATES
        else:
            assert r["heldout"] == "pair" and (goal["colour"], goal["shape"]) in HELDOUT_PAIRS
    assert {r["heldout"] for r in instr} == {"template", "pair"}


def test_step_rules(records):
    rec = records[0]
    env = NavEnv(rec, max_steps=5)
    env.reset()
    r, c, h = env.row, env.col, env.heading
    env.step("turn_left")
    assert (env.row, env.col, env.heading) == (r, c, (h - 1) % 4)
    env.step("turn_right")
    env.step("turn_right")
    assert env.heading == (h + 1) % 4
    # walk into the wall or the edge: forward keeps the agent in place and still counts
    env = NavEnv(rec, max_steps=40)
    env.reset()
    moved = blocked = 0
    for _ in range(12):
        before = (env.row, env.col)
        ahead = (env.row + DELTA[env.heading][0], env.col + DELTA[env.heading][1])
        env.step("forward")
        free = 0 <= ahead[0] < 7 and 0 <= ahead[1] < 7 and list(ahead) not in rec["walls"]
        assert (env.row, env.col) == (ahead if free else before)
        moved, blocked = moved + free, blocked + (not free)
    assert blocked >= 1 and len(env.actions) == 12
    # max_steps ends the episode as a failure; stepping afterwards is refused
    env = NavEnv(rec, max_steps=3)
    env.reset()
    for _ in range(3):
        _, done, success = env.step("turn_left")
    assert done and not success and env.spl == 0.0
    with pytest.raises(LmstackError, match="episode is over"):
        env.step("stop")
    with pytest.raises(LmstackError, match="unknown action"):
        NavEnv(rec).step("jump")


def test_stop_off_the_goal_fails(records):
    rec = next(r for r in records if r["gold_actions"][0] != 3)
    env = NavEnv(rec)
    env.reset()
    _, done, success = env.step("stop")
    assert done and not success


def test_render_is_egocentric_with_the_whole_map(records):
    rec = records[1]
    env = NavEnv(rec)
    obs = env.reset()
    cell, g, s = rec["cell"], 7, rec["start"]
    h = s["heading"]
    assert obs.shape == (13 * cell, 13 * cell, 3) and obs.dtype == np.uint8

    def at(r, c, heading=h, agent=(s["row"], s["col"])):
        return view_cell(r, c, agent[0], agent[1], heading, g)

    for r, c in rec["walls"]:
        vr, vc = at(r, c)
        assert (obs[vr * cell + cell // 2, vc * cell + 1] == WALL).all()
    for lm in rec["landmarks"]:  # every landmark is in view, upright, in its colour
        vr, vc = at(lm["row"], lm["col"])
        assert 0 <= vr < 13 and 0 <= vc < 13
        cy, cx = vr * cell + cell // 2, vc * cell + cell // 2
        assert (obs[cy - 1:cy + 2, cx - 1:cx + 2] == COLOURS[lm["colour"]]).all(-1).any()
    # the agent sits at the centre; its forward step always points to the top of the picture
    for heading in range(4):
        assert at(3, 3, heading, (3, 3)) == (6, 6)
        assert at(3 + DELTA[heading][0], 3 + DELTA[heading][1], heading, (3, 3)) == (5, 6)
    agent = (obs == AGENT).all(-1)
    centre = agent[6 * cell:7 * cell, 6 * cell:7 * cell]
    assert centre.sum() > 5 and agent.sum() == centre.sum()  # nowhere else
    assert centre[:cell // 2].sum() < centre[cell // 2:].sum()  # a triangle pointing up: its point at the top
    # cells off the map are wall
    on_map = {at(r, c) for r in range(g) for c in range(g)}
    off = [(i, j) for i in range(13) for j in range(13) if (i, j) not in on_map]
    assert len(off) == 13 * 13 - g * g
    assert all((obs[i * cell + cell // 2, j * cell + cell // 2] == WALL).all() for i, j in off)
    views = {env.view(s["row"], s["col"], heading, set()).tobytes() for heading in range(4)}
    assert len(views) == 4  # turning the agent turns the map
    for a in rec["gold_actions"][:-1]:
        obs, _, _ = env.step(a)
    vr, vc = view_cell(s["row"], s["col"], env.row, env.col, env.heading, g)
    start_cell = obs[vr * cell:(vr + 1) * cell, vc * cell:(vc + 1) * cell]
    assert (start_cell == TRAIL).all(-1).any()  # the start is behind the agent now and shows as trail


def test_deterministic_and_files(tmp_path, records):
    again = build_nav_world(n_train=60, n_val=8, n_test=20, grid=7, cell=12, seed=0)
    assert again == records
    assert build_nav_world(n_train=60, n_val=8, n_test=20, grid=7, cell=12, seed=1) != records
    m = write_nav_world(tmp_path / "nav", n_train=6, n_val=2, n_test=3, seed=0)
    assert m["counts"] == {"train": 6, "val": 2, "test_maps": 3, "test_instr": 3}
    back = read_nav_split(tmp_path / "nav", "test_maps")
    assert [r["id"] for r in back] == ["test_maps000000", "test_maps000001", "test_maps000002"]
    pic = np.asarray(Image.open(tmp_path / "nav" / back[0]["path"]).convert("RGB"))
    assert (pic == NavEnv(back[0]).reset()).all()
    (tmp_path / "nav" / "val.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(LmstackError, match="val.jsonl:1"):
        read_nav_split(tmp_path / "nav", "val")
    with pytest.raises(LmstackError, match="synth-nav"):
        read_nav_split(tmp_path / "none", "train")


def test_bad_arguments_are_named():
    with pytest.raises(LmstackError, match="grid"):
        build_nav_world(n_train=2, grid=3)
    with pytest.raises(LmstackError, match="window"):
        build_nav_world(n_train=2, grid=12, cell=32)
    with pytest.raises(LmstackError, match="cell"):
        build_nav_world(n_train=2, cell=2)
    with pytest.raises(LmstackError, match="n_train"):
        build_nav_world(n_train=0)
    with pytest.raises(LmstackError, match="lacks 'cell'"):
        NavEnv({"grid": 7})


def test_cli_synth_nav(tmp_path):
    out = tmp_path / "cli"
    cli.run(["data", "synth-nav", "--out", str(out), "--n-train", "4", "--n_val", "1", "--n-test", "2"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 4 and manifest["view"].startswith("egocentric")
    assert manifest["image_size"] == 90 and manifest["grid"] == 5
    assert len(list((out / "maps" / "test_instr").glob("*.png"))) == 2
