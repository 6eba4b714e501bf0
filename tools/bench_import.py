"""Start-up wall times: `import vlpretrain`, `vlpretrain --help`, the model class; transformers' for reference.

Each command runs in a fresh interpreter, the three interleaved, best of ``--repeats``; prints one JSON line.
Run from the checkout: ``PYTHONPATH=$PWD python tools/bench_import.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

COMMANDS = {
    "import_transformers": [sys.executable, "-c", "import transformers"],
    "import_vlpretrain": [sys.executable, "-c", "import vlpretrain"],
    "help": [sys.executable, "-m", "vlpretrain.cli", "--help"],
    "load_clipmodel_class": [sys.executable, "-c", "from transformers import CLIPModel"],
    "load_vlmodel_class": [sys.executable, "-c", "from vlpretrain import VLModel"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    best = {name: float("inf") for name in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():  # interleaved: a busy moment hits all three alike
            start = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            best[name] = min(best[name], time.perf_counter() - start)
    best = {k: round(v, 3) for k, v in best.items()}
    best["vlpretrain_minus_transformers"] = round(best["import_vlpretrain"] - best["import_transformers"], 3)
    print(json.dumps(best))


if __name__ == "__main__":
    main()
