"""The Syn-Pic parquet schema (one row per prompt), its shard files, and the pairwise Pick-a-Pic export.

The schema is documented in docs/synpic.md and agreed in the INTERFACES notes; change all three together.
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SYNPIC_SCHEMA = pa.schema([
    ("prompt", pa.string()),
    ("prompt_id", pa.string()),
    ("images", pa.list_(pa.binary())),
    ("generator_ids", pa.list_(pa.string())),
    ("seeds", pa.list_(pa.int64())),
    ("reward_names", pa.list_(pa.string())),
    ("scores", pa.list_(pa.list_(pa.float32()))),
    ("phi", pa.list_(pa.float32())),
    ("rank", pa.list_(pa.int32())),
])

PICKAPIC_SCHEMA = pa.schema([
    ("caption", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
])


def shard_name(shard: int, num_shards: int) -> str:
    # The Hub's split pattern: `load_dataset("parquet", data_dir=...)` reads these as the train split and
    # leaves synth_config.json beside them alone (with `data-*` names it tried to parse it as parquet).
    return f"train-{shard:05d}-of-{num_shards:05d}.parquet"


def encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_atomic(table: pa.Table, path: str) -> None:
    """Write to a temporary name and rename: a reader (or a resumed run) never sees half a shard."""
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, row_group_size=64)
    os.replace(tmp, path)


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SYNPIC_SCHEMA)


def validate_synpic_table(table: pa.Table, where: str = "table") -> None:
    """Raise ValueError naming the first broken column or row; used by tests and by readers."""
    missing = [f.name for f in SYNPIC_SCHEMA if f.name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing Syn-Pic column(s) {missing}")
    for f in SYNPIC_SCHEMA:
        if not table.schema.field(f.name).type.equals(f.type):
            raise ValueError(f"{where}: column {f.name!r} is {table.schema.field(f.name).type}, expected {f.type}")
    for i, row in enumerate(table.to_pylist()):
        k = len(row["images"])
        n = len(row["reward_names"])
        if k < 2:
            raise ValueError(f"{where} row {i} (prompt_id {row['prompt_id']!r}): {k} image(s), need k >= 2")
        for col in ("generator_ids", "seeds", "phi", "rank"):
            if len(row[col]) != k:
                raise ValueError(f"{where} row {i}: {col} has {len(row[col])} entries for {k} images")
        if len(row["scores"]) != n or any(len(s) != k for s in row["scores"]):
            raise ValueError(f"{where} row {i}: scores is not {n} x {k}")
        if sorted(row["rank"]) != list(range(1, k + 1)):
            raise ValueError(f"{where} row {i}: rank {row['rank']} is not a permutation of 1..{k}")
        if any(not (0.0 <= p <= 1.0) for p in row["phi"]):
            raise ValueError(f"{where} row {i}: phi {row['phi']} outside [0, 1]")


def shard_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.parquet shards under {folder!r}")
    return files


def read_synpic(folder: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, schema=SYNPIC_SCHEMA) for f in shard_files(folder)])


def _label(phi_a: float, phi_b: float) -> float:
    return 1.0 if phi_a > phi_b else (0.0 if phi_a < phi_b else 0.5)


def export_pairwise(synpic_dir: str, out_dir: str, mode: str = "best_worst") -> int:
    """Write Pick-a-Pic-schema pairs (caption, jpg_0, jpg_1, label_0), one output file per input shard.

    'best_worst': one pair a prompt, rank 1 as jpg_0 vs rank k; 'all_pairs': every i < j in image order.
    label_0 compares phi: 1.0 jpg_0 preferred, 0.0 jpg_1 preferred, 0.5 equal phi. Returns the pair count.
    """
    if mode not in ("best_worst", "all_pairs"):
        raise ValueError(f"pairwise mode {mode!r} is unknown; use 'best_worst' or 'all_pairs'")
    os.makedirs(out_dir, exist_ok=True)
    total = 0
    for path in shard_files(synpic_dir):
        table = pq.read_table(path, schema=SYNPIC_SCHEMA)
        pairs = []
        for row in table.to_pylist():
            phi, images = row["phi"], row["images"]
            if mode == "best_worst":
                order = np.argsort(row["rank"])
                idx = [(int(order[0]), int(order[-1]))]
            else:
                idx = [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))]
            for a, b in idx:
                pairs.append({"caption": row["prompt"], "jpg_0": images[a], "jpg_1": images[b],
                              "label_0": _label(phi[a], phi[b])})
        write_atomic(pa.Table.from_pylist(pairs, schema=PICKAPIC_SCHEMA),
                     os.path.join(out_dir, os.path.basename(path).replace("train-", "pairs-", 1)))
        total += len(pairs)
    return total
