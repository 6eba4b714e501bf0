"""The shard stream: bad samples skipped and counted exactly, rank/worker splitting, start-up check,
exact resume in a new process, remote (http, pipe) shards equal local ones, resampled weights."""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tests.data_helpers import (
    NUM_TRAIN,
    data_config,
    jpeg_bytes,
    make_stream,
    png_bytes,
    run_python,
    tar_bytes,
    synth_corpus,
    take,
)
from vlpretrain.config import ConfigError
from vlpretrain.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synth_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return load_tokenizer(corpus / "tokenizer")


def _train_keys(corpus) -> set[str]:
    return {f"train{i:08d}" for i in range(NUM_TRAIN)}


# -- broken shards -----------------------------------------------------------------------------------


def _tar(path, members: list[tuple[str, bytes]], cut: int | None = None) -> None:
    data = tar_bytes(members)
    path.write_bytes(data[:cut] if cut else data)


def _good(key: str, image: bytes, ext: str = "jpg") -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", image), (f"{key}.txt", f"caption of {key}".encode())]


def _modes() -> dict[str, bytes]:
    """Good images in every mode the decoder must turn into RGB."""
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    palette = Image.new("P", (32, 32), 3)
    grey16 = Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16))
    return {"rgba": png_bytes(rgba), "pal": png_bytes(palette), "la": png_bytes(Image.new("LA", (32, 32))),
            "grey": jpeg_bytes(mode="L", color=90), "cmyk": jpeg_bytes(mode="CMYK", color=(0, 200, 200, 0)),
            "i16": png_bytes(grey16)}


def test_broken_shards_yield_exactly_the_good_samples_with_exact_counts(tmp_path, tokenizer):
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="JPEG")
    big = big.getvalue()  # header says 128x128 > max_image_pixels; the pixel data is cut off below
    a = tmp_path / "a.tar"
    _tar(a, _good("g0", jpeg_bytes()) + _good("g1", jpeg_bytes())
         + [("junk.jpg", b"not an image"), ("junk.txt", b"undecodable")]
         + [("noimg.txt", b"only a caption")]
         + [("nocap.jpg", jpeg_bytes())]
         + [("blank.jpg", jpeg_bytes()), ("blank.txt", b"  \n ")]
         + [("latin.jpg", jpeg_bytes()), ("latin.txt", "caf\xe9".encode("latin-1"))]
         + [("huge.jpg", big[:big.index(b"\xff\xda") + 100]), ("huge.txt", b"header: 128x128, data cut")]
         + [("badjson.jpg", jpeg_bytes()), ("badjson.json", b"{not json")]
         + _good("g0", jpeg_bytes()))  # duplicate key
    b = tmp_path / "b.tar"
    good_b = _good("g2", jpeg_bytes()) + _good("g3", jpeg_bytes())
    _tar(b, good_b + _good("g4", jpeg_bytes(size=(64, 64))))
    with tarfile.open(b) as tar:
        cut = tar.getmember("g4.jpg").offset_data + 100  # inside g4's image
    _tar(b, good_b + _good("g4", jpeg_bytes(size=(64, 64))), cut=cut)
    c = tmp_path / "c.tar"
    c.write_bytes(b"this is not a tar file at all" * 40)
    d = tmp_path / "d.tar"
    members = [m for key, img in _modes().items() for m in _good(key, img, "png" if img[:4] == b"\x89PNG" else "jpg")]
    multi = [("multi.jpg", jpeg_bytes()), ("multi.json", json.dumps({"captions": ["", "one", "two"]}).encode())]
    _tar(d, members + multi)

    cfg = data_config(tmp_path, train=f"{a}::{b}::{c}::{d}", num_workers=2, max_image_pixels=64 * 64)
    stream = make_stream(cfg, batch_size=3, tokenizer=tokenizer)
    batches = list(stream)
    keys = [k for batch in batches for k in batch["keys"]]
    assert sorted(keys) == sorted(["g0", "g1", "g2", "g3", *_modes(), "multi"])
    assert stream.skipped_by_reason() == {
        "undecodable_image": 1, "missing_image": 1, "missing_caption": 1, "empty_caption": 1,
        "caption_not_utf8": 1, "image_too_large": 1, "bad_json": 1, "duplicate_key": 1,
        "truncated_tar": 1, "unreadable_shard": 1}
    assert stream.skipped_by_shard[str(b)] == {"truncated_tar": 1}
    assert stream.skipped_by_shard[str(c)] == {"unreadable_shard": 1}
    assert len(stream.skipped_by_shard[str(a)]) == 8
    reported = sum(sum(batch["skipped"].values()) for batch in batches)
    assert 0 < reported <= 10  # per-batch deltas reach the main process with the batches
    for batch in batches:
        assert batch["pixel_values"].shape[1:] == (3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert torch.isfinite(batch["pixel_values"]).all()


def test_bad_data_everywhere_is_an_error_not_an_empty_loop(tmp_path, tokenizer):
    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    stream = make_stream(data_config(tmp_path, train=str(tmp_path / "x.tar"), num_workers=0), tokenizer=tokenizer)
    with pytest.raises(RuntimeError, match="unreadable_shard"):
        list(stream)


def test_missing_local_shard_is_named_at_start(tmp_path, tokenizer):
    cfg = data_config(tmp_path, train=str(tmp_path / "shard-{000..003}.tar"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="4 of 4 shards"):
        make_stream(cfg, tokenizer=tokenizer)


# -- ranks, workers, epochs -----------------------------------------------------------------------------


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(corpus, tokenizer):
    cfg = data_config(corpus, num_workers=2, shuffle_buffer=16)
    streams = [make_stream(cfg, rank=r, world_size=2, tokenizer=tokenizer) for r in range(2)]
    orders = []
    for _ in range(2):  # epochs 0 and 1
        per_rank = [[k for batch in s for k in batch["keys"]] for s in streams]
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == NUM_TRAIN and set(seen) == _train_keys(corpus)
        orders.append(seen)
    assert [s.epoch for s in streams] == [2, 2]
    assert orders[0] != orders[1]
    assert set(orders[0][:10]) != set(orders[1][:10])  # not just a rotation: shards reshuffled


def test_too_few_shards_fail_fast_with_the_numbers(corpus, tokenizer):
    cfg = data_config(corpus, num_workers=4)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        make_stream(cfg, world_size=4, tokenizer=tokenizer)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "10 shard(s)" in message and "16 readers" in message and "resampled" in message
    make_stream(data_config(corpus, num_workers=4, mode="resampled"), world_size=4, tokenizer=tokenizer)


def test_captions_drawn_per_visit_and_padded_to_the_batch(corpus, tokenizer):
    stream = make_stream(data_config(corpus, num_workers=0, shuffle_buffer=0), batch_size=16, tokenizer=tokenizer)
    captions: dict[str, set] = {}
    for _ in range(2):  # two epochs: each visit draws one of the sample's captions
        for batch in stream:
            lengths = batch["attention_mask"].sum(1)
            assert batch["input_ids"].shape[1] == int(lengths.max()) <= 32  # longest in batch, capped
            assert (batch["input_ids"][:, 0] == 1).all()
            assert (batch["input_ids"][torch.arange(len(lengths)), lengths - 1] == 2).all()
            for key, row, n in zip(batch["keys"], batch["input_ids"], lengths, strict=True):
                captions.setdefault(key, set()).add(tuple(row[:n].tolist()))
    assert len(captions) == NUM_TRAIN
    assert sum(len(c) > 1 for c in captions.values()) > NUM_TRAIN // 4


def test_first_caption_mode_trains_on_the_txt_caption_with_the_same_crops(corpus, tokenizer):
    from vlpretrain.data.reader import SkipCounter, expand_sources, iter_shard
    from vlpretrain.data.tokenizer import encode_captions

    first = {}  # key -> token ids of its first caption (the .txt one)
    for url in expand_sources(str(corpus / "train"))[0]:
        for sample in iter_shard(url, SkipCounter()):
            ids = encode_captions(tokenizer, [sample.captions[0]], 32)["input_ids"][0]
            first[sample.key] = tuple(ids.tolist())
    runs = {mode: take(make_stream(data_config(corpus, num_workers=2, captions=mode), batch_size=16,
                                   tokenizer=tokenizer), 6) for mode in ("first", "random")}
    differs = 0
    for b_first, b_random in zip(runs["first"], runs["random"], strict=True):
        assert b_first["keys"] == b_random["keys"]
        assert torch.equal(b_first["pixel_values"], b_random["pixel_values"])  # same crops either way
        for key, row, n in zip(b_first["keys"], b_first["input_ids"], b_first["attention_mask"].sum(1), strict=True):
            assert tuple(row[:n].tolist()) == first[key]
        differs += not torch.equal(b_first["input_ids"], b_random["input_ids"])
    assert differs > 0  # the corpus has several captions per sample: random mode does draw others


def test_uint8_batches_normalised_by_the_consumer_equal_the_workers_floats(corpus, tokenizer):
    """``normalize=False`` (the trainer's stream): the same samples and crops as uint8, and
    ``stream.normalize`` (run on the trainer's device) gives exactly the floats the workers make."""
    from vlpretrain.train.loop import _to_device

    cfg = data_config(corpus, num_workers=2)
    floats = take(make_stream(cfg, batch_size=16, tokenizer=tokenizer), 4)
    raw = make_stream(cfg, batch_size=16, tokenizer=tokenizer, normalize=False)
    for want, got in zip(floats, take(raw, 4), strict=True):
        assert got["keys"] == want["keys"] and torch.equal(got["input_ids"], want["input_ids"])
        assert got["pixel_values"].dtype == torch.uint8 and want["pixel_values"].dtype == torch.float32
        assert len(set(got["pixel_values"].flatten().tolist())) > 16  # real pixels, not a constant
        on_device = _to_device(got, "cpu", raw.normalize)
        assert on_device["pixel_values"].dtype == torch.float32
        assert torch.equal(on_device["pixel_values"], want["pixel_values"])


def test_worker_views_leave_the_clean_batch_as_it_was_and_reach_the_device_normalised(corpus, tokenizer):
    """Views declared to the stream come in ``batch["views"]`` from the workers; the clean pixels, captions and
    keys equal the stream's without views (the views' crops draw from their own seeds), and ``_to_device``
    normalises the views with the stream's normalisation. A view larger than the image is refused up front."""
    from vlpretrain.data.views import ViewSpec
    from vlpretrain.train.loop import _to_device

    cfg = data_config(corpus, num_workers=2)
    views = {"local": ViewSpec(3, 16, (0.1, 0.4)), "global": ViewSpec(1, 32, (0.5, 1.0))}
    plain = take(make_stream(cfg, batch_size=8, tokenizer=tokenizer, normalize=False), 3)
    stream = make_stream(cfg, batch_size=8, tokenizer=tokenizer, normalize=False, views=views)
    assert stream.views
    with_views = take(stream, 3)
    for want, got in zip(plain, with_views, strict=True):
        assert "views" not in want and got["keys"] == want["keys"]
        assert torch.equal(got["pixel_values"], want["pixel_values"]) and torch.equal(got["input_ids"], want["input_ids"])
        assert got["views"]["local"].shape == (8, 3, 3, 16, 16) and got["views"]["global"].shape == (8, 1, 3, 32, 32)
        assert got["views"]["local"].dtype == torch.uint8
        assert not torch.equal(got["views"]["local"][:, 0], got["views"]["local"][:, 1])  # different crops
        on_device = _to_device(got, "cpu", stream.normalize)
        assert torch.equal(on_device["views"]["local"], stream.normalize(got["views"]["local"]))
    again = take(make_stream(cfg, batch_size=8, tokenizer=tokenizer, normalize=False, views=views), 1)[0]
    assert torch.equal(again["views"]["local"], with_views[0]["views"]["local"])  # a sample's views follow its seed
    with pytest.raises(ValueError, match="view 'big'"):
        make_stream(cfg, tokenizer=tokenizer, views={"big": ViewSpec(1, 64, (0.5, 1.0))})
    device = make_stream(data_config(corpus, num_workers=0, decode="device"), tokenizer=tokenizer, normalize=False,
                         views=views)  # the workers decode nothing: no views from them (the trainer says so)
    assert not device.views and "views" not in take(device, 1)[0]


def _one_epoch_by_key(streams) -> dict[str, tuple]:
    """key -> (uint8 pixels, caption tokens, local views, sample seed) over one epoch of every stream."""
    out = {}
    for stream in streams:
        for batch in stream:
            for b, key in enumerate(batch["keys"]):
                caption = batch["input_ids"][b][batch["attention_mask"][b].bool()]
                out[key] = (batch["pixel_values"][b], caption, batch["views"]["local"][b], int(batch["sample_seed"][b]))
    return out


def test_a_samples_caption_crop_views_and_seed_follow_its_key_not_the_layout(corpus, tokenizer):
    """One rank without workers, and two ranks of two workers with other batch and buffer sizes: each sample gets
    the same caption, crop, views and sample_seed (what the trainer's per-sample draws start from) in both, and
    other ones in the next epoch. Resampled mode also mixes in the layout position (a sample may recur)."""
    from vlpretrain.data.shards import sample_rng
    from vlpretrain.data.views import ViewSpec

    views = {"local": ViewSpec(2, 16, (0.1, 0.4))}
    one_stream = make_stream(data_config(corpus, num_workers=0, shuffle_buffer=16), batch_size=8, tokenizer=tokenizer,
                             normalize=False, views=views)
    one = _one_epoch_by_key([one_stream])
    two = _one_epoch_by_key([make_stream(data_config(corpus, num_workers=2, shuffle_buffer=4), batch_size=5,
                                         rank=r, world_size=2, tokenizer=tokenizer, normalize=False, views=views)
                             for r in range(2)])
    assert one.keys() == two.keys() == _train_keys(corpus)
    for key, (pixels, caption, local, seed) in one.items():
        assert torch.equal(pixels, two[key][0]) and torch.equal(caption, two[key][1]), key
        assert torch.equal(local, two[key][2]) and seed == two[key][3], key
    assert len({v[3] for v in one.values()}) == NUM_TRAIN  # every sample its own seed
    next_epoch = _one_epoch_by_key([one_stream])
    assert sum(next_epoch[k][3] != one[k][3] for k in one) == NUM_TRAIN
    assert sum(not torch.equal(next_epoch[k][0], one[k][0]) for k in one) > NUM_TRAIN * 3 // 4  # new crops
    draw = [int(sample_rng(0, 0, "train00000001", layout).integers(2**62)) for layout in [(), (0, 0, 5), (0, 0, 6)]]
    assert len(set(draw)) == 3


def test_resampled_mode_follows_source_weights_and_never_ends(corpus, tokenizer):
    shards = sorted(str(p) for p in (corpus / "train").glob("*.tar"))
    spec = f"{'::'.join([shards[0], shards[1]])}"
    cfg = data_config(corpus, train=spec, mode="resampled", train_weights=[0.0, 1.0], num_workers=0)
    stream = make_stream(cfg, tokenizer=tokenizer)
    batches = take(stream, 8)  # 2 shards drawn per "epoch" -> 2 full batches of 8: several epochs
    keys = {k for b in batches for k in b["keys"]}
    assert keys == {f"train{i:08d}" for i in range(10, 20)} and stream.epoch >= 3
    assert all(len(b["keys"]) == 8 for b in batches)


# -- resume ----------------------------------------------------------------------------------------------

RESUME_SCRIPT = """
import json, sys, torch
from tests.data_helpers import data_config, make_stream, take
from pathlib import Path
root, state_file, n, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
stream = make_stream(data_config(root, num_workers=2, shuffle_buffer=16), batch_size=8, seed=7)
assert stream.load_position(json.loads(Path(state_file).read_text())) == "exact"
torch.save([{k: b[k] for k in ("keys", "pixel_values", "input_ids")} for b in take(stream, n)], out)
"""


def test_resume_in_a_new_process_continues_the_unbroken_stream(corpus, tokenizer, tmp_path):
    cfg = data_config(corpus, num_workers=2, shuffle_buffer=16)
    unbroken = take(make_stream(cfg, batch_size=8, seed=7, tokenizer=tokenizer), 17)  # 13 batches per epoch
    stopped = make_stream(cfg, batch_size=8, seed=7, tokenizer=tokenizer)
    take(stopped, 10)  # stop mid-epoch; the tail of an epoch has workers finishing unevenly
    position = stopped.gather_position([stopped.state_dict()])
    (tmp_path / "state.json").write_text(json.dumps(position))
    result = run_python(RESUME_SCRIPT, str(corpus), str(tmp_path / "state.json"), "7", str(tmp_path / "out.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(tmp_path / "out.pt")
    for want, got in zip(unbroken[10:], resumed, strict=True):
        assert want["keys"] == got["keys"]
        assert torch.equal(want["pixel_values"], got["pixel_values"])
        assert torch.equal(want["input_ids"], got["input_ids"])
    other = make_stream(cfg, batch_size=8, seed=8, tokenizer=tokenizer)  # a different data spec: refused
    with pytest.raises(ConfigError, match=r"data spec changed: run.seed \(saved 7, now 8\).*Fix: resume with"):
        other.load_position(position)
    fewer = make_stream(data_config(corpus, train=str(corpus / "train" / "shard-00000{0..8}.tar")), tokenizer=tokenizer,
                        seed=7)
    with pytest.raises(ConfigError, match=r"the shard list \(saved: 10 shards.*now: 9 shards"):
        fewer.load_position(position)


# -- remote shards -----------------------------------------------------------------------------------


@pytest.fixture()
def http_server(corpus):
    handler = functools.partial(_QuietHandler, directory=str(corpus / "train"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_and_pipe_shards_equal_local_shards(corpus, tokenizer, http_server):
    pattern = "shard-{000000..000009}.tar"
    specs = [str(corpus / "train" / pattern), f"{http_server}/{pattern}", f"pipe:cat {corpus / 'train'}/{pattern}"]
    streams = [make_stream(data_config(corpus, train=spec, num_workers=2, shuffle_buffer=16), seed=3,
                           tokenizer=tokenizer) for spec in specs]
    local, remote, piped = ([b for b in s] for s in streams)
    assert sum(len(b["keys"]) for b in local) == NUM_TRAIN
    for a, b, c in zip(local, remote, piped, strict=True):
        assert a["keys"] == b["keys"] == c["keys"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["pixel_values"], c["pixel_values"])
    assert streams[1].skipped_by_reason() == {}


@pytest.mark.parametrize("priority", ["idle", "low", "normal"])
def test_worker_priority_is_applied_in_the_worker_process(priority):
    import multiprocessing
    import os

    from vlpretrain.data.shards import set_worker_priority

    def probe(queue):
        before = os.nice(0)
        set_worker_priority(priority)
        queue.put((os.sched_getscheduler(0), os.nice(0) - before, before))

    queue = multiprocessing.get_context("fork").Queue()
    worker = multiprocessing.get_context("fork").Process(target=probe, args=(queue,))
    worker.start()
    policy, added_nice, start = queue.get(timeout=30)
    worker.join()
    low = min(10, 19 - start)  # niceness stops at 19
    want = {"idle": (os.SCHED_IDLE, 0), "low": (os.SCHED_OTHER, low), "normal": (os.SCHED_OTHER, 0)}[priority]
    assert (policy, added_nice) == want
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the trainer itself is untouched
