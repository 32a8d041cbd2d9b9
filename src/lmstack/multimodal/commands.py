"""`lmstack mm`: the multimodal stage's commands.

Usage:
    lmstack data synth-vision --out data/vision --n_images 400       # the shapes world the commands read
    lmstack mm train-clip --data data/vision --out runs/clip --steps 300
    lmstack mm train-clip --data data/vision --out runs/vlp --objectives '[itc, itm, lm]'
    lmstack mm train-clip --print_config                            # every flag, as a recipe YAML
"""
from __future__ import annotations

from lmstack.config import ConfigCommand
from lmstack.multimodal.clip_train import CLIPTrainConfig, train_clip


def _train_clip(cfg: CLIPTrainConfig) -> dict:
    """Train CLIP (or ITC + ITM + LM, BLIP-style) on a shapes world from `lmstack data synth-vision`."""
    summary = train_clip(cfg)
    final = summary["final"]
    losses = ", ".join(f"{k} {final[k]:.3f}" for k in ("itc", "itm", "lm") if k in final)
    print(f"train-clip: {summary['steps']} steps in {summary['seconds']:.1f} s ({losses})")
    if "val" in summary:
        v = summary["val"]
        print(f"train-clip: val recall@1 image->text {v['i2t@1']:.3f}, text->image {v['t2i@1']:.3f}; "
              f"recall@5 {v['i2t@5']:.3f} / {v['t2i@5']:.3f} ({v['n_images']} pictures, {v['n_texts']} captions)")
    print(f"wrote {summary['out']} (load with lmstack.multimodal.clip.load_clip)")
    return summary


COMMANDS = {"train-clip": ConfigCommand(CLIPTrainConfig, _train_clip)}
