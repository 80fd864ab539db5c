"""Data room: pairwise / ranked datasets, preprocessing, collator, bad data, latent + text cache."""

from __future__ import annotations

import io
import json
import logging
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.data import (
    CachedDataset,
    CacheMismatchError,
    DataError,
    ImageTransform,
    PairwiseDataset,
    RankedDataset,
    build_cache,
    collate_groups,
    load_preference_dataset,
    rows_for_rank,
    shards_for_rank,
)
from diffalign.data.cache import num_shards_for, shard_name

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def png(color=RED, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def split_png(size=(32, 16)) -> bytes:
    """Left half red, right half blue: shows flips and crops."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:, : size[0] // 2] = RED
    array[:, size[0] // 2 :] = BLUE
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pairwise_table(labels=(1.0, 0.0, 0.5, 1.0), corrupt_row=None) -> pa.Table:
    n = len(labels)
    jpg_0 = [png(RED) for _ in range(n)]
    jpg_1 = [png(BLUE) for _ in range(n)]
    if corrupt_row is not None:
        jpg_1[corrupt_row] = png(BLUE)[:40]  # truncated PNG
    return pa.table(
        {
            "caption": [f"prompt {i}" for i in range(n)],
            "jpg_0": pa.array(jpg_0, pa.binary()),
            "jpg_1": pa.array(jpg_1, pa.binary()),
            "label_0": pa.array(labels, pa.float64()),
            "user_id": pa.array([100 + i for i in range(n)], pa.int64()),
        }
    )


def ranked_table(n=4, k=3, phi=None, ks=None) -> pa.Table:
    colors = [RED, GREEN, BLUE, WHITE, (9, 9, 9)]
    ks = ks or [k] * n
    phi = phi or [[round(1 - j / (kk - 1), 3) for j in range(kk)] for kk in ks]
    return pa.table(
        {
            "prompt": [f"a photo of {i}" for i in range(n)],
            "prompt_id": [f"p{i}" for i in range(n)],
            "images": pa.array([[png(colors[j % 5]) for j in range(kk)] for kk in ks], pa.list_(pa.binary())),
            "generator_ids": [["tiny"] * kk for kk in ks],
            "seeds": pa.array([list(range(kk)) for kk in ks], pa.list_(pa.int64())),
            "reward_names": [["r1", "r2"] for _ in ks],
            "scores": pa.array([[[0.1 * j for j in range(kk)]] * 2 for kk in ks], pa.list_(pa.list_(pa.float32()))),
            "phi": pa.array(phi, pa.list_(pa.float32())),
            "rank": pa.array([list(range(1, kk + 1)) for kk in ks], pa.list_(pa.int32())),
        }
    )


def write(table: pa.Table, path) -> str:
    pq.write_table(table, str(path))
    return str(path)


def color_of(pixels: torch.Tensor) -> tuple:
    """Mean RGB (0..255) of a [-1, 1] image."""
    return tuple(int(round(v)) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


@pytest.fixture
def hf_cache(tmp_path):
    return str(tmp_path / "hf")


# ---- pairwise -------------------------------------------------------------------------------------------------
def test_pairwise_preferred_first_and_ties_dropped(tmp_path, hf_cache, caplog):
    path = write(pairwise_table(), tmp_path / "pairs.parquet")
    with caplog.at_level(logging.INFO, logger="diffalign.data"):
        ds = PairwiseDataset(path, resolution=16, cache_dir=hf_cache)
    assert "dropped 1 tied pairs" in caplog.text
    assert ds.dropped_ties == 1 and len(ds) == 3 and ds.skipped_rows == 0
    assert [int(r) for r in ds.rows] == [0, 1, 3]
    first, swapped = ds[0], ds[1]
    assert first["scores"].tolist() == [1.0, 0.0] and swapped["scores"].tolist() == [1.0, 0.0]
    assert color_of(first["pixel_values"][0]) == RED and color_of(first["pixel_values"][1]) == BLUE
    # label_0 == 0: jpg_1 (blue) was preferred, so it moves to column 0
    assert color_of(swapped["pixel_values"][0]) == BLUE and color_of(swapped["pixel_values"][1]) == RED
    assert swapped["prompt"] == "prompt 1" and swapped["user_id"] == "101"
    assert len(swapped["prompt_id"]) == 16 and swapped["prompt_id"] != first["prompt_id"]


def test_pairwise_keep_ties(tmp_path, hf_cache):
    ds = PairwiseDataset(write(pairwise_table(), tmp_path / "p.parquet"), resolution=16, keep_ties=True, cache_dir=hf_cache)
    assert len(ds) == 4 and ds.dropped_ties == 0
    tie = ds[2]
    assert tie["scores"].tolist() == [0.5, 0.5]
    assert color_of(tie["pixel_values"][0]) == RED  # stored order kept


def test_sources_folder_disk_and_in_memory(tmp_path, hf_cache):
    import datasets

    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    table = pairwise_table(labels=(1.0, 0.0, 1.0, 0.0))
    write(table.slice(0, 2), folder / "data-00000-of-00002.parquet")
    write(table.slice(2, 2), folder / "sub" / "data-00001-of-00002.parquet")
    from_folder = PairwiseDataset(folder, resolution=16, cache_dir=hf_cache)
    assert len(from_folder) == 4 and from_folder[3]["prompt"] == "prompt 3"

    hf = datasets.Dataset(table)
    datasets.DatasetDict({"train": hf, "test": hf.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(PairwiseDataset(tmp_path / "dd", resolution=16, split="test")) == 1
    hf.save_to_disk(str(tmp_path / "single"))
    auto = load_preference_dataset(tmp_path / "single", resolution=16)
    assert isinstance(auto, PairwiseDataset) and auto.source.endswith("single") and len(auto) == 4
    assert len(PairwiseDataset(hf, resolution=16)) == 4
    with pytest.raises(DataError, match="no split 'validation'"):
        PairwiseDataset(tmp_path / "dd", resolution=16, split="validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PairwiseDataset(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        PairwiseDataset(tmp_path / "empty")


def test_hub_id_goes_to_load_dataset(monkeypatch):
    """A non-existent 'owner/name' is a hub id: handed to datasets.load_dataset with the split (mocked: no network)."""
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split))
        return datasets.Dataset(pairwise_table())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = PairwiseDataset("someone/pickapic_v2", resolution=8, split="validation_unique")
    assert calls == [("someone/pickapic_v2", "validation_unique")] and len(ds) == 3


def test_image_feature_columns(tmp_path):
    """Columns typed datasets.Image() (struct {bytes, path}) decode like raw bytes."""
    import datasets

    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64")})
    hf = datasets.Dataset.from_dict({"caption": ["x"], "jpg_0": [{"bytes": png(GREEN), "path": None}],
                                     "jpg_1": [{"bytes": png(BLUE), "path": None}], "label_0": [0.0]}, features=features)
    item = PairwiseDataset(hf, resolution=8)[0]
    assert color_of(item["pixel_values"][0]) == BLUE and color_of(item["pixel_values"][1]) == GREEN


# ---- ranked ---------------------------------------------------------------------------------------------------
def test_ranked_groups_keep_order_and_phi(tmp_path, hf_cache):
    ds = load_preference_dataset(write(ranked_table(), tmp_path / "r.parquet"), resolution=16, cache_dir=hf_cache)
    assert isinstance(ds, RankedDataset) and ds.k == 3 and len(ds) == 4
    item = ds[1]
    assert item["pixel_values"].shape == (3, 3, 16, 16)
    assert torch.allclose(item["scores"], torch.tensor([1.0, 0.5, 0.0]))
    assert [color_of(p) for p in item["pixel_values"]] == [RED, GREEN, BLUE]
    assert item["prompt_id"] == "p1" and item["user_id"] is None
    assert item["reward_names"] == ["r1", "r2"] and len(item["reward_scores"][0]) == 3


def test_ranked_all_tied_lists_dropped_and_counted(tmp_path, hf_cache, caplog):
    phi = [[1.0, 0.5, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]  # rows 1 and 3 rank nothing
    path = write(ranked_table(phi=phi), tmp_path / "r.parquet")
    with caplog.at_level(logging.INFO, logger="diffalign.data"):
        ds = load_preference_dataset(path, resolution=16, cache_dir=hf_cache)
    assert "dropped 2 all-tied lists" in caplog.text
    assert ds.dropped_ties == 2 and [int(r) for r in ds.rows] == [0, 2] and ds.skipped_rows == 0
    kept = load_preference_dataset(path, resolution=16, cache_dir=hf_cache, keep_ties=True)
    assert kept.dropped_ties == 0 and len(kept) == 4
    only_ties = write(ranked_table(n=2, phi=[[0.5] * 3, [1.0] * 3]), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="2 tied"):
        load_preference_dataset(only_ties, resolution=16, cache_dir=hf_cache)


def test_ranked_max_k_subsample_is_seeded(tmp_path, hf_cache):
    path = write(ranked_table(k=5), tmp_path / "r.parquet")
    a = RankedDataset(path, resolution=8, max_k=3, seed=1, cache_dir=hf_cache)
    b = RankedDataset(path, resolution=8, max_k=3, seed=1, cache_dir=hf_cache)
    assert a.k == 3
    picks = [a[i]["image_indices"] for i in range(len(a))]
    assert picks == [b[i]["image_indices"] for i in range(len(b))]
    for i, pick in enumerate(picks):
        assert pick == sorted(pick) and len(set(pick)) == 3
        assert torch.allclose(a[i]["scores"], torch.tensor([1 - j / 4 for j in pick]), atol=1e-3)
    a.set_epoch(1)
    assert [a[i]["image_indices"] for i in range(len(a))] != picks or len(a) < 2


# ---- bad data ---------------------------------------------------------------------------------------------------
def test_missing_column_and_wrong_type_name_the_column(tmp_path, hf_cache):
    table = pairwise_table()
    with pytest.raises(DataError, match="column 'label_0': missing column") as info:
        PairwiseDataset(write(table.drop_columns(["label_0"]), tmp_path / "a.parquet"), cache_dir=hf_cache)
    assert info.value.column == "label_0" and "rename_column" in str(info.value)
    wrong = table.set_column(3, "label_0", pa.array(["yes"] * 4))
    with pytest.raises(DataError, match="column 'label_0': has Arrow type string"):
        PairwiseDataset(write(wrong, tmp_path / "b.parquet"), cache_dir=hf_cache)
    ranked = ranked_table().drop_columns(["phi"])
    with pytest.raises(DataError, match="column 'phi': missing column"):
        RankedDataset(write(ranked, tmp_path / "c.parquet"), cache_dir=hf_cache)
    paths = ranked_table().set_column(2, "images", pa.array([["a.png"] * 3] * 4, pa.list_(pa.string())))
    with pytest.raises(DataError, match=r"column 'images': has Arrow type list<item: string>, expected list<binary>"):
        RankedDataset(write(paths, tmp_path / "d.parquet"), cache_dir=hf_cache)


def test_corrupt_image_names_row_and_column(tmp_path, hf_cache):
    path = write(pairwise_table(labels=(1.0, 1.0, 0.0, 1.0), corrupt_row=2), tmp_path / "p.parquet")
    ds = PairwiseDataset(path, resolution=16, cache_dir=hf_cache)
    ds[1]  # good rows load
    with pytest.raises(DataError, match="row 2, column 'jpg_1': cannot decode the image") as info:
        ds[2]
    assert info.value.row == 2 and info.value.column == "jpg_1" and "skip_bad_rows=True" in str(info.value)


def test_skip_bad_rows_counts(tmp_path, hf_cache, caplog):
    labels = (1.0, 0.7, 0.0, 1.0, None)
    table = pairwise_table(labels=(1.0,) * 5, corrupt_row=3).set_column(3, "label_0", pa.array(labels, pa.float64()))
    path = write(table, tmp_path / "p.parquet")
    with pytest.raises(DataError, match="row 1, column 'label_0': label_0 is 0.7"):
        PairwiseDataset(path, resolution=16, cache_dir=hf_cache)
    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        ds = PairwiseDataset(path, resolution=16, skip_bad_rows=True, cache_dir=hf_cache)
        assert ds.skipped_rows == 2 and sorted(ds.bad_rows) == [1, 4] and len(ds) == 3  # eager: labels
        items = [ds[i] for i in range(len(ds))]  # lazy: row 3's image is corrupt -> replaced by the next good row
    assert ds.skipped_rows == 3 and 3 in ds.bad_rows and "cannot decode" in ds.bad_rows[3]
    assert [item["prompt"] for item in items] == ["prompt 0", "prompt 2", "prompt 0"]
    assert "skipped 2 of 5 rows" in caplog.text and "skipping row 3" in caplog.text


def test_ranked_bad_rows(tmp_path, hf_cache):
    phi = [[1.0, 0.5, 0.0], [1.0, 1.5, 0.0], [1.0, 0.5, 0.0], [1.0, 0.0]]
    path = write(ranked_table(n=4, ks=[3, 3, 3, 2], phi=phi), tmp_path / "r.parquet")
    with pytest.raises(DataError, match=r"row 1, column 'phi': phi must lie in \[0, 1\] \(win-count scores\); found \[1.5\]"):
        RankedDataset(path, resolution=8, cache_dir=hf_cache)
    ds = RankedDataset(path, resolution=8, skip_bad_rows=True, cache_dir=hf_cache)
    assert ds.k == 3 and ds.skipped_rows == 2 and sorted(ds.bad_rows) == [1, 3]
    assert "k mismatch: this row has 2 images but the other rows have k=3" in ds.bad_rows[3]
    only_k = RankedDataset(write(ranked_table(n=3, ks=[3, 3, 2]), tmp_path / "k.parquet"), resolution=8, skip_bad_rows=False,
                           max_k=2, cache_dir=hf_cache)
    assert only_k.k == 2 and len(only_k) == 3  # max_k brings every row to a common k
    with pytest.raises(DataError, match="row 2, column 'images': k mismatch"):
        RankedDataset(tmp_path / "k.parquet", resolution=8, cache_dir=hf_cache)


def test_blank_captions_duplicate_ranks_and_empty_tables_are_refused(tmp_path, hf_cache):
    pairs = pairwise_table(labels=(1.0, 0.0, 1.0)).set_column(0, "caption", pa.array(["a cat", "  ", ""]))
    path = write(pairs, tmp_path / "p.parquet")
    with pytest.raises(DataError, match="row 1, column 'caption': caption is empty"):
        PairwiseDataset(path, resolution=8, cache_dir=hf_cache)
    ds = PairwiseDataset(path, resolution=8, skip_bad_rows=True, cache_dir=hf_cache)
    assert ds.skipped_rows == 2 and sorted(ds.bad_rows) == [1, 2]
    ranked = ranked_table(n=4, k=3)
    ranked = ranked.set_column(ranked.schema.get_field_index("rank"), "rank",
                               pa.array([[1, 2, 3], [1, 1, 3], [0, 1, 2], [3, 1, 2]], pa.list_(pa.int32())))
    ranked = ranked.set_column(0, "prompt", pa.array(["a", "b", "c", "\t"]))
    path = write(ranked, tmp_path / "r.parquet")
    with pytest.raises(DataError, match=r"row 1, column 'rank': rank \[1, 1, 3\] is not a permutation of 1..3"):
        RankedDataset(path, resolution=8, cache_dir=hf_cache)
    ds = RankedDataset(path, resolution=8, skip_bad_rows=True, cache_dir=hf_cache)
    assert sorted(ds.bad_rows) == [1, 2, 3] and "prompt is empty" in ds.bad_rows[3]
    with pytest.raises(DataError, match="has no rows"):
        RankedDataset(write(ranked_table(n=4).slice(0, 0), tmp_path / "empty.parquet"), resolution=8, cache_dir=hf_cache)


def test_folder_splits_follow_file_names(tmp_path, hf_cache):
    """A local Pick-a-Pic snapshot: data/{train,test,validation_unique}-*.parquet. Only the asked split is read."""
    (tmp_path / "snap" / "data").mkdir(parents=True)
    for split, n in (("train", 4), ("test", 3), ("validation_unique", 2)):
        write(pairwise_table(labels=(1.0,) * n), tmp_path / "snap" / "data" / f"{split}-00000-of-00001.parquet")
    assert len(PairwiseDataset(str(tmp_path / "snap"), resolution=8, cache_dir=hf_cache)) == 4
    assert len(PairwiseDataset(str(tmp_path / "snap"), resolution=8, split="test", cache_dir=hf_cache)) == 3
    with pytest.raises(DataError, match="no 'valid' split"):
        PairwiseDataset(str(tmp_path / "snap"), resolution=8, split="valid", cache_dir=hf_cache)
    # Files that name no split (what `diffalign synth` writes) are all "train".
    (tmp_path / "synth").mkdir()
    for i in range(2):
        write(ranked_table(n=2), tmp_path / "synth" / f"data-{i:05d}-of-00002.parquet")
    assert len(RankedDataset(str(tmp_path / "synth"), resolution=8, cache_dir=hf_cache)) == 4


def test_16_bit_images_keep_their_levels():
    from diffalign.data.transforms import decode_image

    levels = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")  # a 16-bit grayscale PNG
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
    rgb = np.asarray(decode_image(buffer.getvalue()))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 64, 128, 255]  # not clipped to white


# ---- preprocessing and collator ---------------------------------------------------------------------------------------
def test_transform_center_crop_micro_conditioning():
    image = Image.open(io.BytesIO(split_png((40, 20))))
    pixels, original, crop = ImageTransform(16, "center")(image)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 16, 16)
    assert original == (20, 40)  # (h, w) before resizing
    assert crop == (0, 8)  # resized to 32x16: (32 - 16) / 2 = 8 columns cut on the left
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert color_of(pixels[:, :, :4]) == RED and color_of(pixels[:, :, -4:]) == BLUE
    with pytest.raises(ValueError, match="needs an rng"):
        ImageTransform(16, "random")(image)


def test_transform_random_crop_flip_deterministic():
    image = Image.open(io.BytesIO(split_png((40, 20)))).convert("RGB")
    transform = ImageTransform(16, "random", random_flip=True)
    runs = [[transform(image, np.random.default_rng([0, 0, row])) for row in range(12)] for _ in range(2)]
    for (p1, o1, c1), (p2, o2, c2) in zip(*runs):
        assert torch.equal(p1, p2) and o1 == o2 == (20, 40) and c1 == c2
    lefts = {c[1] for _, _, c in runs[0]}
    assert all(0 <= left <= 16 for left in lefts) and len(lefts) > 1 and all(c[0] == 0 for _, _, c in runs[0])
    # each output equals the crop of the resized (maybe flipped) image at the recorded coordinates
    resized = np.asarray(image.resize((32, 16), Image.Resampling.BILINEAR), dtype=np.float32) / 127.5 - 1
    flips = 0
    for pixels, _, (top, left) in runs[0]:
        plain = torch.from_numpy(resized[top : top + 16, left : left + 16]).permute(2, 0, 1)
        flipped = torch.from_numpy(resized[:, ::-1][top : top + 16, left : left + 16].copy()).permute(2, 0, 1)
        is_plain, is_flipped = torch.allclose(pixels, plain, atol=1e-6), torch.allclose(pixels, flipped, atol=1e-6)
        assert is_plain or is_flipped
        flips += is_flipped and not is_plain
    assert 0 < flips < 12


def test_collator_batch_format(tmp_path, hf_cache):
    table = pairwise_table(labels=(1.0, 0.0, 1.0))
    table = table.set_column(1, "jpg_0", pa.array([png(RED, (40, 20)), png(RED, (20, 40)), png(RED, (16, 16))], pa.binary()))
    ds = PairwiseDataset(write(table, tmp_path / "p.parquet"), resolution=16, crop="random", seed=3, cache_dir=hf_cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_groups)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 2, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["scores"].dtype == torch.float32 and batch["scores"].tolist() == [[1, 0]] * 3
    assert batch["original_sizes"].dtype == torch.int64 and batch["original_sizes"].shape == (3, 2, 2)
    assert batch["crop_top_lefts"].dtype == torch.int64 and batch["crop_top_lefts"].shape == (3, 2, 2)
    # row 1 is swapped: its jpg_0 (20 wide, 40 high) is the loser, column 1
    assert batch["original_sizes"][:, :, :].tolist() == [[[20, 40], [16, 24]], [[16, 24], [40, 20]], [[16, 16], [16, 24]]]
    tops, lefts = batch["crop_top_lefts"][..., 0], batch["crop_top_lefts"][..., 1]
    assert tops[0, 0] == 0 and 0 <= lefts[0, 0] <= 16 and lefts[1, 1] == 0 and 0 <= tops[1, 1] <= 16
    assert batch["prompts"] == ["prompt 0", "prompt 1", "prompt 2"] and batch["user_ids"] == ["100", "101", "102"]
    assert len(batch["prompt_ids"]) == 3
    again = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_groups)))
    assert torch.equal(again["pixel_values"], batch["pixel_values"]) and torch.equal(again["crop_top_lefts"], batch["crop_top_lefts"])
    with pytest.raises(DataError, match="different sizes"):
        collate_groups([ds[0], {**ds[1], "scores": torch.zeros(3)}])


# ---- cache ----------------------------------------------------------------------------------------------------------
class FakeAdapter:
    """Exposes what the cache needs: a 4x average-pool 'VAE' and a deterministic 'text encoder'."""

    def __init__(self, fingerprint="fake-v1"):
        self.fingerprint = fingerprint
        self.images_encoded = 0
        self.prompts_encoded = []

    def encode_images(self, pixel_values):
        self.images_encoded += pixel_values.shape[0]
        return F.avg_pool2d(pixel_values, 4)

    def encode_prompts(self, prompts):
        self.prompts_encoded += list(prompts)
        codes = torch.tensor([[float(sum(map(ord, p)) % 97), float(len(p))] for p in prompts])
        return {"prompt_embeds": codes[:, None, :].expand(-1, 3, -1).clone(), "pooled_prompt_embeds": codes * 2}


def test_shard_assignment_covers_every_row_once():
    for num_rows in (1, 7, 10, 101):
        for shard_size in (1, 3, 256):
            for world_size in (1, 2, 3, 5):
                rows = [r for rank in range(world_size) for r in rows_for_rank(num_rows, shard_size, rank, world_size)]
                assert sorted(rows) == list(range(num_rows))
                shards = [s for rank in range(world_size) for s in shards_for_rank(num_shards_for(num_rows, shard_size), rank, world_size)]
                assert sorted(shards) == list(range(num_shards_for(num_rows, shard_size)))
    assert shards_for_rank(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError):
        shards_for_rank(5, 2, 2)


def test_cache_build_resume_and_read(tmp_path, hf_cache):
    table = pairwise_table(labels=(1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0))
    table = table.set_column(0, "caption", pa.array(["same"] * 3 + [f"p{i}" for i in range(4)]))
    ds = PairwiseDataset(write(table, tmp_path / "p.parquet"), resolution=16, cache_dir=hf_cache)
    out = tmp_path / "cache"
    adapter = FakeAdapter()
    # a "killed" run: only the shards of process 0 of 2 got written, plus a stale temporary file
    first = build_cache(ds, adapter, out, batch_size=2, shard_size=2, rank=0, world_size=2, progress=False)
    assert first["written"] == [0, 2] and not first["complete"] and adapter.images_encoded == 4 * 2
    (out / (shard_name(1, 4) + ".tmp-1234")).write_bytes(b"half a shard")
    with pytest.raises(FileNotFoundError, match="2 of 4 shards missing"):
        CachedDataset(out)
    resumed = build_cache(ds, adapter, out, batch_size=2, shard_size=2, progress=False)  # 1 process: rank 0 of 1
    assert resumed["written"] == [1, 3] and resumed["resumed"] == [0, 2] and resumed["complete"]
    assert adapter.images_encoded == 7 * 2  # each group encoded exactly once over both runs
    assert not list(out.glob("*.tmp-*"))
    assert adapter.prompts_encoded.count("same") == 2  # rows 0, 1 (shard 0: encoded once) and row 2 (shard 1)

    cached = CachedDataset(out, adapter=adapter, resolution=16)
    assert len(cached) == 7 and cached.k == 2
    for i in range(7):
        item, fresh = cached[i], ds[i]
        assert torch.allclose(item["latents"], F.avg_pool2d(fresh["pixel_values"], 4))
        assert torch.equal(item["scores"], fresh["scores"]) and item["prompt"] == fresh["prompt"]
        assert torch.equal(item["original_sizes"], fresh["original_sizes"])
        expect = FakeAdapter().encode_prompts([fresh["prompt"]])
        assert torch.equal(item["text"]["pooled_prompt_embeds"], expect["pooled_prompt_embeds"][0])
    batch = collate_groups([cached[i] for i in range(3)])
    assert batch["latents"].shape == (3, 2, 3, 4, 4) and batch["scores"].shape == (3, 2)
    assert batch["text"]["prompt_embeds"].shape == (3, 3, 2) and batch["text"]["pooled_prompt_embeds"].shape == (3, 2)
    assert batch["crop_top_lefts"].dtype == torch.int64 and batch["user_ids"] == ["100", "101", "102"]
    assert cached.empty_text["prompt_embeds"].shape == (1, 3, 2)
    clone = pickle.loads(pickle.dumps(cached))  # DataLoader workers get a copy without open file handles
    assert torch.equal(clone[5]["latents"], cached[5]["latents"])
    index = json.loads((out / "cache.json").read_text())
    assert index["adapter"] == "fake-v1" and index["resolution"] == 16 and index["num_shards"] == 4

    # a cache built with another model or resolution is rejected, by the reader and by a resumed build
    with pytest.raises(CacheMismatchError, match="different adapter"):
        CachedDataset(out, adapter=FakeAdapter("other-model"))
    with pytest.raises(CacheMismatchError, match="different resolution .*cached 16, now 32"):
        CachedDataset(out, resolution=32)
    with pytest.raises(CacheMismatchError, match="different adapter"):
        build_cache(ds, FakeAdapter("other-model"), out, shard_size=2, progress=False)
    ds32 = PairwiseDataset(tmp_path / "p.parquet", resolution=32, cache_dir=hf_cache)
    with pytest.raises(CacheMismatchError, match="different resolution"):
        build_cache(ds32, adapter, out, shard_size=2, progress=False)


def test_cache_truncated_shard_is_rebuilt_and_nan_latents_name_their_row(tmp_path, hf_cache, caplog):
    from safetensors.torch import load_file, save_file

    ds = PairwiseDataset(write(pairwise_table(labels=(1.0, 0.0, 1.0, 1.0)), tmp_path / "p.parquet"), resolution=16,
                         cache_dir=hf_cache)
    out = tmp_path / "cache"
    build_cache(ds, FakeAdapter(), out, shard_size=2, progress=False)
    shard = out / shard_name(1, 2)
    whole = shard.read_bytes()
    expected = {k: v.clone() for k, v in load_file(str(shard)).items()}
    shard.write_bytes(whole[:-100])  # a copy cut short
    with pytest.raises(CacheMismatchError, match=rf"{shard.name} is cut: {len(whole) - 100} bytes of {len(whole)}"):
        CachedDataset(out)
    adapter = FakeAdapter()
    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        again = build_cache(ds, adapter, out, shard_size=2, progress=False)
    assert again["written"] == [1] and again["resumed"] == [0] and "rebuilding it" in caplog.text
    rebuilt = load_file(str(shard))
    assert rebuilt.keys() == expected.keys() and [k for k in expected if not torch.equal(rebuilt[k], expected[k])] == []
    assert len(CachedDataset(out)) == 4
    # A NaN in a cached latent is traced to its source row.
    tensors = load_file(str(shard))
    tensors["latents"][1, 0, 0, 0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(shard), metadata=metadata)
    cached = CachedDataset(out)
    with pytest.raises(DataError, match=r"row 3, column 'latents': the cached latents hold NaN"):
        cached[3]


def test_cache_skips_bad_rows_and_stores_dtype(tmp_path, hf_cache):
    path = write(pairwise_table(labels=(1.0, 0.0, 1.0, 1.0), corrupt_row=1), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="row 1, column 'jpg_1'"):
        build_cache(PairwiseDataset(path, resolution=8, cache_dir=hf_cache), FakeAdapter(), tmp_path / "c0", progress=False)
    ds = PairwiseDataset(path, resolution=8, skip_bad_rows=True, cache_dir=hf_cache)
    summary = build_cache(ds, FakeAdapter(), tmp_path / "c1", shard_size=1, dtype="float16", progress=False)
    assert summary["skipped_rows"] == 1 and summary["rows_encoded"] == 3  # shard 1 is written empty
    cached = CachedDataset(tmp_path / "c1")
    assert len(cached) == 3 and cached.skipped_rows == 1 and list(cached.bad_rows) == [1]
    assert [cached[i]["row"] for i in range(3)] == [0, 2, 3]
    assert cached[0]["latents"].dtype == torch.float16 and cached[0]["scores"].dtype == torch.float32


def test_cache_with_tiny_sdxl_adapter_and_cli(tmp_path, hf_cache):
    from diffalign.cli import main
    from diffalign.families import load_family

    path = write(ranked_table(n=2, k=2), tmp_path / "r.parquet")
    ds = RankedDataset(path, resolution=32, cache_dir=hf_cache)
    adapter = load_family("tiny:sdxl", seed=0)
    build_cache(ds, adapter, tmp_path / "c", batch_size=2, progress=False)
    cached = CachedDataset(tmp_path / "c", adapter=adapter, resolution=32)
    batch = collate_groups([cached[0], cached[1]])
    assert batch["latents"].shape == (2, 2, 4, 16, 16) and torch.isfinite(batch["latents"]).all()
    direct = adapter.encode_prompts(["a photo of 1"])
    assert set(batch["text"]) == set(direct)
    assert torch.allclose(batch["text"]["prompt_embeds"][1], direct["prompt_embeds"][0], atol=1e-5)
    with pytest.raises(CacheMismatchError, match="different adapter"):
        CachedDataset(tmp_path / "c", adapter=load_family("tiny:sdxl", seed=1))

    out = tmp_path / "cli"
    argv = ["cache", "--data", path, "--out", str(out), "--model", "tiny:sdxl", "--resolution", "32",
            "--shard_size", "1", "--hf_cache_dir", hf_cache, "--device", "cpu"]
    assert main(argv) == 0
    assert len(CachedDataset(out)) == 2 and len(list(out.glob("shard-*.safetensors"))) == 2
    assert main(argv) == 0  # resume: nothing left to do


WORKER = """
import sys
import torch.nn.functional as F
from diffalign.data import PairwiseDataset, build_cache


class Adapter:  # the FakeAdapter of test_data.py, without pytest
    fingerprint = "fake-v1"

    def encode_images(self, pixel_values):
        return F.avg_pool2d(pixel_values, 4)

    def encode_prompts(self, prompts):
        import torch
        codes = torch.tensor([[float(sum(map(ord, p)) % 97), float(len(p))] for p in prompts])
        return {"prompt_embeds": codes[:, None, :].expand(-1, 3, -1).clone(), "pooled_prompt_embeds": codes * 2}


data, out, hf_cache = sys.argv[1:4]
ds = PairwiseDataset(data, resolution=16, cache_dir=hf_cache)
summary = build_cache(ds, Adapter(), out, batch_size=2, shard_size=1)  # rank / world size from accelerate
# One write call per line: both processes share the pipe, and separate writes can interleave.
sys.stdout.write(f"WROTE {summary['written']}\\n")
sys.stdout.flush()
"""


@pytest.mark.slow
def test_cache_two_processes_match_one(tmp_path, hf_cache):
    """torchrun with 2 CPU processes: each writes its shards (s % 2 == rank); the result equals a 1-process build."""
    import os
    import subprocess
    import sys

    path = write(pairwise_table(labels=(1.0, 0.0, 1.0, 0.0, 1.0)), tmp_path / "p.parquet")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), path,
         str(tmp_path / "two"), hf_cache],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(line for line in two.stdout.splitlines() if line.startswith("WROTE")) == ["WROTE [0, 2, 4]", "WROTE [1, 3]"]
    ds = PairwiseDataset(path, resolution=16, cache_dir=hf_cache)
    build_cache(ds, FakeAdapter(), tmp_path / "one", batch_size=2, shard_size=1, progress=False)
    a, b = CachedDataset(tmp_path / "two"), CachedDataset(tmp_path / "one")
    assert len(a) == len(b) == 5
    for i in range(5):
        assert torch.equal(a[i]["latents"], b[i]["latents"]) and a[i]["row"] == b[i]["row"] == i
        assert torch.equal(a[i]["text"]["prompt_embeds"], b[i]["text"]["prompt_embeds"])
