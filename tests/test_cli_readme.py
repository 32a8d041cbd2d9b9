"""The README's CLI block runs as written, top to bottom, in a fresh directory.

The block is parsed out of README.md (so the test breaks when the README drifts), each line gets only
size-shrinking flags appended (fewer steps, smaller limits), and the whole block runs as one bash script in
a temporary checkout-like directory: `recipes/` beside it and `../shared/data` above it, as in a clone. The
server the block starts binds 127.0.0.1 on a free port (the block's port 8000 is swapped for it), the script
waits until it answers, and the block's own `kill %1` stops it (an exit trap also stops it on failure).
"""
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# (pattern of a README line, flags appended to it): sizes only, never what the line does.
SHRINK = [
    (r"^lmstack data run\b",
     """--inputs '[{"path": "data/world/pretrain/val.jsonl", "source": "world", "max_docs": 200}]' """
     """--mix.weights '{}' --workers 1 --progress false"""),
    (r"^lmstack data add\b", "--workers 1"),
    (r"^lmstack tokenizer train\b", "--vocab_size 300"),
    (r"^lmstack pretrain\b", "--train.steps 3 --train.eval_every 0 --train.eval_batches 2 --train.save_every 0 "
                             "--train.progress false"),
    (r"^lmstack model generate\b", "--max_tokens 4"),
    (r"^lmstack sweep\b", "--n_trials 2 --plots false --overrides train.steps=4 --overrides train.eval_every=2 "
                           "--overrides train.eval_batches=2 --overrides train.progress=false"),
    (r"^lmstack scaling\b",
     "--world_people 30 --overrides data.batch_size=4 --overrides data.seq_len=32 --overrides train.eval_batches=4 "
     "--overrides train.progress=false --budgets '[3e8, 6e8]' --min_steps 5 --n_boot 10 "
     "--min_tokens_per_param 0 --max_tokens_per_param 100000 --sizes '[{\"d_model\": 16, \"n_layers\": 1, "
     "\"n_heads\": 2}, {\"d_model\": 24, \"n_layers\": 1, \"n_heads\": 2}, {\"d_model\": 32, \"n_layers\": 1, "
     "\"n_heads\": 2}, {\"d_model\": 32, \"n_layers\": 2, \"n_heads\": 2}]'"),
    (r"^lmstack speedrun\b",
     "--vocab_size 300 --workers 1 --pretrain.model.d_model 32 --pretrain.model.n_layers 1 "
     "--pretrain.model.n_heads 2 --pretrain.model.n_kv_heads 1 "
     "--pretrain.data.seq_len 64 --pretrain.data.batch_size 4 --pretrain.train.max_seconds 3 "
     "--pretrain.train.eval_every 0 --pretrain.train.eval_batches 2 --eval_seconds 5 --eval_limit 2 "
     "--sft_seconds 3 --align_seconds 3 --sample_tokens 4"),
    (r"^lmstack generate\b", "--max_tokens 4"),
    (r"^lmstack eval --model http", "--limit 2 --bootstrap_iters 0 --progress false"),
    (r"^lmstack chat\b", "--max_tokens 4 <<< $'hello\\n/exit'"),
    (r"^lmstack finetune\b", "--train.steps 2 --train.eval_every 0 --train.progress false --batch_size 2 "
                             "--seq_len 64 --val_fraction 0.01"),
    (r"^lmstack eval --model runs\b", "--limit 2 --bootstrap_iters 0 --progress false"),
    (r"^lmstack align\b", "--train.steps 2 --train.eval_every 0 --batch_size 2 --max_len 64 --train.progress false"),
    (r"^lmstack data synth-vision\b", "--n_images 60"),
    (r"^lmstack mm train-clip\b", "--steps 3 --batch_size 4 --progress false"),
    (r"^lmstack mm train-vlm\b", "--pretrain_steps 2 --train.steps 3 --train.batch_size 4 --eval_images 3 --d_model 32 "
                                  "--n_layers 1 --progress false"),
    (r"^lmstack mm caption\b", "--max_tokens 4"),
    (r"^lmstack data synth-speech\b", "--n_utterances 30"),
    (r"^lmstack mm train-asr\b", "--steps 2 --batch_size 2 --d_model 16 --n_heads 2 --n_encoder_layers 1 "
                                   "--n_decoder_layers 1 --val_n 2 --progress false"),
    (r"^lmstack mm train-diffusion\b", "--n_images 16 --steps 2 --batch_size 4 --clip_steps 2 --dit.d_model 16 "
                                         "--dit.n_layers 1 --dit.n_heads 2 --progress false"),
    (r"^lmstack mm generate-image\b", "--steps 2"),
]


def readme_cli_block() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## CLI"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's CLI section has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_script(lines: list[str], port: int) -> str:
    py = shlex.quote(sys.executable)
    wait = (f"{py} -c 'import socket,sys,time\nfor _ in range(600):\n"
            f"    try: socket.create_connection((\"127.0.0.1\", {port}), 1).close(); sys.exit(0)\n"
            f"    except OSError: time.sleep(0.5)\nsys.exit(\"the server never answered\")'")
    out = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    used = set()
    for i, raw in enumerate(lines):
        line = re.sub(r"\s+#\s.*$", "", raw).strip()          # the README's trailing comments
        line = line.replace("8000", str(port))                  # the server's port: a free one
        background = line.endswith("&")
        if background:
            line = line[:-1].strip()
        hits = [k for k, (pat, _) in enumerate(SHRINK) if re.search(pat, line)]
        assert len(hits) <= 1, f"README line matches several shrink rules: {raw}"
        if hits:
            used.add(hits[0])
            line = f"{line} {SHRINK[hits[0]][1]}"
        if line.startswith("lmstack serve"):
            assert background, "the README's serve line must end with & so the block can go on"
            assert "--host" not in line, "the server must bind 127.0.0.1 (the default)"
        out.append(f"echo '=== README line {i + 1}: {raw[:60].replace(chr(39), '')}'")
        out.append(line + (" &" if background else ""))
        if line.startswith("lmstack serve"):
            out.append(wait)
    missing = [SHRINK[k][0] for k in range(len(SHRINK)) if k not in used]
    assert not missing, f"README's CLI block lost the lines these rules shrink: {missing}"
    return "\n".join(out) + "\n"


def test_readme_block_covers_the_stages_it_promises():
    lines = readme_cli_block()
    stages = {line.split()[1] for line in lines if line.startswith("lmstack ")}
    assert {"data", "tokenizer", "pretrain", "model", "speedrun", "generate", "serve", "chat", "finetune", "eval",
            "align", "report"} <= stages
    assert any(line.startswith("kill %1") for line in lines)  # the server it starts is stopped
    build_script(lines, 8123)  # every shrink rule still finds its line


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "tinyshakespeare" / "input.txt").is_file(),
                    reason="../shared/data is not beside the checkout")
def test_readme_cli_block_runs_top_to_bottom(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / "shared").symlink_to(SHARED)
    script = build_script(readme_cli_block(), free_port())
    (work / "readme.sh").write_text(script, encoding="utf-8")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    env.pop("LMSTACK_DEBUG", None)
    proc = subprocess.Popen(["bash", "readme.sh"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("the README block did not finish in 25 min:\n" + log[-4000:])
    tail = log[-6000:]
    assert proc.returncode == 0, tail
    n = len(readme_cli_block())
    assert f"=== README line {n}:" in log, tail
    # what the block promises exists
    for path in ("data/world/manifest.json", "data/pipeline/shards", "tok/tokenizer.json", "runs/tiny/tokenizer.json",
                 "runs/converted/config.json", "runs/sft/model/config.json", "runs/dpo/summary.json",
                 "runs/tiny/eval/results.json", "data/vision/manifest.json", "runs/clip/config.json",
                 "runs/vlm/config.json"):
        assert (work / path).exists(), path
    assert list(work.glob("runs/2*/report.md")), "the speedrun wrote no report card"
    assert "lmstack: error" not in log
    # the server is gone: nothing answers on its port any more
    port = int(re.search(r"lmstack serve .*?--port (\d+)", script).group(1))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()
