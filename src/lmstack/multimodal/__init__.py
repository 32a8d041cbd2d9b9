"""Multimodal lmstack, vision first (issue 24). So far: the shapes world, a deterministic picture world with
paired text (captions, VQA, referring expressions, multi-step questions with reasoning chains) and held-out
colour/shape compositions for zero-shot tests.

Usage:
    from lmstack.multimodal import Scene, Obj, render, build_vision_world, synth_vision
    records = build_vision_world(n_images=20, size=64, seed=0)
    image = render(Scene.from_dict(records[0]["scene"]))        # PIL.Image
    synth_vision("data/vision", n_images=200, size=64, seed=0)  # lmstack data synth-vision --out data/vision
"""
from lmstack.multimodal.shapes import COLOURS, SHAPES, Obj, Scene, occlusion, render
from lmstack.multimodal.vision_world import HELDOUT_PAIRS, SPLITS, build_vision_world, synth_vision, write_vision_world

__all__ = ["Scene", "Obj", "render", "occlusion", "COLOURS", "SHAPES", "build_vision_world", "write_vision_world",
           "synth_vision", "HELDOUT_PAIRS", "SPLITS"]
