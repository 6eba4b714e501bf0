"""vlpretrain's trainer against OpenCLIP's own trainer: same shards, model shape, batch, steps,
optimiser, precision and data workers, run interleaved (ours, theirs, ours, theirs, ...).

    python tools/compare_openclip.py [--rows fp32,fp32-sp,bf16,coca] [--rounds 2] [--steps 150]

OpenCLIP runs as ``python -m open_clip_train.main`` from ``open_clip_torch[training]`` installed in
a virtual environment of its own (its extra pins ``webdataset<=0.2.86``, older than ours); the
script creates it under ``--work`` on first use (``--system-site-packages``, so it reuses this
torch). Our side runs ``tools/bench.py`` (the real ``train()``). Both sides log every step; a
step's time is its wall time with the data wait, and the first ``--warmup`` steps are left out.
Peak memory is polled from /proc the same way for both: the trainer process's high-water mark
(``VmHWM``) and the largest sum of RSS over the process tree (trainer + data workers).

Rows (CPU model: ViT 64 px / patch 8 / width 192 / depth 6 / 3 heads; text context 32, width 192,
depth 6, 3 heads; embedding 192; batch 64):

- ``fp32``: CLIP loss, both with OpenCLIP's BPE tokenizer (49408 tokens; ours loads the very same
  vocabulary and merges as a HuggingFace tokenizer built from OpenCLIP's file), fp32.
- ``fp32-sp``: the same with our own SentencePiece tokenizer trained on the captions.
- ``bf16``: ``fp32`` under bf16 autocast. On a CPU without bf16 units ours emulates it (fp32
  kernels, bf16 rounding) while OpenCLIP runs PyTorch's reference bf16 kernels, ~20x slower:
  ``--bf16-steps`` keeps that row short there.
- ``coca``: contrastive + captioning: our one-pass CoCa (3 unimodal text blocks, then 3 blocks in
  which captions read the image) against OpenCLIP's CoCa (3 text layers + a 3-layer multimodal
  decoder with cross-attention, attentional pooler), caption loss weight 1.

Both sides train on each sample's ``.txt`` caption: OpenCLIP's webdataset reader reads only that
one, so ours runs with ``data.captions: first`` (its default draws among the ``.json`` captions, a
text augmentation OpenCLIP does not have here, and scores differently on the ``.txt`` captions
validation uses). Validation retrieval (R@1/R@5 both ways on the same ``--val`` images) is each trainer's own
end-of-training evaluation. Prints one JSON line per run and a final JSON line with the ratios
(medians over rounds). Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # vlpretrain's recall function scores both sides

from tools.bench import percentile  # noqa: E402
SHAPE = {"image_size": 64, "patch_size": 8, "width": 192, "depth": 6, "heads": 3, "context": 32, "embed": 192}
CLIP_VOCAB = 49408


# ---------------------------------------------------------------------------------------------- setup

def ensure_openclip_venv(venv: Path) -> Path:
    """A venv with ``open_clip_torch[training]`` that reuses this interpreter's packages (torch)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import open_clip_train.main, webdataset"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "open_clip_torch[training]"], check=True)
    subprocess.run(probe, check=True)
    return python


def clip_bpe_tokenizer(out: Path) -> Path:
    """OpenCLIP's tokenizer as a HuggingFace folder: the vocabulary and merges of its BPE file, built
    the way ``open_clip.tokenizer.SimpleTokenizer`` builds them (ids match it token for token)."""
    if (out / "tokenizer_config.json").is_file():
        return out
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    n_merges = CLIP_VOCAB - 2 * 256 - 2  # byte tokens, their end-of-word forms, start/end of text
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:1 + n_merges]
    byte_vocab = list(bytes_to_unicode().values())
    vocab = byte_vocab + [v + "</w>" for v in byte_vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    # OpenCLIP pads with id 0 ("!"): the same pad id here, so both sides see identical id tensors
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges],
                        pad_token="!")
    if len(tok) != CLIP_VOCAB:
        raise RuntimeError(f"rebuilt CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB}.")
    tok.save_pretrained(out)
    return out


def prepare(work: Path, samples: int, val: int) -> dict[str, Path]:
    data = work / "data"
    if not (data / "val" / "sizes.json").is_file():
        subprocess.run([sys.executable, "-m", "vlpretrain.cli", "synth", "--out", str(data), "--num-samples",
                        str(samples), "--num-val", str(val), "--image-size", str(SHAPE["image_size"]),
                        "--samples-per-shard", "400"], check=True, cwd=ROOT)
    sp = work / "sp_tokenizer"
    if not sp.is_dir():
        subprocess.run([sys.executable, "-m", "vlpretrain.cli", "tokenizer", "--data", str(data / "train"),
                        "--vocab-size", "1000", "--out", str(sp)], check=True, cwd=ROOT)
    return {"data": data, "clip_tok": clip_bpe_tokenizer(work / "clip_tokenizer"), "sp_tok": sp}


def openclip_model_dir(work: Path, coca: bool) -> Path:
    s = SHAPE
    vision = {"image_size": s["image_size"], "layers": s["depth"], "width": s["width"],
              "head_width": s["width"] // s["heads"], "patch_size": s["patch_size"]}
    text = {"context_length": s["context"], "vocab_size": CLIP_VOCAB, "width": s["width"], "heads": s["heads"],
            "layers": s["depth"]}
    cfg = {"embed_dim": s["embed"], "vision_cfg": vision, "text_cfg": text}
    if coca:
        half = s["depth"] // 2
        vision.update(attentional_pool=True, attn_pooler_heads=s["heads"], output_tokens=True)
        text.update(layers=half, embed_cls=True, output_tokens=True)
        cfg.update(multimodal_cfg={"context_length": s["context"], "vocab_size": CLIP_VOCAB, "width": s["width"],
                                   "heads": s["heads"], "layers": s["depth"] - half, "attn_pooler_heads": s["heads"]},
                   custom_text=True)
    out = work / ("openclip_coca" if coca else "openclip_clip")
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}, indent=1))
    return out


def our_config(work: Path, row: str, paths: dict[str, Path], args) -> Path:
    s = SHAPE
    coca = row == "coca"
    objectives = [{"name": "contrastive", "weight": 1.0, "loss": "clip"}]
    if coca:
        objectives.append({"name": "captioning", "weight": 1.0})
    cfg = {
        "model": {"image_size": s["image_size"], "patch_size": s["patch_size"], "width": s["width"],
                  "depth": s["depth"], "num_heads": s["heads"], "embed_dim": s["embed"], "max_text_len": s["context"],
                  "text_embed_depth": s["depth"] // 2 if coca else 0},
        "data": {"train": str(paths["data"] / "train"), "val": str(paths["data"] / "val"),
                 "tokenizer": str(paths["sp_tok"] if row == "fp32-sp" else paths["clip_tok"]),
                 "num_workers": args.workers, "captions": "first"},  # OpenCLIP trains on the .txt caption
        "objectives": objectives,
        "optim": {"lr": args.lr, "weight_decay": args.wd, "betas": [0.9, 0.98], "eps": 1e-6,
                  "warmup_steps": args.warmup_steps, "grad_clip": 0.0},
        "train": {"steps": _steps(row, args), "batch_size": args.batch, "precision": "bf16" if row == "bf16" else "no"},
        "eval": {"max_samples": args.val, "num_captions": 0},
    }
    path = work / f"ours_{row}.json"  # JSON is YAML
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _steps(row: str, args) -> int:
    return args.bf16_steps if row == "bf16" else args.steps


def _evaluates(row: str, args) -> bool:
    """Validation retrieval only for runs long enough to compare (a short bf16 row only times steps)."""
    return _steps(row, args) >= args.eval_min_steps


def _warmup(row: str, args) -> int:
    return min(args.warmup, _steps(row, args) // 3)


# ---------------------------------------------------------------------------------------------- runs

class TreeMemory:
    """Polls /proc: the root process's VmHWM and the largest RSS sum over its process tree."""

    def __init__(self, pid: int):
        self.pid, self.hwm_kb, self.tree_kb = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return {}
        return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in lines) if k in ("VmHWM", "VmRSS")}

    def _tree(self) -> list[int]:
        pids, frontier = [self.pid], [self.pid]
        while frontier:
            pid = frontier.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                kids = []
            pids += [int(k) for k in kids]
            frontier += [int(k) for k in kids]
        return pids

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.hwm_kb = max(self.hwm_kb, self._status(self.pid).get("VmHWM", 0))
            self.tree_kb = max(self.tree_kb, sum(self._status(p).get("VmRSS", 0) for p in self._tree()))
            time.sleep(0.1)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mb": self.hwm_kb / 1024, "peak_tree_rss_mb": self.tree_kb / 1024}


def _run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[str, dict[str, float], float]:
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT, env=env)
        mem = TreeMemory(proc.pid)
        out, _ = proc.communicate()
        memory = mem.stop()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}")
    return out, memory, time.perf_counter() - start


def run_ours(work: Path, row: str, config: Path, args, i: int) -> dict:
    cmd = [sys.executable, "tools/bench.py", "--config", str(config), "--warmup", str(_warmup(row, args))]
    cmd += ["--eval"] if _evaluates(row, args) else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out, memory, wall = _run(cmd, work / f"ours_{row}_{i}.log", env)
    figures = json.loads(out.strip().splitlines()[-1])
    ev = figures.get("eval", {})
    return {"side": "vlpretrain", "row": row, "round": i, "samples_per_s": figures["samples_per_s"],
            "step_p50_s": figures["step_p50_s"], "step_p90_s": figures["step_p90_s"],
            "data_wait_frac": figures["data_wait_frac"], "final_loss": figures["final_loss"],
            "val": {k: ev.get(f"{a}_r@{n}") for k, a, n in _RECALLS}, "wall_s": wall, **memory}


_RECALLS = [("i2t_r1", "i2t", 1), ("t2i_r1", "t2i", 1), ("i2t_r5", "i2t", 5), ("t2i_r5", "t2i", 5)]
_OC_RECALLS = {"i2t_r1": "image_to_text_R@1", "t2i_r1": "text_to_image_R@1", "i2t_r5": "image_to_text_R@5",
               "t2i_r5": "text_to_image_R@5"}
_STEP_LINE = re.compile(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+).*?Loss: ([\d.]+)")


def run_theirs(work: Path, row: str, python: Path, paths: dict[str, Path], args, i: int) -> dict:
    steps, name = _steps(row, args), f"oc_{row}_{i}"
    train_shards = sorted((paths["data"] / "train").glob("*.tar"))
    val_shards = sorted((paths["data"] / "val").glob("*.tar"))
    logs = work / "openclip_logs"
    cmd = [str(python), "-m", "open_clip_train.main", "--model", f"local-dir:{openclip_model_dir(work, row == 'coca')}",
           "--train-data", "::".join(map(str, train_shards)),
           "--dataset-type", "webdataset", "--train-num-samples", str(steps * args.batch),
           "--batch-size", str(args.batch), "--epochs", "1",
           "--workers", str(args.workers), "--device", "cpu", "--precision", "amp_bf16" if row == "bf16" else "fp32",
           "--lr", str(args.lr), "--wd", str(args.wd), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
           "--warmup", str(args.warmup_steps), "--log-every-n-steps", "1", "--logs", str(logs), "--name", name,
           "--save-frequency", "1", "--zeroshot-frequency", "0", "--report-to", "", "--seed", "0"]
    if _evaluates(row, args):
        cmd += ["--val-data", "::".join(map(str, val_shards)), "--val-num-samples", str(args.val)]
    if row == "coca":
        cmd += ["--coca-caption-loss-weight", "1.0", "--coca-contrastive-loss-weight", "1.0"]
    shutil.rmtree(logs / name, ignore_errors=True)
    _, memory, wall = _run(cmd, work / f"{name}.stderr", dict(os.environ))
    text = (logs / name / "out.log").read_text()
    parsed = [tuple(float(x) for x in m.groups()) for m in _STEP_LINE.finditer(text)]
    timed = parsed[_warmup(row, args):]
    if not timed:
        raise RuntimeError(f"no step timings found in {logs / name / 'out.log'}")
    times = sorted(b for _, b, _ in timed)
    total = sum(times)
    val_line = next((ln for ln in text.splitlines() if "image_to_text_R@1" in ln), "")
    own_metric = {k: _field(val_line, key) for k, key in _OC_RECALLS.items()}
    checkpoint = logs / name / "checkpoints" / "epoch_1.pt"
    val = {k: None for k, _, _ in _RECALLS}
    if _evaluates(row, args):
        try:
            val = openclip_val_recall(checkpoint, openclip_model_dir(work, row == "coca"), val_shards, args.val)
        except Exception as exc:  # keep the timing figures of this run
            val["error"] = f"{type(exc).__name__}: {exc}"
    return {"side": "openclip", "row": row, "round": i, "samples_per_s": args.batch * len(times) / total,
            "step_p50_s": percentile(times, 50), "step_p90_s": percentile(times, 90),
            "data_wait_frac": sum(d for d, _, _ in timed) / total, "final_loss": parsed[-1][2],
            "val": val, "val_openclip_metric": own_metric, "wall_s": wall, **memory}


def openclip_val_recall(checkpoint: Path, model_dir: Path, val_shards: list[Path], limit: int) -> dict:
    """Retrieval of OpenCLIP's trained model scored by OUR function (``multi_caption_recall``, the one
    our trainer's evaluation uses: ties count against the pair). OpenCLIP's own printed figures rank
    by argsort, where tied scores (identical captions, frequent in synthetic data) fall in index
    order; they are kept as ``val_openclip_metric``. Its own val transform and tokenizer are used."""
    import open_clip
    import torch
    import webdataset as wds
    from PIL import Image

    from vlpretrain.eval.metrics import multi_caption_recall

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    images, texts = [], []
    for sample in wds.WebDataset([str(s) for s in val_shards], shardshuffle=False):
        images.append(preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
        texts.append(sample["txt"].decode("utf-8"))
        if len(images) == limit:
            break
    img_emb, txt_emb = [], []
    with torch.no_grad():
        for i in range(0, len(images), 100):
            img_emb.append(model.encode_image(torch.stack(images[i:i + 100]), normalize=True))
            txt_emb.append(model.encode_text(tokenizer(texts[i:i + 100]), normalize=True))
    recall = multi_caption_recall(torch.cat(img_emb), torch.cat(txt_emb), torch.arange(len(images)), ks=(1, 5))
    return {k: recall[f"{a}_r@{n}"] for k, a, n in _RECALLS}


def _field(line: str, key: str) -> float | None:
    m = re.search(re.escape(key) + r": ([\d.]+)", line)
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- main

def ratios(results: list[dict]) -> dict:
    out = {}
    for row in dict.fromkeys(r["row"] for r in results):
        side = {s: [r for r in results if r["row"] == row and r["side"] == s] for s in ("vlpretrain", "openclip")}
        if not all(side.values()):
            continue

        def med(s, key, sub=None, side=side):
            vals = [(r[key][sub] if sub else r[key]) for r in side[s]]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else None

        ours_sps, theirs_sps = med("vlpretrain", "samples_per_s"), med("openclip", "samples_per_s")
        out[row] = {"samples_per_s": {"vlpretrain": ours_sps, "openclip": theirs_sps, "ratio": ours_sps / theirs_sps},
                    "peak_rss_ratio": med("vlpretrain", "peak_rss_mb") / med("openclip", "peak_rss_mb"),
                    "peak_tree_rss_ratio": med("vlpretrain", "peak_tree_rss_mb") / med("openclip", "peak_tree_rss_mb"),
                    "val": {k: {"vlpretrain": med("vlpretrain", "val", k), "openclip": med("openclip", "val", k)}
                            for k, _, _ in _RECALLS},
                    "final_loss": {"vlpretrain": med("vlpretrain", "final_loss"), "openclip": med("openclip", "final_loss")}}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/compare_openclip", help="data, tokenizers, venv and logs")
    p.add_argument("--rows", default="fp32,fp32-sp,bf16,coca")
    p.add_argument("--rounds", type=int, default=2, help="ours/theirs pairs per row")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--bf16-steps", type=int, default=150, help="steps of the bf16 row (fewer on CPUs without bf16 units)")
    p.add_argument("--eval-min-steps", type=int, default=50, help="rows with fewer steps skip validation")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=10, help="learning-rate warmup")
    p.add_argument("--samples", type=int, default=9600, help="synthetic training samples")
    p.add_argument("--val", type=int, default=1000, help="validation samples")
    p.add_argument("--out", default=None, help="also write all results to this JSON file")
    args = p.parse_args(argv)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = ensure_openclip_venv(work / "openclip-venv")
    paths = prepare(work, args.samples, args.val)
    results = []
    for row in args.rows.split(","):
        config = our_config(work, row, paths, args)
        for i in range(args.rounds):
            first, second = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
            for side in (first, second):
                r = run_ours(work, row, config, args, i) if side == "ours" else run_theirs(work, row, python, paths, args, i)
                results.append(r)
                print(json.dumps(r), flush=True)
    summary = {"ratios": ratios(results), "args": vars(args), "cpu_threads": os.cpu_count()}
    print(json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": results, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
