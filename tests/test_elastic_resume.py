"""The data position across layouts: saved with N ranks x W workers, resumed with M x W' (ranks simulated by
one ShardStream per rank in this process), every sample of the epoch exactly once; the same layout continues
bit-exactly; a resume re-reads only the shards its saved shuffle buffers still hold samples from."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.data_helpers import NUM_TRAIN, data_config, make_stream, synth_corpus, take
from vlpretrain.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return load_tokenizer(corpus / "tokenizer")


ALL = Counter(f"train{i:08d}" for i in range(NUM_TRAIN))


def _streams(corpus, tokenizer, ranks: int, workers: int, buffer: int = 16):
    cfg = data_config(corpus, num_workers=workers, shuffle_buffer=buffer)
    return [make_stream(cfg, batch_size=4, rank=r, world_size=ranks, seed=5, tokenizer=tokenizer)
            for r in range(ranks)]


def _take_keys(stream, n: int) -> dict[int, list[str]]:
    """Keys of the next ``n`` batches by epoch (crossing into the next epoch like a step-counting trainer)."""
    out: dict[int, list[str]] = {}
    while n:
        epoch = stream.epoch
        for batch in stream:
            out.setdefault(epoch, []).extend(batch["keys"])
            n -= 1
            if not n:
                break
    return out


def _saved(streams) -> dict:
    """What the checkpoint writes: the gathered position, through JSON."""
    return json.loads(json.dumps(streams[0].gather_position([s.state_dict() for s in streams])))


@pytest.mark.parametrize("before, after, batches", [
    ((2, 0), (1, 0), [7, 16]),      # rank 1 finishes epoch 0 and starts epoch 1 before the save
    ((1, 2), (2, 1), [16]),         # 1 -> 2 ranks, 2 -> 1 workers each
    ((4, 0), (2, 2), [4, 3, 4, 3]),  # 4 -> 2 ranks, 0 -> 2 workers
])
def test_resume_on_another_layout_sees_every_sample_exactly_once(corpus, tokenizer, before, after, batches):
    old = _streams(corpus, tokenizer, *before)
    seen: dict[int, Counter] = {0: Counter(), 1: Counter()}
    for stream, n in zip(old, batches, strict=True):  # ~60% of epoch 0 in all
        for epoch, keys in _take_keys(stream, n).items():
            seen[epoch].update(keys)
    position = _saved(old)
    assert position["epoch"] == 0 and set(position["remaining"]) == {str(e) for e in {s.epoch for s in old}}
    new = _streams(corpus, tokenizer, *after)
    assert [s.load_position(position) for s in new] == ["redistributed"] * len(new)
    last = max(s.epoch for s in old)
    for stream in new:
        for epoch, keys in _take_keys(stream, 2).items():
            seen[epoch].update(keys)
    again = _saved(new)  # saved again in the new layout, partway through the redistributed remainder
    twins = _streams(corpus, tokenizer, *after)
    assert [s.load_position(again) for s in twins] == ["exact"] * len(twins)
    for stream, twin in zip(new, twins, strict=True):
        while stream.epoch <= last:  # the rest of every started epoch: the twin resumed from `again` is identical
            epoch = stream.epoch
            batches, twin_batches = list(stream), list(twin)
            assert [b["keys"] for b in batches] == [b["keys"] for b in twin_batches] and twin.epoch == stream.epoch
            seen[epoch].update(k for batch in batches for k in batch["keys"])
    for epoch in range(last + 1):
        assert seen[epoch] == ALL, f"epoch {epoch}: repeated {+(seen[epoch] - ALL)}, missing {+(ALL - seen[epoch])}"
    fresh = _streams(corpus, tokenizer, *after)  # later epochs: planned as usual for the new layout
    for stream, twin in zip(new, fresh, strict=True):
        twin.set_epoch(last + 1)
        assert [b["keys"] for b in take(stream, 2)] == [b["keys"] for b in take(twin, 2)]


def test_the_same_layout_continues_bit_exactly_on_every_rank(corpus, tokenizer):
    unbroken = [take(s, 14) for s in _streams(corpus, tokenizer, 2, 0)]  # 12-13 batches per rank per epoch
    stopped = _streams(corpus, tokenizer, 2, 0)
    for stream, n in zip(stopped, [5, 8], strict=True):
        take(stream, n)
    position = _saved(stopped)
    resumed = _streams(corpus, tokenizer, 2, 0)
    assert [s.load_position(position) for s in resumed] == ["exact", "exact"]
    for rank, (stream, n) in enumerate(zip(resumed, [5, 8], strict=True)):
        for want, got in zip(unbroken[rank][n:], take(stream, 14 - n), strict=True):
            assert want["keys"] == got["keys"]
            assert torch.equal(want["pixel_values"], got["pixel_values"])
            assert torch.equal(want["input_ids"], got["input_ids"])


def test_resampled_mode_continues_exactly_in_its_layout_and_draws_afresh_in_another(corpus, tokenizer):
    cfg = data_config(corpus, num_workers=2, shuffle_buffer=16, mode="resampled")
    unbroken = take(make_stream(cfg, batch_size=4, seed=5, tokenizer=tokenizer), 9)
    stopped = make_stream(cfg, batch_size=4, seed=5, tokenizer=tokenizer)
    take(stopped, 6)
    position = _saved([stopped])
    assert position["remaining"] == {}  # draws with replacement: nothing is owed to a new layout
    same = make_stream(cfg, batch_size=4, seed=5, tokenizer=tokenizer)
    assert same.load_position(position) == "exact"
    assert [b["keys"] for b in take(same, 3)] == [b["keys"] for b in unbroken[6:]]
    other = make_stream(data_config(corpus, num_workers=1, shuffle_buffer=16, mode="resampled"), batch_size=4,
                        rank=1, world_size=2, seed=5, tokenizer=tokenizer)
    assert other.load_position(position) == "redistributed" and other.epoch == stopped.epoch + 1
    assert all(len(b["keys"]) == 4 for b in take(other, 3))


def test_a_resume_with_another_shard_list_is_refused_before_anything_is_written(synth_root, tmp_path,
                                                                              fresh_accelerate_state):
    from tests.helpers import train_overrides
    from vlpretrain.config import ConfigError, load_config
    from vlpretrain.train.loop import train

    run_dir = tmp_path / "run"
    common = ["train.steps=2", "train.ckpt_every=2", "train.export=false", "data.val=null"]
    train(load_config(None, train_overrides(synth_root, run_dir, *common)))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    fewer = f"{synth_root}/train/shard-0000{{00..05}}.tar"
    saved = len(list((synth_root / "train").glob("*.tar")))
    with pytest.raises(ConfigError, match=rf"data spec changed: the shard list \(saved: {saved} shards.*now: 6 shards.*Fix"):
        train(load_config(None, train_overrides(synth_root, run_dir, *common, "train.steps=4", "train.resume=auto",
                                                f"data.train={fewer}")))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def _count_bytes(monkeypatch, log: Path) -> None:
    """Every shard opened from here on (in this process or its forked workers) appends ``name bytes`` to
    ``log`` when closed."""
    import importlib

    module = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name
    original = module.gopen

    class Counting:
        def __init__(self, stream, url):
            self.stream, self.url, self.n = stream, url, 0

        def read(self, n=-1):
            data = self.stream.read(n)
            self.n += len(data)
            return data

        def seekable(self):
            return self.stream.seekable()

        def seek(self, *args):
            return self.stream.seek(*args)

        def tell(self):
            return self.stream.tell()

        def close(self):
            with open(log, "a") as f:
                f.write(f"{Path(self.url).name} {self.n}\n")
            self.stream.close()

    monkeypatch.setattr(module, "gopen", lambda url, mode="rb", **kw: Counting(original(url, mode, **kw), url))


def _bytes_read(log: Path) -> Counter:
    out: Counter = Counter()
    for line in log.read_text().splitlines() if log.is_file() else []:
        name, n = line.split()
        out[name] += int(n)
    return out


@pytest.mark.parametrize("after", [(1, 2), (1, 1)], ids=["exact", "redistributed"])
def test_resume_at_80_percent_rereads_only_the_shards_its_buffers_hold(corpus, tokenizer, tmp_path, monkeypatch,
                                                                      after):
    stopped = _streams(corpus, tokenizer, 1, 2, buffer=8)  # smaller than a shard (10), as in real setups
    read_before = take(stopped[0], 19)  # 76 of 96 samples
    position = _saved(stopped)
    urls = stopped[0].dataset.urls
    tasks = [t for w in position["exact"]["ranks"][0]["workers"] for t in w["tasks"]]
    started = {Path(urls[s]).name for s, start, keep in tasks if start != 0 or keep}
    unstarted = {Path(urls[s]).name for s, start, keep in tasks if start == 0 and not keep}
    finished = {Path(u).name for u in urls} - started - unstarted
    assert started and len(started) < len(started | finished)
    log = tmp_path / "reads.log"
    _count_bytes(monkeypatch, log)
    resumed = _streams(corpus, tokenizer, *after, buffer=8)[0]
    assert resumed.load_position(position) == ("exact" if after == (1, 2) else "redistributed")
    keys = [k for batch in resumed for k in batch["keys"]]
    assert Counter(keys) + Counter(k for b in read_before for k in b["keys"]) == ALL
    read = _bytes_read(log)
    sizes = {Path(u).name: Path(u).stat().st_size for u in urls}
    assert not set(read) & finished, f"finished shards were read again: {set(read) & finished}"
    assert set(read) <= started | unstarted
    for name in unstarted:
        assert read[name] == sizes[name]  # read once, as in any epoch
    reread = sum(read[name] for name in started)
    so_far = sum(sizes[name] for name in finished | started)
    print(f"resume at 76/96 samples: re-read {reread} bytes of {len(started)} in-flight shard(s) "
          f"(the epoch so far: {so_far} bytes in {len(finished | started)} shards)")
    assert reread <= sum(sizes[name] for name in started) < so_far


# -- the trainer: 1 process saved, 2 processes resume (accelerate launch, DDP on CPU) --------------------------


@pytest.mark.slow
def test_trainer_saved_by_1_process_resumes_on_2_and_trains_on_the_rest_of_the_epoch(synth_root, tmp_path, monkeypatch,
                                                                                    fresh_accelerate_state):
    import subprocess
    import sys

    from tests.helpers import train_overrides
    from tests.test_train_processes import ENV, finish, write_config
    from vlpretrain.config import load_config
    from vlpretrain.data.shards import RECORD_KEYS_ENV
    from vlpretrain.data.synthetic import synthesize
    from vlpretrain.train.loop import train

    data = tmp_path / "data"  # one epoch = 8 shards x 12 = 96 samples = 6 steps of 16
    synthesize(data, 96, image_size=32, seed=3, samples_per_shard=12, num_val=1)
    common = ["train.steps=8", "train.ckpt_every=4", "train.keep_last=3", "data.num_workers=2",
              "data.shuffle_buffer=16", f"data.train={data}/train", "data.val=null", "train.export=false",
              "optim.warmup_steps=3", "objectives=[{name: contrastive}]"]
    env = {**ENV, RECORD_KEYS_ENV: "1"}
    monkeypatch.setenv(RECORD_KEYS_ENV, "1")
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    assert train(load_config(None, train_overrides(synth_root, one_dir, *common)))["world_size"] == 1  # in-process
    two = write_config(tmp_path / "two.yaml", train_overrides(
        synth_root, two_dir, *common, f"train.resume={one_dir}/checkpoints/step_4"))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "vlpretrain.train", "--config", str(two)]
    out = finish(subprocess.Popen(launch, env={**env, "ACCELERATE_USE_CPU": "true"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
    assert json.loads((two_dir / "summary.json").read_text())["world_size"] == 2
    assert "data position of step_4: redistributed (2 process(es))" in out
    assert "holds no RNG state for rank 1" in out  # seeded explicitly, not left as it was

    def logged(run_dir):
        return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    a, b = logged(one_dir), logged(two_dir)
    assert sorted(b) == list(range(5, 9))  # the step counter continues
    assert [b[s]["lr"] for s in b] == pytest.approx([a[s]["lr"] for s in b], rel=1e-6)  # and the LR schedule
    assert b[8]["samples_seen"] == a[8]["samples_seen"] == 128
    position = json.loads((two_dir / "checkpoints" / "step_8" / "data_state.json").read_text())
    epoch0 = Counter(position["keys"]["0"])  # every key delivered to the trainer (trained, or a dropped tail)
    want = Counter(f"train{i:08d}" for i in range(96))
    assert epoch0 == want, f"repeated {+(epoch0 - want)}, missing {+(want - epoch0)}"
    assert all(n == 1 for n in Counter(position["keys"].get("1", [])).values())  # epoch 1 begun: no repeats
