"""`diffalign quickstart` end to end on a throwaway toy checkpoint (a few pretrain steps), tiny budgets.

Real pipeline: pretrain recipe -> toy Syn-Pic (diffalign synth, toy_geneval_graded reward) -> PreferenceTrainer
(RankDPO LoRA + random-label control) -> toy-GenEval with shared seeds -> JSON, grid, curves.
"""

import json
import os

import numpy as np
import pytest
import torch

from diffalign.toyworld import pretrain as P
from diffalign.toyworld import quickstart as Q
from diffalign.toyworld import scenes
from diffalign.toyworld.toy_rewards import GradedToyGenEvalReward, metadata_for_prompt, sub_questions


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    cfg = P.PretrainConfig(
        family="sdxl", output_dir=str(root / "toy-sdxl"), state_dir=str(root / "state"), vae_steps=2, vae_batch_size=2,
        steps=3, batch_size=2, eval_every=1000, eval_per_task=1, num_inference_steps=1, save_every=1000, log_every=1,
        progress=False,
    )
    P.pretrain(cfg)
    return cfg


def test_quickstart_end_to_end(toy_run, tmp_path):
    from diffalign.cli import main

    out, js = tmp_path / "qs", tmp_path / "res.json"
    argv = ["quickstart", "--base", toy_run.output_dir, "--output_dir", str(out), "--json", str(js), "--with_control",
            "--num_prompts", "6", "--guidances", "2", "5", "--synth_steps", "2", "--train_steps", "3", "--groups_per_step", "2",
            "--eval_per_task", "2", "--num_inference_steps", "2", "--no_progress"]
    assert main(argv) == 0
    res = json.load(open(js))
    assert res == json.load(open(out / "results.json"))
    assert res["method"] == "rankdpo" and res["family"] == "sdxl" and res["seconds"] > 0
    for model in ("base", "aligned", "control"):
        s = res[model]
        assert s["n_images"] == 12
        for task in scenes.TASKS:
            assert 0.0 <= s[task] <= 1.0 and s[task + "_se"] >= 0.0
        assert s["overall"] == pytest.approx(np.mean([s[t] for t in scenes.TASKS]))
        if model != "base":  # the paired deltas are the differences of the two summaries
            d = res["delta"][model]
            for key in (*scenes.TASKS, "overall"):
                assert d[key] == pytest.approx(s[key] - res["base"][key])
    d = res["delta"]["method_vs_control"]["overall"]
    assert d == pytest.approx(res["aligned"]["overall"] - res["control"]["overall"])

    # The data: k=2 lists scored by the exact checker (the default, alone), with DPO pairs exported from the same lists.
    assert res["data"]["k"] == 2 and res["data"]["rewards"] == ["toy_geneval_graded"]
    assert res["data"]["summary"]["lists"] == 6
    from diffalign.synth import read_synpic

    table = read_synpic(res["data"]["synpic"]).to_pylist()
    assert all(len(r["images"]) == 2 and r["reward_names"][0] == "toy_geneval_graded" for r in table)
    for r in table:  # stored scores are the exact checker's graded scores of the stored images
        meta = metadata_for_prompt(r["prompt"])
        assert meta["prompt"] == r["prompt"] and all(0.0 <= s <= 1.0 for s in r["scores"][0])

    # Training really ran, through the project trainer, and moved the LoRA weights off zero.
    for name in ("rankdpo", "control"):
        assert res["training"][name]["global_step"] == 3
    run_dir = out / "train-rankdpo-seed0"
    assert len(Q.read_losses(str(run_dir))) == 3
    from safetensors.torch import load_file

    lora = load_file(str(run_dir / "pytorch_lora_weights.safetensors"))
    assert any("lora_B" in k or "lora.up" in k for k in lora)
    moved = max(float(v.abs().max()) for k, v in lora.items() if "lora_B" in k or "lora.up" in k) > 0
    # A list whose images all score the same carries no preference and no gradient: the weights move iff one does not.
    summary = res["data"]["summary"]
    assert moved == (summary["all_tied"] < summary["lists"])

    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 12 * 128 and grid.size[1] > 3 * 128  # 12 prompts x 3 models at 2x scale
    assert Image.open(out / "training_curves.png").size[0] > 0
    assert len(open(out / "grid_prompts.txt").read().splitlines()) == 12


def test_base_evaluation_is_cached_and_reproducible(toy_run, tmp_path):
    cfg = Q.QuickstartConfig(eval_per_task=1, num_inference_steps=2, progress=False)
    pipe = P.load_toy_pipeline("sdxl", toy_run.output_dir)
    rows = Q.eval_rows(1)
    a = Q.evaluate(pipe, rows, cfg, keep=[0, 3])
    b = Q.evaluate(pipe, rows, cfg, keep=[0, 3])
    assert a["correct"] == b["correct"] and sorted(a["images"]) == [0, 3]
    assert np.array_equal(np.asarray(a["images"][3]), np.asarray(b["images"][3]))  # seeded noise, shared across runs
    calls = []
    path = str(tmp_path / "eval.json")
    first = Q._cached_eval(path, {"k": 1}, lambda: calls.append(1) or a)
    again = Q._cached_eval(path, {"k": 1}, lambda: calls.append(1) or a)
    other = Q._cached_eval(path, {"k": 2}, lambda: calls.append(1) or a)
    assert calls == [1, 1] and again["correct"] == first["correct"] == other["correct"]


def test_base_resolution_and_state_export(toy_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m diffalign.toyworld.pretrain --family sdxl"):
        Q.resolve_base("sdxl", str(tmp_path / "nowhere"), str(tmp_path))
    with pytest.raises(ValueError, match="toy-sdxl run"):
        Q.resolve_base("sd3", toy_run.state_dir, str(tmp_path))
    # A pretrain state folder is exported to a pipeline with the same EMA weights as the recipe's own save.
    exported = Q.resolve_base("sdxl", toy_run.state_dir, str(tmp_path))
    assert exported != toy_run.output_dir and os.path.exists(os.path.join(exported, "model_index.json"))
    assert Q.resolve_base("sdxl", toy_run.state_dir, str(tmp_path)) == exported  # reused, not re-exported
    a = P.load_toy_pipeline("sdxl", exported).unet.state_dict()
    b = P.load_toy_pipeline("sdxl", toy_run.output_dir).unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Q.checkpoint_digest(exported) != Q.checkpoint_digest(str(tmp_path))


def test_toy_geneval_reward_is_exact_and_graded():
    reward = GradedToyGenEvalReward()
    rows = [r for t in scenes.TASKS for r in scenes.load_eval_set(t)[:3]]
    images = [scenes.render(scenes.sample_scene(r, np.random.default_rng(i))) for i, r in enumerate(rows)]
    right = reward.score(images, [r["prompt"] for r in rows])
    assert torch.equal(right, torch.ones(len(rows)))  # ground-truth scenes pass every clause
    wrong = reward.score(images, [rows[(i + 3) % len(rows)]["prompt"] for i in range(len(rows))])
    assert (wrong < 1.0).sum() >= len(rows) - 2 and (wrong >= 0).all()
    # Graded: a two-object prompt with one of its two objects present gets partial credit.
    meta = scenes.two_object_row("circle", "square")
    single = next(r for r in scenes.all_rows("single_object") if r["prompt"] == "a photo of a circle")
    img = scenes.render(scenes.sample_scene(single, np.random.default_rng(0)))
    assert reward.score([img], [meta["prompt"]]).item() == pytest.approx(0.25)  # 0.5 * (0 + 1/2)
    # Tensor input gives the same scores as PIL input.
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1 for im in images[:4]])
    assert torch.equal(reward.score(x, [r["prompt"] for r in rows[:4]]), right[:4])
    assert len(sub_questions(scenes.position_row("star", "left of", "ring"))) == 3
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        reward.score(images[:1], ["a photo of a cat"])


def test_random_labels_shuffle_images_not_scores():
    class Groups:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"scores": torch.tensor([1.0, 0.5, 0.0]), "pixel_values": torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2) + 10 * i,
                    "original_sizes": torch.tensor([[1, 1], [2, 2], [3, 3]]), "crop_top_lefts": torch.zeros(3, 2, dtype=torch.long)}

    control = Q.RandomLabels(Groups(), seed=0)
    orders = []
    for i in range(8):
        item = control[i]
        assert torch.equal(item["scores"], torch.tensor([1.0, 0.5, 0.0]))
        order = (item["pixel_values"][:, 0, 0, 0] - 10 * i).long().tolist()
        assert sorted(order) == [0, 1, 2] and item["original_sizes"][:, 0].tolist() == [o + 1 for o in order]
        assert control[i]["pixel_values"].equal(item["pixel_values"])  # seeded per group
        orders.append(tuple(order))
    assert len(set(orders)) > 1


def test_paired_deltas_by_hand():
    rows = [{"tag": "single_object"}] * 4 + [{"tag": "colors"}] * 4
    before = [0, 0, 1, 1, 0, 0, 0, 0]
    after = [1, 1, 1, 0, 0, 0, 0, 1]
    d = Q.paired_deltas(rows, [bool(x) for x in before], [bool(x) for x in after])
    assert d["single_object"] == pytest.approx(0.25) and d["colors"] == pytest.approx(0.25)
    assert d["single_object_se"] == pytest.approx(np.std([1, 1, 0, -1], ddof=1) / 2)
    assert d["overall"] == pytest.approx(0.25)
    assert d["overall_se"] == pytest.approx(np.sqrt(d["single_object_se"] ** 2 + d["colors_se"] ** 2) / 2)


def test_bad_config_and_missing_checkpoint_message(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="method"):
        Q.QuickstartConfig(method="ppo")
    with pytest.raises(ValueError, match="k >= 2"):
        Q.QuickstartConfig(guidances=(4.0,))
    monkeypatch.setattr(P, "CHECKPOINT_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--base"):
        Q.resolve_base("sd3", None, str(tmp_path))


def test_method_ppd_runs_the_toy_ppd_study(monkeypatch, tmp_path, capsys):
    """`--method ppd` hands the output folder, seed and base to the toy PPD study and prints its table."""
    from diffalign.cli import main
    from diffalign.toyworld import ppd as toyworld_ppd

    calls = []
    fake = {"method": "ppd", "family": "sdxl", "seconds": 1.0,
            "win_rate": {"own": {"4": {"mean": 0.8, "se": 0.05, "users_std": 0.1}}, "specificity_examples": 4,
                         "other": {"mean": 0.4, "se": 0.05, "users_std": 0.1}, "own_vs_other": {"mean": 0.7, "se": 0.05, "users_std": 0.1}},
            "interpolation": [{"alpha": 0.0, "reward_a": 1.0, "reward_a_se": 0.1, "reward_b": 0.0, "reward_b_se": 0.1}],
            "interpolation_summary": {"user_a": "u0", "user_b": "u1", "cosine": 0.1, "reward_a_base": 0.5, "reward_b_base": 0.5,
                                      "monotone_a": True, "monotone_b": True, "monotone_a_within_2se": True,
                                      "monotone_b_within_2se": True}}

    def run(output_dir, seed=0, progress=True, **overrides):
        calls.append((output_dir, seed, progress, overrides))
        return fake

    monkeypatch.setattr(toyworld_ppd, "run_quickstart_ppd", run)
    js = tmp_path / "ppd.json"
    assert main(["quickstart", "--method", "ppd", "--seed", "3", "--base", "some/toy", "--output_dir", str(tmp_path / "o"),
                 "--json", str(js), "--no_progress"]) == 0
    assert calls == [(str(tmp_path / "o"), 3, False, {"base": "some/toy"})]
    assert json.load(open(js)) == fake
    assert "own examples, N=4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="toy-sdxl only"):
        Q.run_quickstart(Q.QuickstartConfig(method="ppd", family="sd3"))
    with pytest.raises(ValueError, match="another user's"):
        Q.run_quickstart(Q.QuickstartConfig(method="ppd", with_control=True))


@pytest.mark.parametrize("reference", ["base", "previous"])
def test_rounds_generate_from_the_last_policy(toy_run, tmp_path, reference):
    """--rounds 2: round 2 draws new prompts, generates its lists with the exported round-1 policy and trains
    either on by continuing the LoRA against the base, or a fresh LoRA against the fused round-1 policy."""
    cfg = Q.QuickstartConfig(base=toy_run.output_dir, output_dir=str(tmp_path / "qs"), with_control=True, num_prompts=4,
                             guidances=(2.0, 5.0), synth_steps=2, train_steps=2, groups_per_step=2, eval_per_task=1,
                             num_inference_steps=2, rounds=2, round_reference=reference, learning_rate=5e-2, progress=False)
    res = Q.run_quickstart(cfg)
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    for name, tag in (("aligned", "rankdpo"), ("control", "rankdpo-control")):
        r1, r2 = (res["rounds"][i][name] for i in range(2))
        assert r2["summary"] == res[name]  # the final model is round 2's
        for key in ("overall", "single_object"):
            assert r2["delta_vs_previous_round"][key] == pytest.approx(r2["summary"][key] - r1["summary"][key])
        first = json.load(open(tmp_path / "qs" / f"train-{tag}-seed0" / "training_summary.json"))["config"]
        second = json.load(open(tmp_path / "qs" / f"train-{tag}-seed0-round2" / "training_summary.json"))["config"]
        policy = str(tmp_path / "qs" / f"train-{tag}-seed0" / "policy")
        assert first["dataset"] != second["dataset"]  # new lists ...
        data_dir = os.path.dirname(second["dataset"])
        synth_cfg = json.load(open(os.path.join(data_dir, "synpic", "synth_config.json")))
        assert all(g["source"] == policy for g in synth_cfg["generators"])  # ... from the round-1 policy
        prompts = [json.loads(line)["prompt"] for line in open(os.path.join(data_dir, "prompts.jsonl"))]
        assert prompts != [r["prompt"] for r in Q.training_prompts(4, 0)]
        if reference == "base":
            assert second["pretrained_model_name_or_path"] == toy_run.output_dir
            assert second["init_lora"] == str(tmp_path / "qs" / f"train-{tag}-seed0")
        else:
            assert second["pretrained_model_name_or_path"] == policy and second["init_lora"] is None
    # The exported policy is round 1's model: base + its LoRA, fused.
    pipe = P.load_toy_pipeline("sdxl", toy_run.output_dir)
    pipe.load_lora_weights(str(tmp_path / "qs" / "train-rankdpo-seed0"))
    pipe.fuse_lora()
    exported = P.load_toy_pipeline("sdxl", str(tmp_path / "qs" / "train-rankdpo-seed0" / "policy")).unet.state_dict()
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert exported.keys() == fused.keys() and all(torch.allclose(exported[k], fused[k], atol=1e-6) for k in exported)
    assert res["rounds"][1]["method_vs_control"]["overall"] == pytest.approx(
        res["rounds"][1]["aligned"]["summary"]["overall"] - res["rounds"][1]["control"]["summary"]["overall"])


def test_evaluation_sampler_is_the_familys():
    assert Q.QuickstartConfig().eval_sampler == "DPMSolverMultistepScheduler"
    assert Q.QuickstartConfig(family="sd3").eval_sampler is None  # its own flow-matching Euler
    assert Q.QuickstartConfig(family="sd3", eval_scheduler="FlowMatchEulerDiscreteScheduler").eval_sampler == "FlowMatchEulerDiscreteScheduler"
