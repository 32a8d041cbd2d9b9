"""Multimodal lmstack: pictures (issue 24) and speech, video, image generation and navigation (issue 25), all on
generated worlds: ViT and CLIP, VLP objectives, a VLM with three fusions, unified image tokens, the Perceiver,
multimodal CoT / RAG / memory, attacks, Whisper-style ASR, a codec TTS, video QA, diffusion and a navigation policy.

One home per idea:
- the shapes world: shapes.py (scenes, rendering), vision_world.py (captions, VQA, referring expressions,
  multi-step questions with chains; held-out compositions), video_world.py (clips of moving shapes with
  temporal questions, issue 25), speech_world.py + espeak.py (utterances spoken by espeak-ng, prosody classes,
  noisy and reverberant splits, issue 25), world_link.py (city flags and person badges that join
  the text world), text.py (the world's BPE tokenizer with `<image>`), images.py (untrusted image input),
  audio.py (WAV in and out, resampling, Whisper's log-mel features: the speech models' input, issue 25);
- encoders: vit.py (ViT on the one Transformer), clip.py + clip_train.py + vlp.py (CLIP, BLIP-style ITC/ITM/LM),
  perceiver.py (latents cross-attending to patches or raw pixels);
- the VLM: vlm.py (projector | Flamingo gated cross-attention | Q-Former: fusion.py, qformer.py), vlm_train.py;
- unified tokens: vq.py (VQ-VAE, lookup-free quantizer), unified.py (one decoder reads and writes image codes);
- uses: cot.py, mm_rag.py, mm_memory.py, attacks.py, adversarial_train.py, engine_adapter.py (the server's VLM),
  report.py (caption grids), hf_clip.py / hf_llava.py (transformers interop);
- speech: whisper.py + asr.py + asr_train.py (Whisper-style ASR), ctc.py (its CTC baseline), hf_whisper.py;
  codec.py + rvq.py (neural codec, residual VQ), tts.py + tts_train.py (VALL-E-style codec LM);
  emotion_world.py + emotion.py (prosody arousal x lexical valence: audio, text and fused classifiers);
- video: video_model.py (ViT + temporal Transformer, divided space-time attention, the frame-mean baseline),
  video_train.py (video-text contrastive pretraining, video QA);
- generation: diffusion.py (DDPM/DDIM, classifier-free guidance), dit.py (DiT on the one Transformer,
  ImageGenerator), unet.py (its conv alternative), diffusion_train.py, image_metrics.py (attribute
  accuracy, CLIP agreement, Frechet distance);
- navigation: nav_world.py (rendered grid maps, instructions, gold paths, NavEnv), nav_policy.py (behaviour
  cloning, GRPO).

Names are loaded on first use, so `lmstack data synth-vision` does not pay for torch models it never builds.

Usage:
    from lmstack.multimodal import build_vision_world, shapes_tokenizer, CLIP, VLM, VLMConfig, load_vlm
    records = build_vision_world(n_images=20, size=64, seed=0)
    image = render(Scene.from_dict(records[0]["scene"]))        # PIL.Image
    synth_vision("data/vision", n_images=200, size=64, seed=0)  # lmstack data synth-vision --out data/vision
    vlm = load_vlm("runs/vlm"); tok = lmstack.load_tokenizer("runs/vlm")
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "shapes": ("COLOURS", "SHAPES", "Obj", "Scene", "occlusion", "render"),
    "vision_world": ("HELDOUT_PAIRS", "SPLITS", "build_vision_world", "synth_vision", "write_vision_world"),
    "world_link": ("build_world_link", "link_questions"),
    "video_world": ("build_video_world", "synth_video", "load_video_clip"),
    "speech_world": ("build_speech_world", "synth_speech", "PROSODY"),
    "espeak": ("synthesize",),
    "text": ("IMAGE_TOKEN", "shapes_tokenizer", "shapes_texts"),
    "audio": ("read_wav", "write_wav", "resample", "log_mel", "mel_filters"),
    "images": ("decode_image", "decode_data_url", "read_image_file", "to_pixels", "from_pixels", "image_hash"),
    "vit": ("ViT", "VisionConfig"),
    "clip": ("CLIP", "CLIPConfig", "TextConfig", "zero_shot", "retrieval_recall", "save_clip", "load_clip"),
    "clip_train": ("CLIPTrainConfig", "train_clip"),
    "vlp": ("VLP", "VLPConfig", "vlp_loss"),
    "hf_clip": ("clip_from_hf", "clip_to_hf"),
    "hf_llava": ("vlm_from_hf", "vlm_to_hf"),
    "vlm": ("VLM", "VLMConfig", "save_vlm", "load_vlm"),
    "vlm_train": ("VLMTrainConfig", "train_vlm"),
    "vlm_run": ("VLMRunConfig", "run_train_vlm"),
    "vq": ("VQConfig", "VQVAE", "load_vq", "codebook_stats"),
    "unified": ("UnifiedVocab", "unified_model", "train_unified", "generate_image_codes", "generate_captions"),
    "perceiver": ("Perceiver", "PerceiverConfig", "perceiver_flops"),
    "cot": ("cot_examples", "score_chain"),
    "mm_rag": ("ImageIndex", "ClipEmbedder", "VLMReader"),
    "mm_memory": ("ConversationMemory", "build_dialogues"),
    "attacks": ("fgsm", "pgd", "attack", "typographic", "typographic_pixels", "AttackConfig"),
    "adversarial_train": ("AdvTrainConfig", "adversarial_train", "adversarial_train_clip", "OVERLAY_WORDS",
                          "overlay_words"),
    "engine_adapter": ("VLMEngineModel", "ImagePrompt", "engine_model", "load_engine_vlm"),
    "report": ("caption_images", "caption_grid", "section_vlm"),
    "whisper": ("Whisper", "WhisperConfig"),
    "asr": ("SpeechRecognizer",),
    "ctc": ("CTCModel", "CTCConfig", "CTCRecognizer"),
    "hf_whisper": ("from_hf_whisper", "load_hf_whisper_dir"),
    "asr_train": ("ASRTrainConfig", "train_asr"),
    "codec": ("Codec", "CodecConfig", "load_codec"),
    "rvq": ("ResidualVQ",),
    "tts": ("SpeechSynthesizer", "TTSConfig", "CodecLM"),
    "emotion_world": ("build_emotion_world", "write_emotion_world"),
    "emotion": ("EmotionClassifier", "EmotionConfig", "train_emotion", "load_emotion"),
    "video_model": ("VideoEncoder", "VideoConfig", "VideoCLIP", "VideoQA", "build_video_encoder"),
    "video_train": ("VideoTrainConfig", "train_video", "load_video_qa"),
    "diffusion": ("NoiseSchedule", "ddpm_sample", "ddim_sample"),
    "dit": ("DiT", "DiTConfig", "ImageGenerator"),
    "unet": ("UNet", "UNetConfig"),
    "diffusion_train": ("DiffusionTrainConfig", "train_diffusion"),
    "nav_world": ("NavEnv", "build_nav_world", "synth_nav"),
    "nav_policy": ("NavPolicy", "NavPolicyConfig", "behaviour_clone", "grpo", "load_policy"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lmstack.multimodal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmstack.multimodal.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
