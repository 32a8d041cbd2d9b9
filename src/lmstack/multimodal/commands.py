"""`lmstack mm`: the multimodal stage's commands.

Usage:
    lmstack data synth-vision --out data/vision --n_images 400       # the shapes world the commands read
    lmstack mm train-clip --data data/vision --out runs/clip --steps 300
    lmstack mm train-clip --data data/vision --out runs/vlp --objectives '[itc, itm, lm]'
    lmstack mm train-clip --print_config                            # every flag, as a recipe YAML
    lmstack mm train-vlm --data data/vision --clip runs/clip --out runs/vlm     # LLaVA's recipe (vlm_run.py)
    lmstack mm caption pic.png --model runs/vlm                     # a greedy caption of one picture
    lmstack mm zero-shot pic.png --model runs/clip --labels "red circle,blue square"   # labels by probability
    lmstack mm train-asr --data data/speech --out runs/asr --steps 300    # Whisper-style ASR (asr_train.py)
    lmstack mm transcribe clip.wav --model runs/asr --beam 4             # a WAV file's transcript
    lmstack mm train-diffusion --out runs/diffusion --steps 1500      # text-to-image DiT (diffusion_train.py)
    lmstack mm generate-image --prompt "a red circle" --model runs/diffusion --out img.png
    lmstack mm train-video --data data/video --out runs/video --pretrain_steps 200   # video QA (video_train.py)
    lmstack mm train-codec --data data/speech --out runs/codec --steps 800     # neural audio codec (tts_train.py)
    lmstack mm train-tts --data data/speech --codec runs/codec --out runs/tts   # VALL-E-style TTS on one voice
    lmstack mm speak "4217" --model runs/tts --out x.wav                 # text -> 16 kHz WAV
"""
from __future__ import annotations

import torch

from lmstack.config import ConfigCommand
from lmstack.errors import LmstackError
from lmstack.multimodal.clip import load_clip, zero_shot as clip_zero_shot
from lmstack.multimodal.images import read_image_file, to_pixels
from lmstack.multimodal.report import caption_images
from lmstack.multimodal.vlm import load_vlm
from lmstack.tokenizer import load_tokenizer
from lmstack.multimodal.asr_train import ASRTrainConfig, run_train_asr, transcribe
from lmstack.multimodal.clip_train import CLIPTrainConfig, train_clip
from lmstack.multimodal.diffusion_train import DiffusionTrainConfig, generate_image, run_train_diffusion
from lmstack.multimodal.tts_train import CodecTrainConfig, TTSTrainConfig, run_train_codec, run_train_tts, speak
from lmstack.multimodal.video_train import VideoTrainConfig, run_train_video
from lmstack.multimodal.vlm_run import VLMRunConfig, run_train_vlm


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


def caption(image: str, model: str | None = None, max_tokens: int = 40) -> str:
    """Caption a picture with a VLM (greedy, the prompt it was trained on: "<image> Caption:").

    Args:
        image: A picture file (PNG, JPEG, ...), checked like a server upload.
        model: A VLM directory (written by save_vlm, e.g. after multimodal/vlm_train.train_vlm).
        max_tokens: Most caption tokens.
    """
    if model is None:
        raise LmstackError("--model VLM_DIR is required (a directory written by save_vlm)")
    picture = read_image_file(image)  # a bad file fails before the model loads
    vlm = load_vlm(model)
    text = caption_images(vlm, load_tokenizer(model), [picture], max_new_tokens=max_tokens)[0]
    print(text)
    return text


def zero_shot(image: str, model: str | None = None, labels: str = "") -> dict[str, float]:
    """Zero-shot classification of a picture by CLIP: each label's probability, most likely first.

    Args:
        image: A picture file (PNG, JPEG, ...), checked like a server upload.
        model: A CLIP directory (save_clip; `lmstack mm train-clip`).
        labels: Comma-separated class names, e.g. "red circle,blue square" (prompted with CLIP's templates).
    """
    names = [x.strip() for x in labels.split(",") if x.strip()]
    if len(names) < 2:
        raise LmstackError(f"--labels needs at least two comma-separated labels, got {labels!r}")
    if model is None:
        raise LmstackError("--model CLIP_DIR is required (a directory written by save_clip)")
    picture = read_image_file(image)
    clip, tok = load_clip(model)
    with torch.no_grad():
        probs = clip_zero_shot(clip, tok, to_pixels([picture], clip.config.vision.image_size), names)[0]
    ranked = dict(sorted(zip(names, probs.tolist()), key=lambda kv: -kv[1]))
    width = max(len(n) for n in names)
    for name, p in ranked.items():
        print(f"{name:{width}s}  {p:.3f}")
    return ranked


COMMANDS = {"train-clip": ConfigCommand(CLIPTrainConfig, _train_clip),
            "train-vlm": ConfigCommand(VLMRunConfig, run_train_vlm), "caption": caption, "zero-shot": zero_shot,
            "train-diffusion": ConfigCommand(DiffusionTrainConfig, run_train_diffusion), "generate-image": generate_image,
            "train-asr": ConfigCommand(ASRTrainConfig, run_train_asr), "transcribe": transcribe,
            "train-video": ConfigCommand(VideoTrainConfig, run_train_video),
            "train-codec": ConfigCommand(CodecTrainConfig, run_train_codec),
            "train-tts": ConfigCommand(TTSTrainConfig, run_train_tts), "speak": speak}
