"""The synthetic ranked-preference generator: win counts, prompt sources, specs, and an end-to-end run on
tiny pipelines and tiny reward models that is interrupted and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.synth import (
    GeneratorSpec,
    RewardSpec,
    SynthConfig,
    check_prompts,
    load_prompts,
    ranks_from_phi,
    read_synpic,
    run_synth,
    validate_synpic_table,
    win_count_scores,
)

PROMPTS = ["a red cube", "a blue sphere", "two green cats", "a yellow bus", "a dog on a skateboard", "an apple",
           "a tree in winter", "three orange balls"]
GENERATORS = ["tiny:sdxl:0,steps=2,size=32,batch_size=4", "tiny:sd3:1,steps=2,size=32,batch_size=4"]
REWARDS = ["clip_score,model_name=diffalign-tiny-clip,random_init=true,seed=0,form=torchmetrics",
           "aesthetic,clip_model=diffalign-tiny-clip,random_init=true,seed=1"]


# ------------------------------------------------------------------------------------------ win counts
def test_win_count_scores_hand_worked_example_with_ties():
    """Three rewards, k = 3 images.

        reward A: [0.9, 0.5, 0.5]  image 0 beats 1 and 2 (2 wins); 1 vs 2 tie: nothing
        reward B: [1.0, 2.0, 3.0]  image 2 beats 0 and 1 (2); image 1 beats 0 (1); image 0: 0
        reward C: [7.0, 7.0, 7.0]  all tied: nothing

    C = [2 + 0 + 0, 0 + 1 + 0, 0 + 2 + 0] = [2, 1, 2];  phi = C / (n_rewards * (k - 1)) = C / 6
      = [1/3, 1/6, 1/3].
    Ranks (1 = best, equal phi keeps image order): image 0 -> 1, image 2 -> 2, image 1 -> 3.
    """
    scores = torch.tensor([[0.9, 0.5, 0.5], [1.0, 2.0, 3.0], [7.0, 7.0, 7.0]])
    phi = win_count_scores(scores)
    assert phi.dtype == torch.float32
    torch.testing.assert_close(phi, torch.tensor([1 / 3, 1 / 6, 1 / 3]))
    assert ranks_from_phi(phi).tolist() == [1, 3, 2]
    assert ranks_from_phi(phi).dtype == torch.int32
    # Batched input gives the same rows; numpy input works; scale of a reward does not matter.
    other = np.array([[1.0, 3.0, 2.0], [5.0, 4.0, 6.0], [0.0, 0.0, 1.0]])
    batched = win_count_scores(torch.stack([scores, torch.from_numpy(other).float()]))
    torch.testing.assert_close(batched[0], phi)
    torch.testing.assert_close(batched[1], win_count_scores(other))
    torch.testing.assert_close(win_count_scores(other * np.array([[1000.0], [1e-3], [7.0]])), batched[1])
    # other: A wins [0, 2, 1], B [1, 0, 2], C [0, 0, 2] -> C = [1, 2, 5] / 6
    torch.testing.assert_close(batched[1], torch.tensor([1 / 6, 2 / 6, 5 / 6]))
    assert ranks_from_phi(batched).tolist() == [[1, 3, 2], [3, 2, 1]]


def test_win_count_scores_bad_input():
    with pytest.raises(ValueError, match="k >= 2"):
        win_count_scores(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="NaN"):
        win_count_scores(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\(n_rewards, k\)"):
        win_count_scores(torch.zeros(3))


# ------------------------------------------------------------------------------------------ specs, prompts
def test_generator_and_reward_specs():
    g = GeneratorSpec.parse("tiny:sdxl:3,id=a,steps=2,size=32,seed=10,n=2")
    assert (g.source, g.id, g.steps, g.height, g.width, g.images_per_prompt) == ("tiny:sdxl:3", "a", 2, 32, 32, 2)
    assert g.seeds(0) == [10, 11] and g.seeds(5) == [20, 21]  # per_prompt: every image its own seed
    assert GeneratorSpec.parse("x/y,seed_policy=fixed,seed=4").seeds(7) == [4]
    with pytest.raises(ValueError, match="unknown key"):
        GeneratorSpec.parse("x/y,stpes=2")
    with pytest.raises(ValueError, match="seed_policy"):
        GeneratorSpec.parse("x/y,seed_policy=random")
    r = RewardSpec.parse("clip_score,id=clipB,model_name=ViT-B-32,pretrained=openai,random_init=false")
    assert (r.name, r.id, r.kwargs) == ("clip_score", "clipB", {"model_name": "ViT-B-32", "pretrained": "openai",
                                                                "random_init": False})
    with pytest.raises(ValueError, match="used more than once"):
        SynthConfig(prompts="p.txt", generators=["tiny:sdxl", "tiny:sdxl"], rewards=["clip_score"], output_dir="o")
    with pytest.raises(ValueError, match="k = total images per prompt"):
        SynthConfig(prompts="p.txt", generators=["tiny:sdxl"], rewards=["clip_score"], output_dir="o")
    for bad, message in (("guidance=nan", "guidance must be a finite"), ("size=7", "height=7 must be a positive multiple of 8"),
                         ("width=0", "width=0 must be")):
        with pytest.raises(ValueError, match=message):
            GeneratorSpec.parse(f"x/y,{bad}")
    two = dict(prompts="p.txt", generators=["tiny:sdxl,n=2"], rewards=["clip_score"], output_dir="o")
    with pytest.raises(ValueError, match="reward_batch_size must be >= 1"):
        SynthConfig(**two, reward_batch_size=0)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        SynthConfig(**two, limit=-1)


def test_a_run_that_failed_before_its_first_image_does_not_block_the_corrected_rerun(tmp_path):
    from diffalign.synth.prompts import load_prompts
    from diffalign.synth.runner import CONFIG_FILE, _check_or_write_config

    prompts_file = tmp_path / "p.txt"
    prompts_file.write_text("a photo of a cat\n")
    prompts = load_prompts(str(prompts_file), "prompt", None, "train", None)
    state = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    out = tmp_path / "out"

    def config(steps):
        return SynthConfig(prompts=str(prompts_file), generators=[f"tiny:sdxl,n=2,steps={steps}"], rewards=["clip_score"],
                           output_dir=str(out))

    _check_or_write_config(config(2), prompts, state)  # the first attempt wrote its config, then failed
    (out / ".progress" / "chunk-00000").mkdir(parents=True)  # empty folders are not output
    _check_or_write_config(config(3), prompts, state)  # the corrected rerun is accepted...
    assert json.loads((out / CONFIG_FILE).read_text())["generators"][0]["steps"] == 3
    (out / ".progress" / "chunk-00000" / "g0-p0-0.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="holds a run with different"):  # ...but once an image exists, not any more
        _check_or_write_config(config(4), prompts, state)


def test_prompt_sources_and_bad_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\na dog\n" + "word " * 80 + "\n")
    prompts = load_prompts(str(txt))
    assert [(p.index, p.prompt_id) for p in prompts] == [(0, "0"), (1, "1"), (2, "2"), (3, "3")]
    with pytest.raises(ValueError, match=r"2 bad prompt\(s\): #1 \(id '1', ''\): empty; #3 .*82 tokens > 77"):
        check_prompts(prompts)
    kept, bad = check_prompts(prompts, skip_bad_prompts=True)
    assert [p.text for p in kept] == ["a cat", "a dog"] and len(bad) == 2

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"caption": c, "uid": f"u{i}"}) for i, c in enumerate(["x", "y"])))
    assert [(p.prompt_id, p.text) for p in load_prompts(str(jsonl), field="caption", id_field="uid")] == [
        ("u0", "x"), ("u1", "y")]
    with pytest.raises(ValueError, match="no field 'prompt'"):
        load_prompts(str(jsonl))

    import datasets

    datasets.Dataset.from_dict({"text": ["p0", "p1", "p2"]}).save_to_disk(str(tmp_path / "hf"))
    assert [p.text for p in load_prompts(f"hf:{tmp_path / 'hf'}", field="text", limit=2)] == ["p0", "p1"]
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------------------ end to end
class _Interrupt(Exception):
    pass


def _config(tmp_path, out, **kw):
    prompts = tmp_path / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("\n".join(PROMPTS) + "\n")
    return SynthConfig(prompts=str(prompts), generators=list(GENERATORS), rewards=list(REWARDS),
                       output_dir=str(out), chunk_size=3, chunks_per_pass=2, reward_batch_size=5, progress=False, **kw)


def _records(table):
    return [(r["prompt_id"], g, s) for r in table.to_pylist() for g, s in zip(r["generator_ids"], r["seeds"])]


def test_end_to_end_interrupted_and_resumed_equals_clean_run(tmp_path):
    clean = run_synth(_config(tmp_path, tmp_path / "clean", pairwise_dir=str(tmp_path / "pairs")))
    assert clean.images_generated == 16 and clean.shards_written == 3 and clean.pairs_written == 8

    def stop_after_5(n):
        if n == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_synth(_config(tmp_path, tmp_path / "resumed"), on_image=stop_after_5)
    # Five images stashed, no shard yet (the first pass holds chunks 0 and 1).
    assert not list((tmp_path / "resumed").glob("*.parquet"))
    resumed = run_synth(_config(tmp_path, tmp_path / "resumed"))
    assert resumed.images_generated == 11  # only what was missing
    assert not (tmp_path / "resumed" / ".progress").exists()

    a, b = read_synpic(str(tmp_path / "clean")), read_synpic(str(tmp_path / "resumed"))
    validate_synpic_table(b)
    records = _records(b)
    assert len(records) == 16 and len(set(records)) == 16
    assert sorted({r[0] for r in records}) == sorted(str(i) for i in range(8))
    # Resuming changes nothing: same pixels, same scores, same ranking as the uninterrupted run.
    assert a.to_pylist() == b.to_pylist()

    row = b.to_pylist()[0]
    assert row["generator_ids"] == ["tiny:sdxl:0", "tiny:sd3:1"] and row["seeds"] == [0, 0]
    assert row["reward_names"] == ["clip_score", "aesthetic"]
    torch.testing.assert_close(win_count_scores(torch.tensor(row["scores"])), torch.tensor(row["phi"]))
    # The stored scores are the rewards' scores of the stored PNGs.
    from io import BytesIO

    from PIL import Image

    from diffalign import rewards

    clip = rewards.load("clip_score", model_name="diffalign-tiny-clip", random_init=True, seed=0,
                        form="torchmetrics", device="cpu")
    ims = [Image.open(BytesIO(x)).convert("RGB") for x in row["images"]]
    assert ims[0].size == (32, 32)
    torch.testing.assert_close(clip.score(ims, [row["prompt"]] * 2), torch.tensor(row["scores"][0]),
                               rtol=1e-4, atol=1e-4)

    pairs = pq.read_table(str(tmp_path / "pairs")).to_pylist()
    assert len(pairs) == 8 and set(pairs[0]) == {"caption", "jpg_0", "jpg_1", "label_0"}
    first = a.to_pylist()[0]
    best = first["rank"].index(1)
    assert pairs[0]["jpg_0"] == first["images"][best] and pairs[0]["caption"] == first["prompt"]

    from diffalign.synth import export_pairwise

    assert export_pairwise(str(tmp_path / "clean"), str(tmp_path / "all"), mode="all_pairs") == 8  # k=2: one pair each
    for row, pair in zip(a.to_pylist(), pq.read_table(str(tmp_path / "all")).to_pylist()):
        p0, p1 = row["phi"]
        assert pair["jpg_0"] == row["images"][0] and pair["label_0"] == (1.0 if p0 > p1 else 0.0 if p0 < p1 else 0.5)

    # A restart with other arguments is refused instead of mixing two runs.
    bad = _config(tmp_path, tmp_path / "resumed")
    bad.generators[0].steps = 3
    with pytest.raises(ValueError, match="different"):
        run_synth(bad)
    # A run written before the generator key `scheduler` existed still resumes (a missing key reads as its
    # default), and a set value is still a different argument.
    stored_path = tmp_path / "resumed" / "synth_config.json"
    stored = json.loads(stored_path.read_text())
    for g in stored["generators"]:
        del g["scheduler"]
    stored_path.write_text(json.dumps(stored))
    assert run_synth(_config(tmp_path, tmp_path / "resumed")).images_generated == 0
    other = _config(tmp_path, tmp_path / "resumed")
    other.generators[0].scheduler = "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match=r"different \['generators'\]"):
        run_synth(other)

    # The data engineer's reader takes the output as is.
    data = pytest.importorskip("diffalign.data")
    ds = data.load_preference_dataset(str(tmp_path / "resumed"), resolution=32, keep_ties=True)
    assert len(ds) == 8 and ds.k == 2
    # By default lists whose images all tie are dropped, and counted.
    phi = [row["phi"] for row in read_synpic(str(tmp_path / "resumed")).to_pylist()]
    tied = sum(len(set(p)) == 1 for p in phi)
    default = data.load_preference_dataset(str(tmp_path / "resumed"), resolution=32)
    assert default.dropped_ties == tied and len(default) == 8 - tied
    item = ds[0]
    assert tuple(item["pixel_values"].shape) == (2, 3, 32, 32)

    # ... and so does `datasets`, beside synth_config.json: the shards are the train split.
    from datasets import load_dataset

    hub = load_dataset("parquet", data_dir=str(tmp_path / "resumed"), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(hub["prompt_id"]) == sorted(r["prompt_id"] for r in b.to_pylist())
    # PNG bytes are stored as list<binary>; cast_column types them as images, and they decode to the pixels.
    from datasets import Image as HFImage
    from datasets import Sequence

    typed = hub.cast_column("images", Sequence(HFImage()))
    first_row = next(r for r in b.to_pylist() if r["prompt_id"] == typed[0]["prompt_id"])
    assert [im.tobytes() for im in typed[0]["images"]] == [
        Image.open(BytesIO(x)).tobytes() for x in first_row["images"]]

    # Shards of an older version (data-*.parquet) are refused, not written again beside themselves.
    for shard in (tmp_path / "resumed").glob("train-*.parquet"):
        shard.rename(shard.with_name(shard.name.replace("train-", "data-")))
    with pytest.raises(ValueError, match="3 shard\\(s\\) named data-\\*.parquet"):
        run_synth(_config(tmp_path, tmp_path / "resumed"))


def test_processes_split_the_chunks(tmp_path):
    """Two ranks (run one after the other with a stand-in state) write disjoint chunks that cover all prompts."""
    cfg = _config(tmp_path, tmp_path / "split", skip_bad_prompts=True)
    # Two bad prompts (empty, 82 tokens) are skipped and counted; the kept prompts keep their source ids.
    (tmp_path / "bad.txt").write_text("\n".join(PROMPTS[:4] + ["", "word " * 80] + PROMPTS[4:]) + "\n")
    cfg.prompts = str(tmp_path / "bad.txt")
    cfg.generators = [GeneratorSpec.parse("tiny:sd3:0,steps=1,size=32,n=2")]
    cfg.rewards = [RewardSpec.parse(REWARDS[0])]
    written = []
    for rank in (1, 0):
        state = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0,
                                is_local_main_process=rank == 0, device=torch.device("cpu"),
                                wait_for_everyone=lambda: None)
        if rank == 1:  # the main process writes the run's config first
            os.makedirs(cfg.output_dir)
            kept, _ = check_prompts(load_prompts(cfg.prompts), skip_bad_prompts=True)
            with open(os.path.join(cfg.output_dir, "synth_config.json"), "w") as f:
                json.dump(json.loads(json.dumps(cfg.fingerprint(kept))), f)
        stats = run_synth(cfg, state=state)
        assert stats.skipped_bad_prompts == 2 and stats.num_prompts == 8
        written.append(sorted(p.name for p in (tmp_path / "split").glob("*.parquet")))
        assert stats.shards_written == (1 if rank == 1 else 2)
    assert written[0] == ["train-00001-of-00003.parquet"]
    records = _records(read_synpic(str(tmp_path / "split")))
    assert len(records) == 16 and len(set(records)) == 16
    assert sorted({r[0] for r in records}, key=int) == ["0", "1", "2", "3", "6", "7", "8", "9"]
    # Without the flag the run stops before generating anything and names the bad prompts.
    cfg.skip_bad_prompts = False
    with pytest.raises(ValueError, match=r"#4 \(id '4', ''\): empty"):
        run_synth(cfg, state=state)


def test_cli_killed_and_resumed(tmp_path):
    """`diffalign synth` is SIGKILLed part-way, restarted with the same arguments, and ends with exactly one
    record per (prompt, generator, seed)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "diffalign.cli", "synth", "--prompts", str(prompts), "--output_dir", str(out),
           "--chunk_size", "4", "--chunks_per_pass", "1", "--no_progress"]
    for g in GENERATORS:
        cmd += ["--generator", g.replace("batch_size=4", "batch_size=1")]
    for r in REWARDS:
        cmd += ["--reward", r]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # Kill once the first shard is out and more images are on disk: mid-run, in a later chunk.
    while time.time() < deadline and proc.poll() is None:
        if list(out.glob("*.parquet")) and len(list(out.glob(".progress/*/*.png"))) >= 1:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards_before = len(list(out.glob("*.parquet")))
    assert shards_before < 2, "the run finished before it could be killed; the test needs a slower kill point"
    assert killed
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_synpic(str(out))
    validate_synpic_table(table)
    records = _records(table)
    assert len(records) == 16 and len(set(records)) == 16
    assert sorted(r["prompt_id"] for r in table.to_pylist()) == sorted(str(i) for i in range(8))
    assert not (out / ".progress").exists()


def test_config_from_dict_accepts_spec_strings_and_dicts(tmp_path):
    from diffalign.synth import config_from_dict

    cfg = config_from_dict({"prompts": "p.txt", "output_dir": "o",
                            "generators": ["tiny:sdxl:0,steps=2", {"source": "tiny:sd3:1", "steps": 3, "id": "b"}],
                            "rewards": [{"name": "clip_score", "kwargs": {"random_init": True}}]})
    assert [g.id for g in cfg.generators] == ["tiny:sdxl:0", "b"] and cfg.generators[1].steps == 3
    assert cfg.rewards[0].kwargs == {"random_init": True} and cfg.k == 2
    with pytest.raises(ValueError, match="inside output_dir"):
        config_from_dict({"prompts": "p.txt", "output_dir": "o", "generators": GENERATORS, "rewards": REWARDS,
                          "pairwise_dir": "o/pairs"})
    with pytest.raises(ValueError, match="unknown synth config key"):
        config_from_dict({"prompts": "p.txt", "output_dir": "o", "generators": GENERATORS, "rewards": REWARDS,
                          "chunksize": 3})


def test_diffusers_folder_generator_matches_tiny_spec(tmp_path):
    """A pipeline folder goes through DiffusionPipeline.from_pretrained and gives the same images, seed for seed,
    as the in-memory tiny spec it was saved from; batch composition does not change an image."""
    from diffalign.synth import generate_images, load_pipeline
    from diffalign.testing import tiny_sdxl_pipeline

    tiny_sdxl_pipeline(1).save_pretrained(str(tmp_path / "pipe"))
    spec_dir = GeneratorSpec(source=str(tmp_path / "pipe"), steps=2, height=32, width=32)
    spec_tiny = GeneratorSpec(source="tiny:sdxl:1", steps=2, height=32, width=32)
    from_dir = generate_images(load_pipeline(spec_dir, "cpu"), spec_dir, ["a cat", "a dog"], [3, 4])
    tiny = load_pipeline(spec_tiny, "cpu")
    from_tiny = generate_images(tiny, spec_tiny, ["a cat", "a dog"], [3, 4])
    alone = generate_images(tiny, spec_tiny, ["a dog"], [4])
    arrays = [np.asarray(im) for im in from_dir]
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays, from_tiny))
    np.testing.assert_allclose(np.asarray(alone[0]), arrays[1], atol=2)  # uint8; batching may flip a rounding
    assert not np.array_equal(arrays[0], arrays[1])


def test_generator_scheduler_key_swaps_the_sampler():
    """`scheduler=` rebuilds the pipeline's scheduler from its own config; a name that is not a diffusers
    scheduler is an error that names it."""
    from diffalign.synth import load_pipeline

    spec = GeneratorSpec.parse("tiny:sdxl:1,steps=2,size=32,scheduler=DPMSolverMultistepScheduler")
    pipe = load_pipeline(spec, "cpu")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.beta_schedule == load_pipeline(GeneratorSpec.parse("tiny:sdxl:1"), "cpu").scheduler.config.beta_schedule
    with pytest.raises(ValueError, match="'UNet2DModel' is not a diffusers scheduler"):
        load_pipeline(GeneratorSpec.parse("tiny:sdxl:1,scheduler=UNet2DModel"), "cpu")


def test_generator_lora_key_generates_from_a_trained_policy(tmp_path):
    """`lora=` fuses a trained LoRA into the generator (an iterative round samples from the last round's policy):
    the same images as diffusers' unfused load_lora_weights, and not the base's."""
    from diffalign.synth import generate_images, load_pipeline
    from diffalign.testing import tiny_sdxl_pipeline
    from diffalign.training import PreferenceTrainer, TrainConfig

    out = str(tmp_path / "policy")
    PreferenceTrainer(TrainConfig(pretrained_model_name_or_path="tiny:sdxl:1", model_seed=1, dataset="synthetic:pairs:8",
                                  resolution=32, lora_rank=4, train_batch_size=2, learning_rate=5e-2, max_train_steps=2,
                                  checkpointing_steps=0, report_to="none", progress_bar=False, output_dir=out)).train()
    spec = GeneratorSpec.parse(f"tiny:sdxl:1,steps=2,size=32,lora={out}")
    fused = generate_images(load_pipeline(spec, "cpu"), spec, ["a cat"], [3])[0]
    plain = GeneratorSpec.parse("tiny:sdxl:1,steps=2,size=32")
    base = generate_images(load_pipeline(plain, "cpu"), plain, ["a cat"], [3])[0]
    unfused_pipe = tiny_sdxl_pipeline(1)
    unfused_pipe.load_lora_weights(out)
    unfused = generate_images(unfused_pipe, plain, ["a cat"], [3])[0]
    np.testing.assert_allclose(np.asarray(fused, dtype=float), np.asarray(unfused, dtype=float), atol=2)
    assert np.abs(np.asarray(fused, dtype=float) - np.asarray(base, dtype=float)).max() > 8
    with pytest.raises(FileNotFoundError, match="lora"):
        load_pipeline(GeneratorSpec.parse(f"tiny:sdxl:1,lora={tmp_path / 'none'}"), "cpu")


def test_a_flow_matching_pipeline_refuses_a_non_flow_scheduler():
    from diffalign.synth import load_pipeline

    with pytest.raises(ValueError, match="does not sample a flow-matching pipeline"):
        load_pipeline(GeneratorSpec.parse("tiny:sd3:0,scheduler=DPMSolverMultistepScheduler"), "cpu")
    pipe = load_pipeline(GeneratorSpec.parse("tiny:sd3:0,scheduler=FlowMatchEulerDiscreteScheduler"), "cpu")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
